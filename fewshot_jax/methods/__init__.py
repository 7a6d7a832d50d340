"""Method registry: config.method.name -> build(config) -> Method.

A method is its own files (methods/<name>.py, optionally methods/<name>_torch.py
for its PyTorch bridge: a function bridge(config, shapes) -> state_dicts.TorchBridge),
one line in METHODS and a config file
(configs/<name>.py). Each method module declares `KEYS` (every key it reads
under method.*) and `BACKBONES` (the model.backbone values it builds), may list
`UNUSED_TRAIN_KEYS`, declare `PROTOCOLS` (its own evaluation protocols, {name: common.Protocol},
which its build puts on the Method record) and define `check_config(config)`; config.validate runs them.
"""

import importlib
import importlib.util

from fewshot_jax.errors import ConfigError
from fewshot_jax.methods import common

METHODS = ("protonet", "matchingnet", "lgmnet", "idemenet", "idemenet_pretrain")


def module(name: str):
  if name not in METHODS:
    raise ConfigError(f"method.name={name!r} is unknown; valid: {list(METHODS)}")
  return importlib.import_module(f"fewshot_jax.methods.{name}")


def check_config(config, train_defaults=None) -> None:
  """Called by config.validate: every key under method.* is `name` or one the method declares
  (KEYS), none is missing, model.backbone is one of its BACKBONES, eval.protocol is the standard
  protocol or one of its PROTOCOLS, no train.* key its own optimiser ignores (UNUSED_TRAIN_KEYS)
  differs from `train_defaults`, and its own checks pass."""
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
  if config.model.backbone not in mod.BACKBONES:
    raise ConfigError(f"model.backbone={config.model.backbone!r} is not a network of "
                      f"method.name={config.method.name!r}; valid: {list(mod.BACKBONES)}")
  protocols = [common.STANDARD_PROTOCOL, *getattr(mod, "PROTOCOLS", {})]
  if config.eval.protocol not in protocols:
    raise ConfigError(f"eval.protocol={config.eval.protocol!r} is not a protocol of "
                      f"method.name={config.method.name!r}; valid: {protocols}")
  for key in getattr(mod, "UNUSED_TRAIN_KEYS", ()) if train_defaults is not None else ():
    if config.train[key] != train_defaults[key]:
      raise ConfigError(f"train.{key}={config.train[key]!r} is not read by method.name={config.method.name!r}, "
                        f"whose optimiser takes its settings from method.*; leave train.{key} at "
                        f"{train_defaults[key]!r}")
  check = getattr(mod, "check_config", None)
  if check is not None:
    check(config)


def build(config):
  """The method of config.method.name, its keys checked first (config.validate checks more)."""
  check_config(config)
  return module(config.method.name).build(config)


def torch_bridge_module(name: str):
  """methods/<name>_torch.py, the method's PyTorch bridge, or None where it has none."""
  path = f"fewshot_jax.methods.{name}_torch"
  if importlib.util.find_spec(path) is None:
    return None
  return importlib.import_module(path)


def torch_bridge(config, shapes, mode: str):
  """The TorchBridge of config's method (imports torch), or one ConfigError for a method without
  one. `shapes`: the model's variables {'params', 'batch_stats', ...} or their jax.eval_shape."""
  from fewshot_jax import state_dicts  # pylint: disable=import-outside-toplevel
  name = config.method.name
  module(name)
  state_dicts.torch_module()
  bridge_module = torch_bridge_module(name)
  if bridge_module is None:
    raise ConfigError(f"--mode={mode} needs a PyTorch bridge (methods/<name>_torch.py), which "
                      f"method.name={name!r} has not")
  return bridge_module.bridge(config, shapes)
