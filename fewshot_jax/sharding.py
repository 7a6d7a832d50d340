"""Device mesh helpers: one 1-D mesh over all devices; the task axis is sharded, parameters replicated."""

import re

import jax
import numpy as np

from fewshot_jax.errors import ConfigError


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all devices of all hosts; axis 'data' carries the task axis."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices, ("data",))


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def task_sharded(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def check_tasks_divisible(tasks: int, mesh, key: str) -> None:
  if tasks % mesh.size:
    raise ConfigError(f"{key}={tasks} must be a multiple of the {mesh.size} devices; "
                      f"use {key}={mesh.size * max(1, round(tasks / mesh.size))}")


def check_batch_divisible(example, mesh) -> None:
  """The training batch's leading (task or image) axis must split evenly over the devices."""
  sizes = {x.shape[0] for x in jax.tree.leaves(example) if x.shape}
  bad = sorted(n for n in sizes if n % mesh.size)
  if bad:
    raise ConfigError(f"the training batch has {bad[0]} tasks or images per step, not a multiple of the "
                      f"{mesh.size} devices; set episode.tasks or the method's batch size to a multiple "
                      f"of {mesh.size}")


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int, str]]:
  """(kind, bytes, result shape) of every collective in a compiled module's HLO text.

  Bytes are the size of the collective's result (for an all-gather the
  gathered tensor, for an all-reduce the reduced buffers), per device.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = _SHAPE.findall(m.group(1))
      size = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for dt, dims in shapes)
      found.append((m.group(2), size, " ".join(f"{dt}[{dims}]" for dt, dims in shapes)))
  return found
