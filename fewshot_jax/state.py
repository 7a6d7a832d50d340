"""Train state and the optax optimiser built from `config.train`."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # non-trainable collections, e.g. {'batch_stats': ...}
  opt_state: Any


# train.schedule -> its optax schedule of train.* (config.SCHEDULES: config.validate checks the name).
SCHEDULES = {
    "constant": lambda tc: optax.constant_schedule(tc.lr),
    "step": lambda tc: optax.exponential_decay(tc.lr, tc.decay_every, tc.decay_factor, staircase=True,
                                               end_value=tc.get("min_lr") or None),
    "cosine": lambda tc: optax.cosine_decay_schedule(tc.lr, max(1, tc.steps - tc.warmup_steps)),
}
# train.optimizer -> its optax optimiser of (schedule, train.*) (config.OPTIMIZERS, likewise checked).
OPTIMIZERS = {
    "adam": lambda schedule, tc: optax.adam(schedule),
    "adamw": lambda schedule, tc: optax.adamw(schedule, weight_decay=tc.weight_decay),
    "sgd": lambda schedule, tc: optax.sgd(schedule, momentum=0.9, nesterov=True),
}


def learning_rate_schedule(tc: ml_collections.ConfigDict) -> optax.Schedule:
  """optax schedule from train.schedule: 'constant', 'step' (staircase decay), 'cosine'."""
  schedule = SCHEDULES[tc.schedule](tc)
  if tc.warmup_steps:
    warmup = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    schedule = optax.join_schedules([warmup, schedule], [tc.warmup_steps])
  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  tc = config.train
  schedule = learning_rate_schedule(tc)
  opt = OPTIMIZERS[tc.optimizer](schedule, tc)
  if tc.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  return opt


def init_state(method, tx, key, example) -> TrainState:
  """Fresh parameters, model state and optimiser state for a shape-only example episode."""
  example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
  variables = method.init(key, example)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params))


def optimizer_for(method, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The method's own optimiser (per-module learning rates, frozen parts) or the default one."""
  return method.optimizer(config) if method.optimizer is not None else make_optimizer(config)


def train_example(method, config: ml_collections.ConfigDict):
  """Shapes of one training batch: the method's own, or T episodes of config.episode.*."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import episodes  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  if method.train_example is not None:
    return method.train_example()
  return episodes.episode_shapes(config_lib.train_ways(config), config.episode.shots,
                                 config.episode.queries, config.episode.tasks,
                                 input_pipeline.input_shape(config), config.episode.query_sampling)


def images_per_task(example, tasks: int) -> float:
  """Images in one task of a batch (every leaf of rank >= 4 is a stack of images)."""
  leaves = [x for x in jax.tree.leaves(example) if len(x.shape) >= 4]
  return sum(int(np.prod(x.shape[:-3])) for x in leaves) / max(1, tasks)
