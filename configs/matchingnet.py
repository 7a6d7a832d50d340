"""MatchingNet (Conv-4, no FCE) presets: `--config=configs/matchingnet.py:<preset>`.

Same data and episodes as configs/protonet.py; only the method differs, so the
two baselines are directly comparable.
"""

import importlib.util
import os



def _protonet():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protonet.py")
  spec = importlib.util.spec_from_file_location("_fewshot_protonet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


PRESETS = _protonet().PRESETS


def get_config(preset: str = "synthetic"):
  c = _protonet().get_config(preset)
  c.method.name = "matchingnet"
  c.method.update(cosine_scale=1.0, eps=1e-8)
  return c
