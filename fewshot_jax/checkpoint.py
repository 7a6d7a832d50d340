"""Orbax checkpoints: latest (resume) and best-by-validation, with a config check on restore.

Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-save never corrupts the checkpoint a resume would read.
"""

import contextlib
import json
import logging
import os
import sys

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from fewshot_jax import files
from fewshot_jax.errors import CheckpointError, UnreadableCheckpoint


def checkpoint_meta(config) -> dict:
  """What a checkpoint must agree on with the config that restores it."""
  return {"method": config.method.name, "backbone": config.model.backbone,
          "dataset": config.data.name, "image_size": config.data.image_size}


class Checkpoints:
  """Orbax managers for the latest state (resume) and the best by validation accuracy."""

  def __init__(self, workdir: str, keep: int, cleanup: bool = False):
    """cleanup: remove half-written (*.orbax-checkpoint-tmp) steps a killed writer left; only the
    run that owns the workdir (the trainer, under its lock) may, never an evaluation beside it."""
    workdir = os.path.abspath(workdir)
    try:  # the managers read every step's metadata and metrics files
      self.latest = ocp.CheckpointManager(
          os.path.join(workdir, "checkpoints"),
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup))
      self.best = ocp.CheckpointManager(
          os.path.join(workdir, "best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m["val_accuracy"], best_mode="max",
              cleanup_tmp_directories=cleanup))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointError(f"checkpoints in {workdir} are unreadable: {_short(e)}") from None

  def save(self, manager, state, meta, metrics=None):
    """Starts an asynchronous save once the previous save of either manager is committed: with
    several processes, two managers finalising at once collide on orbax's barrier names."""
    self.wait()
    step = int(state.step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    with _write_errors(manager.directory, step):
      manager.save(step, args=args, metrics=metrics)

  def wait(self):
    for manager in (self.latest, self.best):
      with _write_errors(manager.directory):
        manager.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


@contextlib.contextmanager
def _write_errors(directory, step=None):
  """A full disk or a permission error while writing a checkpoint: one CheckpointError naming where.

  The failed write abandons tensorstore's other writes, as a failed read does
  (_quiet_abandoned_io), so their late errors are silenced the same way."""
  try:
    with _quiet_abandoned_io():
      yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    text = str(e)
    for needle, what in (("No space left on device", "the disk is full"),
                         ("Permission denied", "permission denied"), ("Read-only file system", "read-only")):
      if needle in text or (isinstance(e, OSError) and e.strerror == needle):
        which = "a checkpoint" if step is None else f"checkpoint {step}"
        raise CheckpointError(f"cannot write {which} in {directory}: {what}; the newest complete "
                              "checkpoint is kept; free space (or fix the path) and rerun the same command "
                              "to resume from it") from None
    raise


def restore(manager, abstract_state, config, step=None):
  """Restores a checkpoint; any mismatch with the config is one CheckpointError."""
  step = manager.latest_step() if step is None else step
  where = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # orbax raises many types for unreadable files
    raise UnreadableCheckpoint(f"checkpoint {where} is unreadable: {_short(e)}") from None
  expected = checkpoint_meta(config)
  diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
  if diff:
    raise CheckpointError(
        f"checkpoint {where} does not match the config: " +
        ", ".join(f"{k} is {a!r} in the checkpoint but {b!r} in the config" for k, (a, b) in diff.items()))
  # Shapes come from the checkpoint's metadata, before any array is read: a
  # mismatch would fail orbax's parallel reads part-way (see _quiet_abandoned_io).
  try:
    with _quiet_abandoned_io():
      stored = _leaf_shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(where) / "state"))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UnreadableCheckpoint(f"checkpoint {where} is unreadable: {_short(e)}") from None
  wanted = _leaf_shapes(abstract_state)
  problems = [f"{k} has shape {stored[k]} in the checkpoint but {wanted[k]} in the model"
              for k in wanted if k in stored and stored[k] != wanted[k]]
  problems += [f"{k} is in the model but not in the checkpoint" for k in wanted if k not in stored]
  problems += [f"{k} is in the checkpoint but not in the model" for k in stored if k not in wanted]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointError(f"checkpoint {where} does not fit the model of the config "
                          f"(were model.* or method.* changed?): {'; '.join(problems[:3])}{more}")
  try:
    with _quiet_abandoned_io():
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UnreadableCheckpoint(f"checkpoint {where} is unreadable: {_short(e)}") from None
  return restored["state"]


def _leaf_shapes(tree) -> dict[str, tuple]:
  """'params/Conv_0/kernel' -> shape, for a state, its abstract skeleton or orbax metadata."""
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {"/".join(name(e) for e in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _short(e: Exception) -> str:
  """Type and first line of an exception, without tensorstore's long JSON spec."""
  text = str(e).split(" [tensorstore_spec")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


class _AbandonedIO(logging.Filter):

  def filter(self, record) -> bool:
    return not record.getMessage().startswith(("Task exception was never retrieved",
                                               "Future exception was never retrieved"))


@contextlib.contextmanager
def _quiet_abandoned_io():
  """When one of orbax's parallel reads or writes fails, the others are abandoned: tensorstore
  finishes them later and posts them to orbax's event loop, already closed, and
  their tasks log their errors when collected, so Python would print one
  'RuntimeError: Event loop is closed' or '... exception was never retrieved'
  traceback per array under our one-line error. Drops exactly those; the filters
  stay after a failure (late reads come at any time) and go after a success."""
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      previous(unraisable)

  log_filter = _AbandonedIO()
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(log_filter)
  yield  # an exception propagates from here and leaves the filters in place
  sys.unraisablehook = previous
  logging.getLogger("asyncio").removeFilter(log_filter)


def abstract_like(state, target_sharding):
  """Shape/dtype/sharding skeleton that orbax restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding), state)


def open_step(workdir: str, which: str, keep: int, step: int | None = None):
  """(Checkpoints, the manager of `which`, the step to read) of a workdir's best or latest checkpoint.

  `step`: a retained step of the latest manager instead (which='latest'), for
  curves over a run's checkpoints. The caller closes the Checkpoints.
  """
  root = os.path.join(os.path.abspath(workdir), "best" if which == "best" else "checkpoints")
  if not os.path.isdir(root):
    raise CheckpointError(f"no {which} checkpoint in workdir {workdir!r} ({root} is missing); "
                          f"train first with --mode=train")
  ckpt = Checkpoints(workdir, keep)
  manager = ckpt.best if which == "best" else ckpt.latest
  if step is None:
    step = manager.best_step() if which == "best" else manager.latest_step()
  elif which != "latest" or step not in manager.all_steps():
    ckpt.close()
    raise CheckpointError(f"step {step} is not a retained checkpoint of {root}; "
                          f"retained: {sorted(manager.all_steps())}")
  if step is None:
    ckpt.close()
    raise CheckpointError(f"no {which} checkpoint in {root}; train first with --mode=train")
  return ckpt, manager, step


def read_as_saved(workdir: str, which: str = "best") -> dict:
  """The state a workdir's checkpoint holds ({'params', 'model_state', ...} of numpy arrays), read
  without a model to restore into: for loading parts of another run whose shapes the caller checks."""
  ckpt, manager, step = open_step(workdir, which, 1)
  where = os.path.join(str(manager.directory), str(step))
  try:
    with _quiet_abandoned_io():
      handler = ocp.StandardCheckpointHandler()
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), handler.metadata(epath.Path(where) / "state"))
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UnreadableCheckpoint(f"checkpoint {where} is unreadable: {_short(e)}") from None
  finally:
    ckpt.close()
  return restored["state"]


def write_config(workdir: str, config) -> None:
  """<workdir>/config.json: the config a workdir's checkpoints were made with (training and
  --mode=convert both record it here; evaluation and resume read it back)."""
  files.write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def write_json(path: str, payload) -> None:
  """Writes JSON atomically (unique temp file + rename), so a crash never leaves half a file."""
  files.write_atomic(path, json.dumps(payload, indent=2))
