"""MatchingNet (Conv-4, no FCE) presets: `--config=configs/matchingnet.py:<preset>`.

Same data and episodes as configs/protonet.py; only the method differs, so the
two baselines are directly comparable.
"""

import os

from fewshot_jax import config as base

_PROTONET = base.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "protonet.py"))
PRESETS = _PROTONET.PRESETS


def get_config(preset: str = "synthetic"):
  c = _PROTONET.get_config(preset)
  c.method.name = "matchingnet"
  c.method.update(
      cosine_scale=1.0,  # softmax of plain cosine similarities (Vinyals et al.: no temperature)
      eps=1e-8)  # log(p + eps) and the cosine's norm floor
  return c
