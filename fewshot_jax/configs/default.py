"""The launcher's default job (launch.py without --config): ProtoNet on the procedural
`synthetic` dataset, which needs no files; the presets are configs/protonet.py's."""

import os

from fewshot_jax import config as base

_PROTONET = base.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "protonet.py"))
PRESETS = _PROTONET.PRESETS


def get_config(preset: str = "synthetic"):
  return _PROTONET.get_config(preset)
