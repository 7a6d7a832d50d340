"""Episodic evaluation: mean accuracy over E episodes with a 95% confidence interval.

Episode i is drawn from fold_in(eval.seed, i), so every method, checkpoint,
batch size and device count is scored on the very same episodes.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewshot_jax import checkpoint
from fewshot_jax import config as config_lib
from fewshot_jax import sharding
from fewshot_jax.data import augment as augment_lib
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline


def summarize(per_episode: np.ndarray) -> dict:
  """Accuracy and 1.96 * std / sqrt(E), both in percent."""
  acc = 100.0 * np.asarray(per_episode, np.float64)
  return {"accuracy": float(acc.mean()), "ci95": float(1.96 * acc.std() / math.sqrt(len(acc))),
          "episodes": int(len(acc))}


class Evaluator:
  """Scores (params, model_state) on `num_episodes` episodes of one split."""

  def __init__(self, method, config: ml_collections.ConfigDict, mesh, split: str, num_episodes: int,
               dataset: episodes.DeviceDataset | None = None):
    if dataset is None:
      dataset = input_pipeline.load(config, split, sharding.replicated(mesh))
    self.dataset = dataset
    ways, shots, queries = config.episode.ways, config.episode.shots, config.eval.queries
    episodes.check_episode_fits(self.dataset, ways, shots, queries, split,
                                ("episode.ways", "episode.shots", "eval.queries"))
    self.tasks = config.eval.tasks
    sharding.check_tasks_divisible(self.tasks, mesh, "eval.tasks")
    self.num_episodes = num_episodes
    batch_sharding = sharding.task_sharded(mesh)
    aug = augment_lib.from_config(config, ways)
    sample_key, predict_key = jax.random.split(jax.random.key(config.eval.seed))
    sampling = dict(ways=ways, shots=shots, queries=queries, augment=aug)

    @jax.jit
    def batch_accuracy(params, model_state, dataset, start):
      ids = start + jnp.arange(self.tasks)
      task_keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(ids)
      episode = episodes.sample_tasks(task_keys, dataset, **sampling)
      episode = jax.lax.with_sharding_constraint(episode, batch_sharding)
      logits = method.predict(params, model_state, episode, jax.random.fold_in(predict_key, start))
      return jnp.mean(jnp.argmax(logits, -1) == episode.query_labels, axis=-1)

    self._batch_accuracy = batch_accuracy

  def per_episode(self, params, model_state) -> np.ndarray:
    accs = [self._batch_accuracy(params, model_state, self.dataset, start)
            for start in range(0, self.num_episodes, self.tasks)]
    return np.concatenate(jax.device_get(accs))[:self.num_episodes]

  def run(self, params, model_state) -> dict:
    return summarize(self.per_episode(params, model_state))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the best (or latest) checkpoint on eval.split; writes <workdir>/eval_<split>.json."""
  config_lib.validate(config)
  mesh = sharding.make_mesh()
  method, state = checkpoint.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  evaluator = Evaluator(method, config, mesh, config.eval.split, config.eval.episodes)
  result = {"method": config.method.name, "dataset": config.data.name, "split": config.eval.split,
            "ways": config.episode.ways, "shots": config.episode.shots, "queries": config.eval.queries,
            **evaluator.run(state.params, state.model_state), "step": int(state.step)}
  checkpoint.write_json(os.path.join(workdir, f"eval_{config.eval.split}.json"), result)
  return result
