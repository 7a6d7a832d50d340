"""A workdir's model: the method its config builds and the state its checkpoint holds.

Above both methods/ (which know models) and checkpoint.py (which knows states
and files): every entry point that reads a trained model (evaluate, compare,
export, benchmarks) comes through here.
"""

import functools

import jax

from fewshot_jax import checkpoint
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import state as state_lib


def abstract_state(method, config):
  """The shapes and dtypes of a fresh TrainState of `method` (nothing is computed)."""
  tx = state_lib.optimizer_for(method, config)
  example = state_lib.train_example(method, config)
  return jax.eval_shape(functools.partial(state_lib.init_state, method, tx), jax.random.key(0), example)


def variable_shapes(config) -> dict:
  """{'params', 'batch_stats', ...}: the shapes of the variables of config's model."""
  abstract = abstract_state(methods.build(config), config)
  return {"params": abstract.params, **abstract.model_state}


def load_for_eval(config, workdir, mesh, which: str, step: int | None = None):
  """(method, state) of the best (or latest) checkpoint in workdir, replicated over `mesh`.

  `step`: a retained step of the latest manager instead (which='latest'), for
  curves over a run's checkpoints.
  """
  method = methods.build(config)
  abstract = abstract_state(method, config)
  ckpt, manager, step = checkpoint.open_step(workdir, which, config.train.keep_checkpoints, step)
  try:
    state = checkpoint.restore(manager, checkpoint.abstract_like(abstract, sharding.replicated(mesh)), config, step)
  finally:
    ckpt.close()
  return method, state
