"""LGM-Net's PyTorch bridge: torch_reference/lgmnet.py (whose attribute names are the Flax module
names: extractor.conv1.weight, weight_generator.layer1.bias, ...) <-> our variables, and the
PyTorch forward that --mode=compare scores in every prediction mode.

For compare the noise of every mode ('single', 'mean', 'ensemble') is JAX's, drawn
from the same key as predict_all_modes draws it, so both frameworks score the
very same generated networks; PyTorch computes everything else (extractor,
context encoder, weight generator, TargetNet, matching, majority vote).
"""

import ml_collections
import numpy as np
import torch

from fewshot_jax import state_dicts
from fewshot_jax.errors import ConfigError
from fewshot_jax.methods import lgmnet
from fewshot_jax.torch_reference import lgmnet as torch_lgmnet


def _vote(log_p, ways: int):
  """methods/lgmnet.vote in torch: votes per class + half the softmax of the mean log-probability."""
  counts = torch.nn.functional.one_hot(log_p.argmax(-1), ways).float().sum(0)
  return counts + 0.5 * torch.softmax(log_p.mean(0), dim=-1)


def bridge(config: ml_collections.ConfigDict, shapes) -> state_dicts.TorchBridge:
  method = lgmnet.build(config)
  channels = shapes["params"]["extractor"]["conv1"]["kernel"].shape[2]
  shapes = {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
  draws = config.method.ensemble_draws

  def from_torch(state_dict, source="state_dict"):
    return state_dicts.Spec().flax_names(shapes).convert(state_dict, source, "LGM-Net (torch_reference)")

  def to_torch(params, state):
    net = torch_lgmnet.LGMNet.from_config(config, channels)
    state_dicts.load_into_torch(net, {"params": params, "batch_stats": state["batch_stats"]}, from_torch,
                                what="LGM-Net")
    return net.float().eval()

  def jax_extras(params, state, episode, keys):
    """The noise of every mode as predict_all_modes draws it from the tasks' `keys`, task-major [T, D, L, Z]."""
    del params, state, episode
    return {m: lgmnet.task_noise(keys, m, method.noise_shape(1)[1:], draws) for m in lgmnet.EVAL_MODES}

  def logits(net, ep, noise, device, chunk):
    del chunk
    if config.method.kernel_layout != "hwio":
      raise ConfigError(f"method.kernel_layout={config.method.kernel_layout!r}: the PyTorch reference reads "
                        "generated kernels as 'hwio' only")
    ways = int(ep["ways"])
    with state_dicts.float32_torch():
      net = net.to(device)
      support = state_dicts.nchw(ep["support"], device).reshape(ep["support"].shape[:2] + (-1,) +
                                                                 ep["support"].shape[2:4])
      query = state_dicts.nchw(ep["query"], device).reshape(ep["query"].shape[:2] + (-1,) + ep["query"].shape[2:4])
      labels = torch.from_numpy(np.asarray(ep["support_labels"], np.int64)).to(device)
      out = {}
      for mode, z in noise.items():
        z = np.swapaxes(np.asarray(z, np.float32), 0, 1)  # [D, T, L, Z]
        log_p = torch.stack([net(support, labels, query, ways, torch.from_numpy(np.array(d, order="C")).to(device))
                             for d in z]).cpu()
        out[mode] = _vote(log_p, ways) if mode == "ensemble" else log_p[0]
      return out

  return state_dicts.TorchBridge(from_torch=from_torch, to_torch=to_torch, logits=logits, jax_extras=jax_extras)
