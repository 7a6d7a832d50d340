"""Episodic evaluation: mean accuracy over E episodes with a 95% confidence interval.

Episode i is drawn from fold_in(sample key, i) and predicted with the noise of
fold_in(predict key, i), so every method, checkpoint, batch size, device count
and process count is scored on the very same episodes with the very same
prediction noise.

An evaluation is ONE compiled call: a lax.scan over its batches of eval.tasks
episodes, accuracies kept sharded on the task axis and gathered once at the
end. The earlier evaluator dispatched one jitted call per batch, each ending in
an all-gather of its accuracies; those calls do not depend on one another, so
XLA ran many of them at once, and their collectives met in different orders on
different devices: XLA:CPU's in-process rendezvous timed out after 40 s (one
process, 4 devices, 150 batches) and gloo waited forever (2 processes, 400
episodes and more). One call has one collective, in one order, everywhere.
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
from fewshot_jax import watchdog
from fewshot_jax.data import augment
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.methods import common


def summarize(per_episode: np.ndarray) -> dict:
  """Accuracy and 1.96 * std / sqrt(E), both in percent."""
  acc = 100.0 * np.asarray(per_episode, np.float64)
  return {"accuracy": float(acc.mean()), "ci95": float(1.96 * acc.std() / math.sqrt(len(acc))),
          "episodes": int(len(acc))}


def episode_keys(config: ml_collections.ConfigDict):
  """(sample key, predict key) of evaluation: episode i is drawn from fold_in(sample key, i) and
  predicted with fold_in(predict key, i) (indexed_keys), so every method, checkpoint, batch size,
  device count and framework (compare.py) sees the same episodes and the same prediction noise."""
  return tuple(jax.random.split(jax.random.key(config.eval.seed)))


def indexed_keys(key, start, tasks: int):
  """[tasks] keys fold_in(key, i) for episodes i = start .. start + tasks - 1 (traceable)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(tasks))


def standard_sampling(config: ml_collections.ConfigDict) -> dict:
  """sample_tasks' settings of the standard protocol: eval.queries queries of every class, no augmentation."""
  return input_pipeline.episode_sampling(config, training=False, queries=config.eval.queries,
                                         query_sampling="per_class")


STANDARD = common.Protocol(sampling=standard_sampling, episodes=lambda config: config.eval.episodes)


def protocols(method) -> dict:
  """{name: common.Protocol} of the protocols `method` is evaluated under: the standard one and its own."""
  return {common.STANDARD_PROTOCOL: STANDARD, **method.protocols}


def sample_batch(sample_key, dataset, start, tasks: int, **sampling):
  """Episodes start .. start + tasks - 1 of `dataset` (traceable; `sampling` as sample_tasks)."""
  return episodes.sample_tasks(indexed_keys(sample_key, start, tasks), dataset, **sampling)


class Evaluator:
  """Scores (params, model_state) on `num_episodes` episodes of one split under one protocol.

  'standard': N-way K-shot episodes with eval.queries queries per class and no
  augmentation; a method may add its own (Method.protocols: how their episodes are
  sampled and how many --mode=eval scores). Every prediction mode of the method is
  scored on the same episodes and the same noise.
  """

  def __init__(self, method, config: ml_collections.ConfigDict, mesh, split: str, num_episodes: int,
               dataset: episodes.DeviceDataset | None = None, protocol: str | None = None):
    if dataset is None:
      dataset = input_pipeline.load(config, split, mesh)
    self.dataset = dataset
    self.mesh = mesh
    self.protocol = protocol or config.eval.protocol  # config.validate checked eval.protocol
    sampling = protocols(method)[self.protocol].sampling(config)
    ways, queries = sampling["ways"], sampling["queries"]
    episodes.check_episode_fits(self.dataset, ways, sampling["shots"], queries, split,
                                ("episode.ways", "episode.shots", "eval.queries"))
    self.tasks = config.eval.tasks
    sharding.check_tasks_divisible(self.tasks, mesh, "eval.tasks")
    self.num_episodes = num_episodes
    self.queries = queries if sampling["query_sampling"] == "per_task" else queries * ways  # per episode
    self.default_mode = method.checkpoint_mode(config)
    batch_sharding = sharding.task_sharded(mesh)
    sample_key, predict_key = episode_keys(config)
    self.predict_key = predict_key

    def sample(dataset, start):
      episode = sample_batch(sample_key, dataset, start, self.tasks, **sampling)
      return jax.lax.with_sharding_constraint(episode, batch_sharding)

    replicated = sharding.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=replicated)  # gathered once, readable by every process
    def accuracies(params, model_state, dataset):
      starts = jnp.arange(0, self.num_episodes, self.tasks, dtype=jnp.int32)

      def one_batch(carry, start):
        episode = sample(dataset, start)
        logits = method.modes(params, model_state, episode, indexed_keys(predict_key, start, self.tasks))
        return carry, {m: jnp.mean(jnp.argmax(l, -1) == episode.query_labels, axis=-1) for m, l in logits.items()}

      return jax.lax.scan(one_batch, None, starts)[1]  # {mode: [batches, tasks]}, task axis sharded

    self._accuracies = accuracies
    self.sample = jax.jit(sample, out_shardings=replicated)

  def episode_batches(self):
    """(start, Episode batch of eval.tasks tasks) of every batch scored, as `per_episode` samples them
    (one call each, waited for: for the PyTorch comparison, not for scoring)."""
    for start in range(0, self.num_episodes, self.tasks):
      yield start, jax.block_until_ready(self.sample(self.dataset, start))

  def per_episode(self, params, model_state) -> dict:
    """{mode: accuracy of each episode [num_episodes]}: one compiled call."""
    accs = jax.device_get(self._accuracies(params, model_state, self.dataset))
    return {m: np.asarray(a).reshape(-1)[:self.num_episodes] for m, a in accs.items()}

  def run(self, params, model_state) -> dict:
    """The default mode's summary, plus `modes`: {mode: summary} for every mode."""
    modes = {m: summarize(a) for m, a in self.per_episode(params, model_state).items()}
    head = modes.get(self.default_mode, next(iter(modes.values())))
    return {**head, "protocol": self.protocol, "queries_per_episode": self.queries,
            "mode": self.default_mode if self.default_mode in modes else next(iter(modes)),
            "modes": modes}


def eval_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The config whose data.* reads a cross-domain evaluation's dataset (config_lib.parse_eval_data), or None
  in-domain: the named dataset's record (its builder, stored size and channels, default scheme, options,
  placement) with its files in eval.data_manual_dir, else its folder under $FEWSHOT_DATA_DIR; data.data_dir
  (where prepared datasets are kept) stays the training config's."""
  name, _ = config_lib.parse_eval_data(config)
  if name == config.data.name:
    return None
  source = config.copy_and_resolve_references()
  with source.unlocked():
    source.data = config_lib.base_config().data
    config_lib.apply_dataset(source, name)
    source.data.data_dir = config.data.data_dir
    source.data.manual_dir = config.eval.get("data_manual_dir") or config_lib.default_manual_dir(name)
  return source


def load_eval(config: ml_collections.ConfigDict, mesh=None) -> episodes.DeviceDataset:
  """The split evaluation scores (config_lib.parse_eval_data) on the devices of `mesh`.

  Cross-domain, the other dataset's split is read as eval_source says and its images converted to the
  training data's channel count (augment.to_channels); the evaluator then resizes them to the model's input
  size and normalises them with the training data.mean / data.std, as it does the training data's.
  """
  _, split = config_lib.parse_eval_data(config)
  source = eval_source(config)
  if source is None:
    return input_pipeline.load(config, split, mesh)
  dataset = input_pipeline.load(source, split, mesh)
  convert = jax.jit(lambda x: augment.to_channels(x, input_pipeline.channels(config)), out_shardings=dataset.images.sharding)
  return dataset.replace(images=convert(dataset.images))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, watch=None) -> dict:
  """Scores the best (or latest) checkpoint on eval.split under eval.protocol.

  Adds the result to <workdir>/eval_<split>.json under `result_key` (protocol,
  task, queries, checkpoint; cross-domain the evaluated dataset first), so
  evaluations of other tasks, protocols or datasets accumulate beside it. The
  protocol says how many episodes it scores (the standard one eval.episodes).
  eval.data names another dataset's split (cross-domain: evaluate.load_eval);
  the checkpoint is still checked against the training data.* (config.data).
  `watch` (watchdog.Watchdog) bounds the scoring.
  """
  config, mesh = sharding.setup(config)
  method, state = restore.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  num = protocols(method)[config.eval.protocol].episodes(config)
  name, split = config_lib.parse_eval_data(config)
  evaluator = Evaluator(method, config, mesh, split, num, dataset=load_eval(config, mesh))
  what = split if name == config.data.name else f"{name}:{split}"
  with (watch or watchdog.NoWatchdog()).phase(f"the {what} evaluation"):
    result = {"method": config.method.name, "dataset": config.data.name, "split": split,
              "eval_data": f"{name}:{split}", "ways": config.episode.ways, "shots": config.episode.shots,
              **evaluator.run(state.params, state.model_state), "step": int(state.step),
              "checkpoint": config.eval.checkpoint}
    if method.figures is not None:
      result.update(write_figures(method, state, config, evaluator, workdir, what.replace(":", "_")))
  if not multihost.is_main():
    return result
  path = os.path.join(workdir, f"eval_{split}.json")
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
  """'standard/5w1s/75q/best': what an entry of eval_<split>.json measured; a cross-domain entry (its
  eval_data another dataset than the training one) starts with it: 'NAME:SPLIT/standard/5w1s/75q/best'."""
  key = (f"{result['protocol']}/{result['ways']}w{result['shots']}s/{result['queries_per_episode']}q/"
         f"{result['checkpoint']}")
  data = result.get("eval_data", "")
  return key if not data or data.partition(":")[0] == result["dataset"] else f"{data}/{key}"


def write_figures(method, state, config, evaluator: Evaluator, workdir: str, tag: str) -> dict:
  """The method's evaluation figures, on the first eval.tasks episodes of the standard protocol
  (with one query per class), so the figure of every checkpoint shows the same supports."""
  sampling = {**standard_sampling(config), "queries": 1}
  sample_key, _ = episode_keys(config)

  @functools.partial(jax.jit, out_shardings=sharding.replicated(evaluator.mesh))  # readable by every process
  def figure_data(params, model_state, dataset):
    episode = sample_batch(sample_key, dataset, 0, config.eval.tasks, **sampling)
    keys = jax.random.split(jax.random.key(config.eval.seed), config.eval.tasks)  # one per task
    return method.figures.compute(params, model_state, episode, keys)

  data = jax.device_get(figure_data(state.params, state.model_state, evaluator.dataset))
  title = f"{config.method.name} step {int(state.step)}, {tag} episodes"
  return method.figures.write(data, workdir, tag, title)
