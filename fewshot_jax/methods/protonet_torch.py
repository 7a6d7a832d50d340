"""ProtoNet's PyTorch bridge: the Conv-4 reference (torch_reference/conv4.py, the
prototypical-networks key layout encoder.{i}.0 conv / encoder.{i}.1 BN) <-> our Conv-4
variables, and prototype logits computed by PyTorch for --mode=compare.

`metric_bridge` serves every method built by common.metric_method on the Conv-4
backbone: only the per-task head differs (MatchingNet: methods/matchingnet_torch.py).
"""

from collections.abc import Mapping
from typing import Callable

import ml_collections
import numpy as np
import torch

from fewshot_jax import state_dicts
from fewshot_jax.errors import ConfigError
from fewshot_jax.torch_reference import conv4 as torch_conv4


def conv4_from_torch(state_dict: Mapping, in_channels: int = 3, features: int = 64, blocks: int = 4,
                     source: str = "state_dict") -> dict:
  """torch_reference.conv4.Conv4 / prototypical-networks state_dict (encoder.{i}.0 conv,
  encoder.{i}.1 BN) -> models.conv4.Conv4 variables (Conv_i, BatchNorm_i)."""
  spec = state_dicts.Spec()
  for i in range(blocks):
    spec.conv(f"encoder.{i}.0", (f"Conv_{i}",), features, in_channels if i == 0 else features, 3, bias=True)
    spec.batchnorm(f"encoder.{i}.1", (f"BatchNorm_{i}",), features)
  return spec.convert(state_dict, source, f"Conv-{blocks}")


def metric_bridge(config: ml_collections.ConfigDict, shapes, head: Callable) -> state_dicts.TorchBridge:
  """Conv-4 embeddings in PyTorch, then head(support [T, S, D], labels [T, S], query [T, Q, D],
  ways) -> logits [T, Q, N] (torch), the counterpart of the method's JAX head. `shapes`: the
  model's variables (or their eval_shape), which give the input channels."""
  if config.model.backbone != "conv4":
    raise ConfigError(f"model.backbone={config.model.backbone!r} has no PyTorch reference; valid: ['conv4']")
  channels = shapes["params"]["Conv_0"]["kernel"].shape[2]
  features = config.model.features
  from_torch = lambda sd, source="state_dict": conv4_from_torch(sd, channels, features, source=source)

  def to_torch(params, state):
    net = torch_conv4.Conv4(in_channels=channels, features=features)
    state_dicts.load_into_torch(net, {"params": params, "batch_stats": state["batch_stats"]}, from_torch,
                                what="Conv-4")
    return net.float().eval()

  def logits(net, ep, extras, device, chunk):
    del extras
    t, s = ep["support"].shape[:2]
    q = ep["query"].shape[1]
    with state_dicts.float32_torch():
      sf = state_dicts.chunked(net, ep["support"], chunk=chunk, device=device).reshape(t, s, -1)
      qf = state_dicts.chunked(net, ep["query"], chunk=chunk, device=device).reshape(t, q, -1)
      labels = torch.from_numpy(np.asarray(ep["support_labels"], np.int64))
      return {"default": head(sf, labels, qf, int(ep["ways"]))}

  return state_dicts.TorchBridge(from_torch=from_torch, to_torch=to_torch, logits=logits)


def bridge(config: ml_collections.ConfigDict, shapes) -> state_dicts.TorchBridge:
  def head(support, labels, query, ways):
    return torch.stack([state_dicts.prototype_logits(torch, support[i], labels[i], query[i], ways)
                        for i in range(support.shape[0])])
  return metric_bridge(config, shapes, head)
