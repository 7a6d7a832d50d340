"""Method registry: config.method.name -> build(config) -> Method.

A method is its own files (methods/<name>.py, optionally methods/<name>_torch.py
for its PyTorch bridge), one line in METHODS and a config file
(configs/<name>.py). Each method module declares `KEYS` (every key it reads
under method.*) and may define `check_config(config)`; config.validate runs them.
"""

import importlib

from fewshot_jax.errors import ConfigError

METHODS = ("protonet", "matchingnet", "lgmnet", "idemenet", "idemenet_pretrain")


def module(name: str):
  if name not in METHODS:
    raise ConfigError(f"method.name={name!r} is unknown; valid: {list(METHODS)}")
  return importlib.import_module(f"fewshot_jax.methods.{name}")


def check_config(config) -> None:
  """Every key under method.* is one the method declares, none is missing, and the method's own
  checks pass (called by config.validate)."""
  mod = module(config.method.name)
  declared = ("name",) + tuple(mod.KEYS)
  unknown = [k for k in config.method if k not in declared]
  if unknown:
    raise ConfigError(f"method.{unknown[0]} is not a key of method.name={config.method.name!r}; "
                      f"valid: {sorted(declared)}")
  missing = [k for k in declared if k not in config.method]
  if missing:
    raise ConfigError(f"method.name={config.method.name!r} needs method.{', method.'.join(missing)}; "
                      f"start from configs/{config.method.name.split('_')[0]}.py")
  check = getattr(mod, "check_config", None)
  if check is not None:
    check(config)


def build(config):
  return module(config.method.name).build(config)


def torch_bridge(method, mode: str):
  """The method's TorchBridge (imports torch), or one ConfigError for a method without one."""
  if method.torch_bridge is None:
    raise ConfigError(f"--mode={mode} needs a PyTorch bridge (methods/<name>_torch.py), which "
                      f"method.name={method.name!r} has not")
  from fewshot_jax import state_dicts  # pylint: disable=import-outside-toplevel
  state_dicts.torch_module()
  return method.torch_bridge()
