"""Episodic evaluation: mean accuracy over E episodes with a 95% confidence interval.

Episode i is drawn from fold_in(eval.seed, i), so every method, checkpoint,
batch size and device count is scored on the very same episodes.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewshot_jax import checkpoint
from fewshot_jax import config as config_lib
from fewshot_jax import multihost
from fewshot_jax import restore
from fewshot_jax import sharding
from fewshot_jax.data import augment as augment_lib
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import ConfigError


def summarize(per_episode: np.ndarray) -> dict:
  """Accuracy and 1.96 * std / sqrt(E), both in percent."""
  acc = 100.0 * np.asarray(per_episode, np.float64)
  return {"accuracy": float(acc.mean()), "ci95": float(1.96 * acc.std() / math.sqrt(len(acc))),
          "episodes": int(len(acc))}


def episode_keys(config: ml_collections.ConfigDict):
  """(sample key, predict key) of evaluation: episode i is drawn from fold_in(sample key, i) and the
  batch of episodes starting at s is predicted with fold_in(predict key, s), so every method,
  checkpoint, batch size, device count and framework (compare.py) sees the same episodes."""
  return tuple(jax.random.split(jax.random.key(config.eval.seed)))


def protocol_sampling(config: ml_collections.ConfigDict, protocol: str) -> dict:
  """sample_tasks' settings of an evaluation protocol (see Evaluator)."""
  reference = protocol == "reference"
  ways = config.episode.ways
  return dict(ways=ways, shots=config.episode.shots, queries=1 if reference else config.eval.queries,
              augment=augment_lib.from_config(config, ways, training=reference),
              query_sampling="per_task" if reference else "per_class", disjoint=config.episode.disjoint_queries)


def sample_batch(sample_key, dataset, start, tasks: int, **sampling):
  """Episodes start .. start + tasks - 1 of `dataset` (traceable; `sampling` as sample_tasks)."""
  task_keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(start + jnp.arange(tasks))
  return episodes.sample_tasks(task_keys, dataset, **sampling)


class Evaluator:
  """Scores (params, model_state) on `num_episodes` episodes of one split under one protocol.

  'standard': N-way K-shot episodes with eval.queries queries per class and no
  augmentation. 'reference' (the weight generators' TF code's test): tasks with ONE query,
  drawn uniformly from the task's classes, and the training augmentation
  (per-class rotation) applied. Every prediction mode of the method is scored
  on the same episodes and the same noise.
  """

  def __init__(self, method, config: ml_collections.ConfigDict, mesh, split: str, num_episodes: int,
               dataset: episodes.DeviceDataset | None = None, protocol: str | None = None):
    if dataset is None:
      dataset = input_pipeline.load(config, split, mesh)
    self.dataset = dataset
    self.mesh = mesh
    self.protocol = protocol or config.eval.protocol
    if self.protocol not in config_lib.PROTOCOLS:
      raise ConfigError(f"eval.protocol={self.protocol!r} is unknown; valid: {list(config_lib.PROTOCOLS)}")
    reference = self.protocol == "reference"
    ways, shots = config.episode.ways, config.episode.shots
    queries = 1 if reference else config.eval.queries
    episodes.check_episode_fits(self.dataset, ways, shots, queries, split,
                                ("episode.ways", "episode.shots", "eval.queries"))
    self.tasks = config.eval.tasks
    sharding.check_tasks_divisible(self.tasks, mesh, "eval.tasks")
    self.num_episodes = num_episodes
    self.queries = 1 if reference else queries * ways  # per episode
    self.default_mode = method.checkpoint_mode(config)
    batch_sharding = sharding.task_sharded(mesh)
    sample_key, predict_key = episode_keys(config)
    self.predict_key = predict_key
    sampling = protocol_sampling(config, self.protocol)

    def sample(dataset, start):
      episode = sample_batch(sample_key, dataset, start, self.tasks, **sampling)
      return jax.lax.with_sharding_constraint(episode, batch_sharding)

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))  # readable by every process
    def batch_accuracy(params, model_state, dataset, start):
      episode = sample(dataset, start)
      logits = method.modes(params, model_state, episode, jax.random.fold_in(predict_key, start))
      return {m: jnp.mean(jnp.argmax(l, -1) == episode.query_labels, axis=-1) for m, l in logits.items()}

    self._batch_accuracy = batch_accuracy
    self.sample = jax.jit(sample, out_shardings=sharding.replicated(mesh))

  def episode_batches(self):
    """(start, Episode batch of eval.tasks tasks) of every batch scored, as `per_episode` samples them."""
    for start in range(0, self.num_episodes, self.tasks):
      yield start, self.sample(self.dataset, start)

  def per_episode(self, params, model_state) -> dict:
    """{mode: accuracy of each episode [num_episodes]}."""
    accs = jax.device_get([self._batch_accuracy(params, model_state, self.dataset, start)
                           for start in range(0, self.num_episodes, self.tasks)])
    return {m: np.concatenate([a[m] for a in accs])[:self.num_episodes] for m in accs[0]}

  def run(self, params, model_state) -> dict:
    """The default mode's summary, plus `modes`: {mode: summary} for every mode."""
    modes = {m: summarize(a) for m, a in self.per_episode(params, model_state).items()}
    head = modes.get(self.default_mode, next(iter(modes.values())))
    return {**head, "protocol": self.protocol, "queries_per_episode": self.queries,
            "mode": self.default_mode if self.default_mode in modes else next(iter(modes)),
            "modes": modes}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the best (or latest) checkpoint on eval.split under eval.protocol.

  Adds the result to <workdir>/eval_<split>.json under `result_key` (protocol,
  task, queries, checkpoint), so evaluations of other tasks or protocols
  accumulate beside it. The standard protocol scores eval.episodes episodes,
  the reference protocol eval.reference_tasks tasks.
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh()
  config = config_lib.fit_to_devices(config, mesh.size)
  method, state = restore.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  protocol = config.eval.protocol
  num = config.eval.reference_tasks if protocol == "reference" else config.eval.episodes
  evaluator = Evaluator(method, config, mesh, config.eval.split, num)
  result = {"method": config.method.name, "dataset": config.data.name, "split": config.eval.split,
            "ways": config.episode.ways, "shots": config.episode.shots,
            **evaluator.run(state.params, state.model_state), "step": int(state.step),
            "checkpoint": config.eval.checkpoint}
  if method.figures is not None:
    result.update(write_figures(method, state, config, evaluator, workdir))
  if not multihost.is_main():
    return result
  path = os.path.join(workdir, f"eval_{config.eval.split}.json")
  written = {}
  if os.path.exists(path):
    with open(path) as f:
      try:
        written = json.load(f)
      except json.JSONDecodeError:
        written = {}
  checkpoint.write_json(path, {**written, result_key(result): result})
  return result


def result_key(result: dict) -> str:
  """'standard/5w1s/75q/best': what an entry of eval_<split>.json measured."""
  return (f"{result['protocol']}/{result['ways']}w{result['shots']}s/{result['queries_per_episode']}q/"
          f"{result['checkpoint']}")


def write_figures(method, state, config, evaluator: Evaluator, workdir: str) -> dict:
  """The method's evaluation figures, on the evaluator's first eval.tasks episodes (standard
  sampling, one query per class), so the figure of every checkpoint shows the same supports."""
  ways, shots = config.episode.ways, config.episode.shots
  aug = augment_lib.from_config(config, ways, training=False)
  sample_key, _ = episode_keys(config)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(evaluator.mesh))  # readable by every process
  def figure_data(params, model_state, dataset):
    episode = sample_batch(sample_key, dataset, 0, config.eval.tasks, ways=ways, shots=shots, queries=1,
                           augment=aug)
    return method.figures.compute(params, model_state, episode, jax.random.key(config.eval.seed))

  data = jax.device_get(figure_data(state.params, state.model_state, evaluator.dataset))
  title = f"{config.method.name} step {int(state.step)}, {config.eval.split} episodes"
  return method.figures.write(data, workdir, config.eval.split, title)
