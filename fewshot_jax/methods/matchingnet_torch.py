"""MatchingNet's PyTorch bridge: the Conv-4 reference as ProtoNet's, with the matching head
(softmax over supports of scaled cosine similarities, log of the weighted one-hot labels)."""

import ml_collections

from fewshot_jax import state_dicts
from fewshot_jax.methods import protonet_torch
from fewshot_jax.torch_reference.lgmnet import cosine_matching


def bridge(config: ml_collections.ConfigDict, shapes) -> state_dicts.TorchBridge:
  scale, eps = config.method.cosine_scale, config.method.eps
  head = lambda support, labels, query, ways: cosine_matching(query, support, labels, ways, scale, eps)
  return protonet_torch.metric_bridge(config, shapes, head)
