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

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

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
from fewshot_jax import watchdog
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import ConfigError, TrainingDiverged, UnreadableCheckpoint
from fewshot_jax.models import layers


def make_step(method, tx, config, mesh) -> Callable:
  """The pure training step: (state, dataset, base_key) -> (state, metrics)."""
  sampling = dict(tasks=config.episode.tasks,
                  **input_pipeline.episode_sampling(config, training=True, ways=config_lib.train_ways(config)))
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
                       hooks: Sequence[Callable[[int, state_lib.TrainState], None]] = (),
                       watch=None) -> state_lib.TrainState:
  """Trains (resuming from workdir if a checkpoint exists) with periodic validation.

  The workdir is locked for the run (files.WorkdirLock). `hooks(step, state)`
  run after every host call; a hook may raise to stop the run (a preemption in
  tests). SIGTERM / SIGINT checkpoint and raise preemption.Stopped; a
  non-finite loss raises TrainingDiverged (train.nonfinite='stop'). `watch`
  (watchdog.Watchdog, launch.py's) bounds every phase and is told the last checkpoint.
  """
  config, mesh = sharding.setup(config)
  lock = files.WorkdirLock(workdir)
  existed = os.path.isdir(workdir)
  multihost.run_on_main(lambda: _claim(workdir, lock), "locking the workdir")
  try:
    return _train(config, workdir, hooks, mesh, watch or watchdog.NoWatchdog())
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


@dataclasses.dataclass
class _Run:
  """What the phases of one training run share; `state` and `step` advance."""

  config: ml_collections.ConfigDict
  method: Any
  ckpt: checkpoint.Checkpoints
  meta: dict
  train_data: Any
  validator: evaluate.Evaluator
  train_fn: Callable
  train_key: Any
  schedule: Callable
  writer: "MetricWriter"
  watch: Any
  images_per_episode: int
  state: state_lib.TrainState
  step: int = 0


def _train(config, workdir, hooks, mesh, watch) -> state_lib.TrainState:
  run = _start(config, workdir, mesh, watch)
  tc = config.train
  try:
    with preemption.StopRequests() as stops:
      watch.saving = True  # a first signal is the trainer's: checkpoint at the next step boundary
      t0, done = time.time(), 0
      for length in call_lengths(run.step, tc.steps, tc.steps_per_call,
                                 (tc.log_every, tc.eval_every, tc.checkpoint_every)):
        metrics = _run_call(run, length)
        done += length
        if run.step % tc.log_every == 0 or run.step == tc.steps:
          _log(run, metrics, done, time.time() - t0)
          t0, done = time.time(), 0
        if run.step % tc.eval_every == 0 or run.step == tc.steps:
          _save(run, best=_validate(run))
          t0, done = time.time(), 0  # validation time is not training throughput
        elif run.step % tc.checkpoint_every == 0:
          _save(run)
        for hook in hooks:
          hook(run.step, run.state)
        _stop_if_asked(run, stops)
  finally:  # whatever ends the run, a checkpoint being written is completed first
    watch.saving = False
    run.ckpt.wait()
    run.ckpt.close()
    run.writer.close()
  return run.state


def _start(config, workdir, mesh, watch) -> _Run:
  """Start or resume: the method, the data, the initial (or resumed, or set-up) state."""
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

  init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
  replicated = sharding.replicated(mesh)
  state = jax.jit(functools.partial(state_lib.init_state, method, tx), out_shardings=replicated)(
      init_key, example)
  ckpt = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints, cleanup=True)
  try:
    resumed = _resume(ckpt, state, config, replicated)
    multihost.run_on_main(lambda: _record_config(config, workdir, resumed is not None), "recording the config")
  except BaseException:
    ckpt.close()
    raise
  watch.checkpoint = "no checkpoint was written yet"
  if resumed is not None:
    state = resumed
    logging.info("Resumed from %s at step %d", ckpt.latest.directory, int(state.step))
    watch.checkpoint = _checkpoint_text(ckpt, int(state.step))
  elif method.setup is not None:
    variables = method.setup({"params": state.params, **state.model_state}, train_data)
    params = variables.pop("params")
    state = jax.device_put(state.replace(params=params, model_state=variables, opt_state=tx.init(params)),
                           replicated)
  schedule = (state_lib.learning_rate_schedule(config.train) if method.learning_rate is None
              else method.learning_rate(config))
  return _Run(config=config, method=method, ckpt=ckpt, meta=checkpoint.checkpoint_meta(config),
              train_data=train_data, validator=validator, train_fn=make_train_fn(method, tx, config, mesh),
              train_key=train_key, schedule=schedule, writer=MetricWriter(workdir), watch=watch,
              images_per_episode=state_lib.images_per_task(example, config.episode.tasks), state=state,
              step=int(state.step))


def _run_call(run: _Run, length: int) -> dict:
  """One host call of `length` steps; its mean metrics. A non-finite loss stops the run (or is skipped)."""
  tc = run.config.train
  with run.watch.phase(f"training steps {run.step + 1}-{run.step + length}"):
    run.state, metrics = run.train_fn(run.state, run.train_data, run.train_key, length)
    metrics = jax.device_get(metrics)
  run.step += length
  if metrics["nonfinite"] > 0 and tc.nonfinite == "stop":
    good = run.ckpt.latest.latest_step()
    own = run.method.learning_rate is not None  # the method's optimiser reads its own keys, not train.lr
    first = run.step - length
    raise TrainingDiverged(
        f"the loss or a gradient became non-finite between steps {first} and {run.step} "
        f"({f'learning rate {float(run.schedule(first)):.2e}' if own else f'train.lr={tc.lr}'}); " +
        (f"the last good checkpoint is step {good} in {run.ckpt.latest.directory}"
         if good is not None else "no checkpoint was written yet") +
        f"; lower {'the learning rates under method.' if own else 'train.lr'}, or set "
        "train.nonfinite='skip' to skip such steps")
  return metrics


def _log(run: _Run, metrics: dict, steps_done: int, elapsed: float) -> None:
  """One INFO line and TensorBoard scalars: loss, accuracy, lr, episodes/s, images/s, ETA."""
  tc, tasks = run.config.train, run.config.episode.tasks
  eps = steps_done * tasks / elapsed
  eta = (tc.steps - run.step) * tasks / eps
  extra = "".join(f" {k} {float(v):.4f}" for k, v in metrics.items() if k not in ("loss", "accuracy"))
  logging.info("step %d/%d loss %.4f accuracy %.4f%s lr %.2e | %.1f episodes/s %.0f images/s | ETA %s",
               run.step, tc.steps, metrics["loss"], metrics["accuracy"], extra, run.schedule(run.step), eps,
               eps * run.images_per_episode, _hms(eta))
  run.writer.scalars(run.step, {f"train/{k}": v for k, v in metrics.items()} |
                     {"train/lr": run.schedule(run.step), "train/episodes_per_s": eps})


def _validate(run: _Run) -> float:
  """Validation accuracy of the current state (the checkpoint-selecting mode), logged."""
  with run.watch.phase(f"validation at step {run.step}"):
    result = run.validator.run(run.state.params, run.state.model_state)
  others = ", ".join(f"{m} {r['accuracy']:.2f}" for m, r in result["modes"].items() if m != result["mode"])
  logging.info("step %d validation accuracy %.2f%% +- %.2f (%d %s episodes of %s, %s mode)%s", run.step,
               result["accuracy"], result["ci95"], result["episodes"], result["protocol"],
               run.config.data.val_split, result["mode"], f"; {others}" if others else "")
  run.writer.scalars(run.step, {"val/accuracy": result["accuracy"]} |
                     {f"val/accuracy_{m}": r["accuracy"] for m, r in result["modes"].items()})
  return result["accuracy"]


def _save(run: _Run, best: float | None = None) -> None:
  """After a validation, the best-by-validation checkpoint, then the latest (unless this step has one).

  In that order, so that a run killed between the two resumes from an earlier latest checkpoint and
  validates this step again (the same accuracy: the same state and episodes) rather than resuming
  past a validation whose best checkpoint was never written; a best step that exists is kept."""
  with run.watch.phase(f"checkpoint at step {run.step}"):
    if best is not None and run.step not in run.ckpt.best.all_steps():
      run.ckpt.save(run.ckpt.best, run.state, run.meta, metrics={"val_accuracy": best})
    if run.ckpt.latest.latest_step() != run.step:
      _check_replicas(run.state)
      run.ckpt.save(run.ckpt.latest, run.state, run.meta)
    if best is not None:
      run.ckpt.wait()
  run.watch.checkpoint = _checkpoint_text(run.ckpt, run.step)


def _stop_if_asked(run: _Run, stops: preemption.StopRequests) -> None:
  """After a SIGTERM / SIGINT on any process: every process checkpoints this step, then stops."""
  with run.watch.phase(f"agreeing whether to stop after step {run.step}"):
    signum = stops.agreed()
  if signum and run.step < run.config.train.steps:
    _save(run)
    raise preemption.Stopped(signum, run.step, str(run.ckpt.latest.directory))


def _checkpoint_text(ckpt: checkpoint.Checkpoints, step: int) -> str:
  return f"the last checkpoint is step {step} in {ckpt.latest.directory}"


def _check_replicas(state) -> None:
  """With several processes, stops the run if their copies of the parameters differ."""
  if jax.process_count() > 1:
    crc = multihost.check_replicas_agree(state.params, "parameters")
    logging.info("step %d: parameters bit-identical on all %d processes (CRC-32 %08x)", int(state.step),
                 jax.process_count(), crc)


def _hms(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


