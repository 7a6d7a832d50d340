"""LGM-Net (Li et al., ICML 2019) in PyTorch (NCHW), written from the method's
description; a reference for parity tests of fewshot_jax's Flax version and
for speed comparison.

Same numerics as the Flax version and the authors' TF code: TF BatchNorm
(decay 0.99 = torch momentum 0.01, eps 1e-3, moving variance from the biased
batch variance), TF 'SAME' 2x2/2 max-pools (odd sizes padded at the bottom /
right: 11 -> 6), glorot-uniform kernels with zero biases. The TargetNet runs
every task's generated weights at once as ONE grouped convolution (tasks
stacked on the channel axis, groups = T). Embeddings are flattened in torch's
(C, H, W) order rather than TF's (H, W, C); cosine similarities, and so the
log-probabilities, do not depend on that order.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def max_pool_2x2_same(x):
  """TF 'SAME' 2x2/2 max-pool: ceil_mode keeps the last, partial window (no padding value enters)."""
  return F.max_pool2d(x, 2, 2, ceil_mode=True)


def _glorot_(layer):
  nn.init.xavier_uniform_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


class BatchNorm2d(nn.BatchNorm2d):
  """nn.BatchNorm2d with TF's moving-variance update.

  TF (and Flax) average the biased batch variance into the moving variance;
  torch averages the unbiased one (n / (n - 1) larger, visible for the context
  encoder's few positions). Torch's fused kernel updates a copy of the buffer
  (the autograd graph keeps that copy), and the buffer gets TF's value: with
  torch's new = (1-m) old + m v n/(n-1), TF's is ((n-1) new + (1-m) old) / n.
  """

  def __init__(self, channels: int, decay: float = 0.99, eps: float = 1e-3):
    super().__init__(channels, eps=eps, momentum=1.0 - decay)

  def forward(self, x):
    if not (self.training and self.track_running_stats):
      return super().forward(x)
    var = self.running_var.clone()
    y = F.batch_norm(x, self.running_mean, var, self.weight, self.bias, True, self.momentum, self.eps)
    n = x.numel() // x.shape[1]
    with torch.no_grad():
      tf_var = torch.add(var * ((n - 1) / n), self.running_var, alpha=(1.0 - self.momentum) / n)
      self.running_var.copy_(tf_var)
      self.num_batches_tracked.add_(1)
    return y


class Extractor(nn.Module):
  """Shared extractor: 4 x [conv3x3 SAME, BatchNorm, ReLU], SAME max-pool after blocks 1-3
  (84 -> 42 -> 21 -> 11), dropout after block 1. Intertask BatchNorm comes from
  the caller passing every image of every task as one batch."""

  def __init__(self, in_channels: int, features: int = 64, blocks: int = 4, pooled_blocks: int = 3,
               bn_decay: float = 0.99, bn_eps: float = 1e-3, dropout_rate: float = 0.0):
    super().__init__()
    self.blocks, self.pooled_blocks = blocks, pooled_blocks
    for i in range(blocks):
      self.add_module(f"conv{i + 1}", _glorot_(nn.Conv2d(in_channels if i == 0 else features, features,
                                                         3, padding="same")))
      self.add_module(f"bn{i + 1}", BatchNorm2d(features, bn_decay, bn_eps))
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x):
    for i in range(self.blocks):
      x = F.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(x)))
      if i < self.pooled_blocks:
        x = max_pool_2x2_same(x)
      if i == 0:
        x = self.dropout(x)
    return x


class TaskContextEncoder(nn.Module):
  """Per support map: 2 x [conv3x3, ReLU, BatchNorm, SAME max-pool] (11 -> 6 -> 3), conv3x3,
  spatial mean -> [B, context_dim]. The caller averages a task's rows into c."""

  def __init__(self, in_channels: int = 64, features: int = 64, context_dim: int = 64,
               bn_decay: float = 0.99, bn_eps: float = 1e-3):
    super().__init__()
    self.conv1 = _glorot_(nn.Conv2d(in_channels, features, 3, padding="same"))
    self.bn1 = BatchNorm2d(features, bn_decay, bn_eps)
    self.conv2 = _glorot_(nn.Conv2d(features, features, 3, padding="same"))
    self.bn2 = BatchNorm2d(features, bn_decay, bn_eps)
    self.conv3 = _glorot_(nn.Conv2d(features, context_dim, 3, padding="same"))

  def forward(self, x):
    x = max_pool_2x2_same(self.bn1(F.relu(self.conv1(x))))
    x = max_pool_2x2_same(self.bn2(F.relu(self.conv2(x))))
    return self.conv3(x).mean(dim=(-2, -1))


class WeightGenerator(nn.Module):
  """One nn.Linear z -> (kernel, bias) per TargetNet layer.

  layer_shapes: (N, C_in, kh, kw) of each generated convolution (torch's OIHW).
  forward(mu [T, Z], log_var [T, Z], noise [T, L, Z]) -> (kernels, biases):
  z_l = mu + exp(log_var / 2) * noise_l; of the (M + 1) * N outputs
  (M = C_in * kh * kw) the first M * N are the kernel read as (N, C_in, kh, kw),
  which is already the OIHW layout F.conv2d takes, each output filter
  L2-normalised as x / sqrt(max(sum x^2, l2_eps)) (tf.nn.l2_normalize); the
  last N are the bias, not normalised.
  """

  def __init__(self, z_dim: int, layer_shapes: Sequence[Sequence[int]], l2_eps: float = 1e-12):
    super().__init__()
    self.layer_shapes = tuple(tuple(s) for s in layer_shapes)
    self.l2_eps = l2_eps
    for l, (n, cin, kh, kw) in enumerate(self.layer_shapes):
      self.add_module(f"layer{l + 1}", _glorot_(nn.Linear(z_dim, (cin * kh * kw + 1) * n)))

  def forward(self, mu, log_var, noise):
    z = mu[:, None] + torch.exp(log_var / 2)[:, None] * noise  # [T, L, Z]
    kernels, biases = [], []
    for l, (n, cin, kh, kw) in enumerate(self.layer_shapes):
      out = getattr(self, f"layer{l + 1}")(z[:, l])
      m = cin * kh * kw
      w = out[:, :m * n].reshape(-1, n, cin, kh, kw)
      sq = (w * w).sum(dim=(-3, -2, -1), keepdim=True)
      kernels.append(w * torch.rsqrt(sq.clamp_min(self.l2_eps)))
      biases.append(out[:, m * n:])
    return kernels, biases


def target_net(x, kernels, biases):
  """TargetNet on generated weights, all tasks in one grouped convolution per layer.

  x [T, B, C, H, W] (a task's supports and queries on one axis); kernels[l]
  [T, N, C, kh, kw], biases[l] [T, N]. [conv + bias, ReLU, SAME max-pool] ...,
  conv + bias, flatten -> [T, B, N * h * w]. Task t's channels are the t-th
  block of T * C, and its kernel the t-th group, so each task sees only its own
  weights.
  """
  t, b = x.shape[:2]
  x = x.transpose(0, 1).reshape(b, t * x.shape[2], *x.shape[3:])
  for l, (w, bias) in enumerate(zip(kernels, biases)):
    x = F.conv2d(x, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), padding="same", groups=t)
    if l < len(kernels) - 1:
      x = max_pool_2x2_same(F.relu(x))
  return x.reshape(b, t, -1).transpose(0, 1)


def cosine_matching(query, support, support_labels, ways: int, scale: float = 1.0, eps: float = 1e-8):
  """log p(class | query) [T, Q, N]: softmax over supports of scale * cosine, weighted one-hot labels.

  Norms are floored at eps (F.normalize: x / max(|x|, eps)) and the log is
  log(p + eps), as in fewshot_jax.methods.matchingnet.cosine_matching.
  """
  qn = F.normalize(query, dim=-1, eps=eps)
  sn = F.normalize(support, dim=-1, eps=eps)
  attention = torch.softmax(scale * qn @ sn.transpose(-1, -2), dim=-1)  # [T, Q, S]
  probs = attention @ F.one_hot(support_labels.long(), ways).to(attention.dtype)
  return torch.log(probs + eps)


class LGMNet(nn.Module):
  """Extractor + task context encoder + weight generator + TargetNet + matching classifier.

  forward(support [T, S, C, H, W], support_labels [T, S], query [T, Q, C, H, W],
  ways, noise [T, L, Z]) -> log p(class | query) [T, Q, N]. The extractor runs
  once on all images of all tasks and the context encoder once on all
  supports, so in .train() BatchNorm uses meta-batch statistics (intertask
  normalisation); in .eval() the moving averages.
  """

  def __init__(self, in_channels: int, features: int = 64, context_features: int = 64, z_dim: int = 32,
               target_features: Sequence[int] = (64, 64), target_kernel: int = 3, bn_decay: float = 0.99,
               bn_eps: float = 1e-3, dropout_rate: float = 0.0, l2_eps: float = 1e-12,
               cosine_scale: float = 1.0, eps: float = 1e-8):
    super().__init__()
    self.z_dim, self.cosine_scale, self.eps = z_dim, cosine_scale, eps
    self.extractor = Extractor(in_channels, features, bn_decay=bn_decay, bn_eps=bn_eps,
                               dropout_rate=dropout_rate)
    self.context_encoder = TaskContextEncoder(features, context_features, 2 * z_dim, bn_decay, bn_eps)
    widths = (features,) + tuple(target_features)
    k = target_kernel
    self.weight_generator = WeightGenerator(
        z_dim, [(cout, cin, k, k) for cin, cout in zip(widths[:-1], widths[1:])], l2_eps)

  @classmethod
  def from_config(cls, config, in_channels: int):
    """The model a fewshot_jax LGM-Net config describes (configs/lgmnet.py)."""
    mc = config.method
    return cls(in_channels, config.model.features, mc.context_features, mc.z_dim,
               tuple(mc.target_features), mc.target_kernel, mc.bn_momentum, mc.bn_epsilon,
               mc.dropout_rate, mc.l2_eps, mc.cosine_scale, mc.eps)

  def noise_shape(self, tasks: int):
    return (tasks, len(self.weight_generator.layer_shapes), self.z_dim)

  def embed(self, support, query):
    """-> support maps [T, S, C', h, w], query maps [T, Q, C', h, w], task contexts [T, 2Z]."""
    t, s = support.shape[:2]
    q = query.shape[1]
    feats = self.extractor(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
    ctx = self.context_encoder(feats[:t * s])
    shape = feats.shape[1:]
    return (feats[:t * s].reshape(t, s, *shape), feats[t * s:].reshape(t, q, *shape),
            ctx.reshape(t, s, -1).mean(1))

  def generate(self, context, noise):
    """TargetNet kernels [T, N, C, kh, kw] and biases [T, N] from contexts [T, 2Z]."""
    return self.weight_generator(context[:, :self.z_dim], context[:, self.z_dim:], noise)

  def forward(self, support, support_labels, query, ways: int, noise):
    sup, qry, context = self.embed(support, query)
    kernels, biases = self.generate(context, noise)
    s = sup.shape[1]
    emb = target_net(torch.cat([sup, qry], dim=1), kernels, biases)
    return cosine_matching(emb[:, s:], emb[:, :s], support_labels, ways, self.cosine_scale, self.eps)


def loss(model, support, support_labels, query, query_labels, ways: int, noise):
  """Mean negative log-likelihood of the query labels (the training loss; forward + backward)."""
  log_p = model(support, support_labels, query, ways, noise)
  return F.nll_loss(log_p.reshape(-1, ways), query_labels.reshape(-1).long())

