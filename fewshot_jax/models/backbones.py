"""Backbone selection from `config.model`."""

import jax.numpy as jnp
import ml_collections

from fewshot_jax.errors import ConfigError
from fewshot_jax.models import layers
from fewshot_jax.models.conv4 import Conv4

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_config(config: ml_collections.ConfigDict):
  if config.model.dtype not in _DTYPES:
    raise ConfigError(f"model.dtype={config.model.dtype!r} is not supported; valid: {sorted(_DTYPES)}")
  return _DTYPES[config.model.dtype]


def remat_from_config(config: ml_collections.ConfigDict) -> bool:
  """model.remat, checked: every backbone's blocks are recomputed in the backward pass when True."""
  remat = config.model.remat
  if not isinstance(remat, bool):
    raise ConfigError(f"model.remat={remat!r} must be True or False")
  return remat


def from_config(config: ml_collections.ConfigDict):
  name = config.model.backbone
  impl = config.model.conv_impl
  if impl not in ("auto", "xla", "matmul_wgrad"):
    raise ConfigError(f"model.conv_impl={impl!r} is unknown; valid: ['auto', 'xla', 'matmul_wgrad']")
  if name == "conv4":
    return Conv4(features=config.model.features, dtype=dtype_from_config(config),
                 conv_general_dilated=layers.conv_function(impl), remat=remat_from_config(config))
  raise ConfigError(f"model.backbone={name!r} is unknown; valid: ['conv4']")
