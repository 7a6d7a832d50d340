"""Method registry: config.method.name -> build(config) -> Method."""

import importlib

from fewshot_jax.errors import ConfigError

METHODS = ("protonet", "matchingnet", "lgmnet", "idemenet", "idemenet_pretrain")


def build(config):
  name = config.method.name
  if name not in METHODS:
    raise ConfigError(f"method.name={name!r} is unknown; valid: {list(METHODS)}")
  return importlib.import_module(f"fewshot_jax.methods.{name}").build(config)
