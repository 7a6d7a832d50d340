"""Method-agnostic episodic trainer.

One call runs `steps_per_call` steps (sample -> augment -> loss -> update):
under lax.scan in one jitted computation, so the host never waits on the
device, or, with train.loop='python' ('auto' on the CPU when the models use
XLA's convolution), as that many calls of the jitted step: XLA:CPU runs a
convolution's weight gradient inside a loop body as a slow generic loop
(models/layers.py), and on a CPU the per-step dispatch costs nothing by
comparison. Both give the same steps with the same keys. Parameters are
replicated and the episode's task axis is sharded over a mesh of all devices.
Every step's randomness is fold_in(seed, step), so a run resumed from its
latest checkpoint ends with exactly the parameters of an uninterrupted run.

The same code runs in one process or many (multihost.py): every process
executes every step on its devices of the global mesh; files, TensorBoard and
INFO lines come from process 0; checkpoints are written by orbax from all
processes; SIGTERM / Ctrl-C stop every process after the same step, with a
checkpoint (preemption.py).
"""

import functools
import json
import os
import time
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fewshot_jax import checkpoint
from fewshot_jax import config as config_lib
from fewshot_jax import evaluate
from fewshot_jax import files
from fewshot_jax import methods
from fewshot_jax import multihost
from fewshot_jax import preemption
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax.data import augment as augment_lib
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import ConfigError, TrainingDiverged, UnreadableCheckpoint
from fewshot_jax.models import layers


def make_step(method, tx, config, mesh) -> Callable:
  """The pure training step: (state, dataset, base_key) -> (state, metrics)."""
  ways = config_lib.train_ways(config)
  aug = augment_lib.from_config(config, ways)
  sampling = dict(tasks=config.episode.tasks, ways=ways, shots=config.episode.shots,
                  queries=config.episode.queries, augment=aug, query_sampling=config.episode.query_sampling,
                  disjoint=config.episode.disjoint_queries)
  batch_sharding = sharding.task_sharded(mesh)
  skip_nonfinite = config.train.nonfinite == "skip"

  def one_step(state, dataset, base_key):
    key = jax.random.fold_in(base_key, state.step)
    sample_key, loss_key = jax.random.split(key)
    if method.train_batch is not None:
      episode = method.train_batch(sample_key, dataset)
    else:
      episode = episodes.sample_episodes(sample_key, dataset, **sampling)
    episode = jax.lax.with_sharding_constraint(episode, batch_sharding)
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, episode, loss_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.all(jnp.stack([jnp.isfinite(loss)] + [jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
    metrics = {**metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    new = (params, model_state, opt_state)
    if skip_nonfinite:  # keep the previous state: the step is skipped
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (state.params, state.model_state,
                                                                     state.opt_state))
    return state.replace(step=state.step + 1, params=new[0], model_state=new[1], opt_state=new[2]), metrics

  return one_step


def make_train_fn(method, tx, config, mesh) -> Callable:
  """jit(state, dataset, base_key, num_steps) -> (state, mean metrics over the steps).

  State and metrics come out replicated: every process holds the whole state
  and can read the metrics.
  """
  one_step = make_step(method, tx, config, mesh)
  replicated = sharding.replicated(mesh)

  if train_loop(config) == "python":
    step_fn = jax.jit(one_step, donate_argnums=0, out_shardings=replicated)
    mean = jax.jit(lambda ms: jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *ms), out_shardings=replicated)

    def python_loop(state, dataset, base_key, num_steps):
      metrics = []
      for _ in range(num_steps):
        state, m = step_fn(state, dataset, base_key)
        metrics.append(m)
      return state, mean(metrics)

    return python_loop

  @functools.partial(jax.jit, static_argnums=3, donate_argnums=0, out_shardings=replicated)
  def train_fn(state, dataset, base_key, num_steps):
    state, metrics = jax.lax.scan(lambda s, _: one_step(s, dataset, base_key), state, None,
                                  length=num_steps)
    return state, jax.tree.map(jnp.mean, metrics)

  return train_fn


def train_loop(config) -> str:
  """train.loop with 'auto' resolved: 'python' on the CPU when plain convolutions are XLA's
  (layers.resolve_conv_impl), whose weight gradient is slow inside lax.scan; 'scan' otherwise."""
  if config.train.loop != "auto":
    return config.train.loop
  cpu_xla_conv = jax.default_backend() == "cpu" and layers.resolve_conv_impl(config.model.conv_impl) == "xla"
  return "python" if cpu_xla_conv else "scan"


def call_lengths(start: int, total: int, per_call: int, boundaries: Sequence[int]) -> list[int]:
  """Splits [start, total) into scan lengths that stop at every boundary multiple.

  Chunks depend only on the step, so a resumed run repeats the uninterrupted
  run's calls exactly.
  """
  lengths, step = [], start
  while step < total:
    nxt = min(total, (step // per_call + 1) * per_call)
    for b in boundaries:
      nxt = min(nxt, (step // b + 1) * b)
    lengths.append(nxt - step)
    step = nxt
  return lengths


class MetricWriter:
  """TensorBoard events (tensorboardX, no TensorFlow) + absl log lines."""

  def __init__(self, workdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: dict):
    if self._tb:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), step)
      self._tb.flush()

  def close(self):
    if self._tb:
      self._tb.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Callable[[int, state_lib.TrainState], None]] = ()) -> state_lib.TrainState:
  """Trains (resuming from workdir if a checkpoint exists) with periodic validation.

  The workdir is locked for the run (files.WorkdirLock). `hooks(step, state)`
  run after every host call; a hook may raise to stop the run (a preemption in
  tests). SIGTERM / SIGINT checkpoint and raise preemption.Stopped; a
  non-finite loss raises TrainingDiverged (train.nonfinite='stop').
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh()
  config = config_lib.fit_to_devices(config, mesh.size)
  lock = files.WorkdirLock(workdir)
  existed = os.path.isdir(workdir)
  multihost.run_on_main(lambda: _claim(workdir, lock), "locking the workdir")
  try:
    return _train(config, workdir, hooks, mesh)
  finally:
    lock.release()
    if not existed and multihost.is_main() and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # a run that failed before writing anything leaves no empty workdir


def _claim(workdir: str, lock: files.WorkdirLock) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create --workdir={workdir!r}: {e.strerror or e}") from None
  try:
    warning = lock.acquire()
  except OSError as e:
    raise ConfigError(f"cannot write in --workdir={workdir!r}: {e.strerror or e}") from None
  if warning:
    logging.warning(warning)


def _record_config(config, workdir: str, resumed: bool) -> None:
  """config.json holds the config of the latest start; a resumed run may change only RESUME_FREE keys
  (else ConfigError, unless train.allow_config_change), and every change goes to config_history.jsonl."""
  path = os.path.join(workdir, "config.json")
  if resumed and os.path.exists(path):
    with open(path) as f:
      started = json.load(f)
    changed = config_lib.config_changes(started, config)
    if changed and not config.train.allow_config_change:
      raise ConfigError(f"workdir {workdir} holds a run started with another config; changed: "
                        f"{'; '.join(changed)}. Use another --workdir, or pass "
                        "--config.train.allow_config_change=True to continue and record the change")
    if json.loads(config.to_json_best_effort()) != started:
      entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed, "previous": started}
      with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")
  checkpoint.write_config(workdir, config)


def _resume(ckpt: checkpoint.Checkpoints, fresh, config, replicated):
  """The newest readable latest checkpoint, or None; unreadable newer ones are skipped with a warning."""
  steps = sorted(ckpt.latest.all_steps(), reverse=True)
  problems = []
  for step in steps:
    try:
      state = checkpoint.restore(ckpt.latest, checkpoint.abstract_like(fresh, replicated), config, step)
    except UnreadableCheckpoint as e:
      logging.warning("%s; trying the previous checkpoint", e)
      problems.append(str(e))
      continue
    if problems:
      logging.warning("resuming from step %d, the newest readable checkpoint", step)
    return state
  if problems:
    raise UnreadableCheckpoint(f"no checkpoint in {ckpt.latest.directory} is readable ({len(problems)} "
                               f"tried; newest: {problems[0]}); move it aside to start afresh")
  return None


def _train(config, workdir, hooks, mesh) -> state_lib.TrainState:
  method = methods.build(config)
  tx = state_lib.optimizer_for(method, config)
  ways = config_lib.train_ways(config)
  example = state_lib.train_example(method, config)
  sharding.check_batch_divisible(example, mesh)

  train_data = input_pipeline.load(config, config.data.train_split, mesh)
  if method.train_batch is None:
    ways_key = "episode.train_ways" if config.episode.train_ways else "episode.ways"
    episodes.check_episode_fits(train_data, ways, config.episode.shots, config.episode.queries,
                                config.data.train_split, (ways_key, "episode.shots", "episode.queries"))
  validator = evaluate.Evaluator(method, config, mesh, config.data.val_split, config.eval.val_episodes)

  root_key = jax.random.key(config.train.seed)
  init_key, train_key = jax.random.split(root_key)
  replicated = sharding.replicated(mesh)
  state = jax.jit(functools.partial(state_lib.init_state, method, tx), out_shardings=replicated)(
      init_key, example)
  ckpt = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints, cleanup=True)
  meta = checkpoint.checkpoint_meta(config)
  try:
    resumed = _resume(ckpt, state, config, replicated)
    multihost.run_on_main(lambda: _record_config(config, workdir, resumed is not None), "recording the config")
  except BaseException:
    ckpt.close()
    raise
  if resumed is not None:
    state = resumed
    logging.info("Resumed from %s at step %d", ckpt.latest.directory, int(state.step))
  elif method.setup is not None:
    variables = method.setup({"params": state.params, **state.model_state}, train_data)
    params = variables.pop("params")
    state = jax.device_put(state.replace(params=params, model_state=variables, opt_state=tx.init(params)),
                           replicated)

  train_fn = make_train_fn(method, tx, config, mesh)
  schedule = (state_lib.learning_rate_schedule(config.train) if method.learning_rate is None
              else method.learning_rate(config))
  writer = MetricWriter(workdir)
  tc = config.train
  start = int(state.step)
  step, t0, done_since_t0 = start, time.time(), 0
  images_per_episode = state_lib.images_per_task(example, config.episode.tasks)

  def save_latest():
    if ckpt.latest.latest_step() != step:
      _check_replicas(state)
      ckpt.save(ckpt.latest, state, meta)

  try:
    with preemption.StopRequests() as stops:
      for length in call_lengths(start, tc.steps, tc.steps_per_call,
                                 (tc.log_every, tc.eval_every, tc.checkpoint_every)):
        state, metrics = train_fn(state, train_data, train_key, length)
        step += length
        done_since_t0 += length
        metrics = jax.device_get(metrics)
        if metrics["nonfinite"] > 0 and tc.nonfinite == "stop":
          good = ckpt.latest.latest_step()
          own = method.learning_rate is not None  # the method's optimiser reads its own keys, not train.lr
          raise TrainingDiverged(
              f"the loss or a gradient became non-finite between steps {step - length} and {step} "
              f"({f'learning rate {float(schedule(step - length)):.2e}' if own else f'train.lr={tc.lr}'}); " +
              (f"the last good checkpoint is step {good} in {ckpt.latest.directory}"
               if good is not None else "no checkpoint was written yet") +
              f"; lower {'the learning rates under method.' if own else 'train.lr'}, or set "
              "train.nonfinite='skip' to skip such steps")
        if step % tc.log_every == 0 or step == tc.steps:
          elapsed = time.time() - t0
          eps = done_since_t0 * config.episode.tasks / elapsed
          eta = (tc.steps - step) * config.episode.tasks / eps
          extra = "".join(f" {k} {float(v):.4f}" for k, v in metrics.items() if k not in ("loss", "accuracy"))
          logging.info("step %d/%d loss %.4f accuracy %.4f%s lr %.2e | %.1f episodes/s %.0f images/s | ETA %s",
                       step, tc.steps, metrics["loss"], metrics["accuracy"], extra, schedule(step), eps,
                       eps * images_per_episode, _hms(eta))
          writer.scalars(step, {f"train/{k}": v for k, v in metrics.items()} |
                         {"train/lr": schedule(step), "train/episodes_per_s": eps})
          t0, done_since_t0 = time.time(), 0
        if step % tc.eval_every == 0 or step == tc.steps:
          result = validator.run(state.params, state.model_state)
          others = ", ".join(f"{m} {r['accuracy']:.2f}" for m, r in result["modes"].items() if m != result["mode"])
          logging.info("step %d validation accuracy %.2f%% +- %.2f (%d %s episodes of %s, %s mode)%s", step,
                       result["accuracy"], result["ci95"], result["episodes"], result["protocol"],
                       config.data.val_split, result["mode"], f"; {others}" if others else "")
          writer.scalars(step, {"val/accuracy": result["accuracy"]} |
                         {f"val/accuracy_{m}": r["accuracy"] for m, r in result["modes"].items()})
          save_latest()
          ckpt.save(ckpt.best, state, meta, metrics={"val_accuracy": result["accuracy"]})
          ckpt.wait()
          t0, done_since_t0 = time.time(), 0  # validation time is not training throughput
        elif step % tc.checkpoint_every == 0:
          save_latest()
        for hook in hooks:
          hook(step, state)
        signum = stops.agreed()
        if signum and step < tc.steps:
          save_latest()
          raise preemption.Stopped(signum, step, str(ckpt.latest.directory))
  finally:  # whatever ends the run, a checkpoint being written is completed first
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state


def _check_replicas(state) -> None:
  """With several processes, stops the run if their copies of the parameters differ."""
  if jax.process_count() > 1:
    crc = multihost.check_replicas_agree(state.params, "parameters")
    logging.info("step %d: parameters bit-identical on all %d processes (CRC-32 %08x)", int(state.step),
                 jax.process_count(), crc)


def _hms(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


