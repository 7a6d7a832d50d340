"""Backbone selection from `config.model`."""

import jax.numpy as jnp
import ml_collections

from fewshot_jax.errors import ConfigError
from fewshot_jax.models import layers
from fewshot_jax.models.conv4 import Conv4


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype


def dtype_from_config(config: ml_collections.ConfigDict):
  """model.dtype, checked (config.validate calls this first)."""
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={config.model.dtype!r} is not supported; valid: {sorted(DTYPES)}")
  return DTYPES[config.model.dtype]


def remat_from_config(config: ml_collections.ConfigDict) -> bool:
  """model.remat, checked: every backbone's blocks are recomputed in the backward pass when True."""
  remat = config.model.remat
  if not isinstance(remat, bool):
    raise ConfigError(f"model.remat={remat!r} must be True or False")
  return remat


def conv4(config: ml_collections.ConfigDict) -> Conv4:
  return Conv4(features=config.model.features, dtype=dtype_from_config(config),
               conv_general_dilated=layers.conv_function(config.model.conv_impl), remat=remat_from_config(config))


# model.backbone -> its network, for the methods that take one (they list these names as their
# BACKBONES, which methods.check_config checks).
NETWORKS = {"conv4": conv4}
BACKBONES = tuple(NETWORKS)


def from_config(config: ml_collections.ConfigDict):
  """The network of model.backbone (one of BACKBONES)."""
  return NETWORKS[config.model.backbone](config)
