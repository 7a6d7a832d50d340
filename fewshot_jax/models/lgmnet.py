"""LGM-Net modules (Li et al., ICML 2019): extractor, task context encoder,
conditional weight generator, and the TargetNet that runs on generated weights.

Shapes for 84x84 images: Extractor 84 -> 42 -> 21 -> 11 (11x11x64);
TaskContextEncoder 11 -> 6 -> 3 -> 64-d; TargetNet 11x11x64 -> 6x6x64 -> 2304-d.
All max-pools are 2x2/2 with TF 'SAME' padding, as in the authors' TF code.
Convolution kernels of the learned (non-generated) layers use glorot-uniform
initialisation and zero biases, the TF1 `tf.layers.conv2d` defaults the
reference was trained with.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fewshot_jax.models import layers

_NHWC = ("NHWC", "HWIO", "NHWC")
_glorot = nn.initializers.xavier_uniform()
TASK_CONVS = ("im2col", "vmap", "grouped")
KERNEL_LAYOUTS = ("hwio", "tf")


class Extractor(nn.Module):
  """Shared feature extractor: blocks of [conv3x3 SAME, BatchNorm, ReLU, (SAME maxpool)].

  Blocks 1..`pooled_blocks` end with a max-pool; dropout (rate `dropout_rate`,
  0 in the published runs) follows block 1. Returns the feature map [B, h, w, C]
  in float32. In training BatchNorm uses the statistics of the whole batch it
  is given: the method passes every image of every task (intertask normalisation).
  """

  features: int = 64
  blocks: int = 4
  pooled_blocks: int = 3
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv_general_dilated: Any = None  # None = lax; see models/layers.py for the CPU variant
  remat: bool = False  # recompute each block in the backward pass (same layer names)

  def block(self, x, i: int, train: bool):
    x = nn.Conv(self.features, (3, 3), padding="SAME", kernel_init=_glorot, dtype=self.dtype,
                conv_general_dilated=self.conv_general_dilated, name=f"conv{i + 1}")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name=f"bn{i + 1}")(x)
    x = nn.relu(x)
    return layers.max_pool_2x2_same(x) if i < self.pooled_blocks else x

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    block = layers.remat_block(type(self).block, self.remat)
    for i in range(self.blocks):
      x = block(self, x, i, train)
      if i == 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x.astype(jnp.float32)


class TaskContextEncoder(nn.Module):
  """Per support feature map: 2 x [conv3x3, ReLU, BatchNorm, SAME maxpool], conv3x3, spatial mean.

  Returns [B, context_dim]; the method averages a task's rows into its context
  c and reads mu = c[:z], log_var = c[z:].
  """

  features: int = 64
  context_dim: int = 64
  hidden_blocks: int = 2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  conv_general_dilated: Any = None
  remat: bool = False  # recompute each hidden block in the backward pass (same layer names)

  def block(self, x, i: int, train: bool):
    x = nn.Conv(self.features, (3, 3), padding="SAME", kernel_init=_glorot, dtype=self.dtype,
                conv_general_dilated=self.conv_general_dilated, name=f"conv{i + 1}")(x)
    x = nn.relu(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name=f"bn{i + 1}")(x)
    return layers.max_pool_2x2_same(x)

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    block = layers.remat_block(type(self).block, self.remat)
    for i in range(self.hidden_blocks):
      x = block(self, x, i, train)
    x = nn.Conv(self.context_dim, (3, 3), padding="SAME", kernel_init=_glorot, dtype=self.dtype,
                conv_general_dilated=self.conv_general_dilated,
                name=f"conv{self.hidden_blocks + 1}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(-3, -2))


class WeightGenerator(nn.Module):
  """Conditional weight generator: one linear map z -> (kernel, bias) per TargetNet layer.

  layer_shapes: (kh, kw, C_in, N) of each generated convolution.
  __call__(mu [..., Z], log_var [..., Z], noise [..., L, Z]) -> (kernels, biases):
  z_l = mu + exp(log_var / 2) * noise_l (noise = 0 gives z = mu); kernel l is
  [..., kh, kw, C_in, N] with every output filter of unit L2 norm over
  (kh, kw, C_in) (x / sqrt(max(sum x^2, l2_eps)), tf.nn.l2_normalize); bias l
  is [..., N], not normalised. Of the (M + 1) * N outputs of layer l's Dense
  (M = kh * kw * C_in), the first M * N are the kernel read as (N, C_in, kh, kw)
  and the last N the bias. kernel_layout 'hwio' moves that to (kh, kw, C_in, N);
  'tf' is the LGM-Net code's `tf.transpose` without a permutation, which reverses
  all axes to (kw, kh, C_in, N): the filter is spatially transposed. The two
  train alike from scratch; 'tf' is what the authors' TF weights expect.
  """

  layer_shapes: Sequence[Sequence[int]]
  l2_eps: float = 1e-12
  kernel_layout: str = "hwio"

  @nn.compact
  def __call__(self, mu, log_var, noise):
    z = mu[..., None, :] + jnp.exp(log_var / 2)[..., None, :] * noise  # [..., L, Z]
    kernels, biases = [], []
    for l, (kh, kw, cin, n) in enumerate(self.layer_shapes):
      m = kh * kw * cin
      out = nn.Dense((m + 1) * n, kernel_init=_glorot, bias_init=nn.initializers.zeros,
                     name=f"layer{l + 1}")(z[..., l, :])
      lead = out.shape[:-1]
      w = out[..., :m * n].reshape(lead + (n, cin, kh, kw))
      if self.kernel_layout == "tf":  # (N, C_in, kh, kw) -> (kw, kh, C_in, N)
        w = jnp.moveaxis(w, (-4, -3, -2, -1), (-1, -2, -3, -4))
      else:  # (N, C_in, kh, kw) -> (kh, kw, C_in, N)
        w = jnp.moveaxis(w, (-4, -3), (-1, -2))
      sq = jnp.sum(w * w, axis=(-4, -3, -2), keepdims=True)
      kernels.append(w * lax.rsqrt(jnp.maximum(sq, self.l2_eps)))
      biases.append(out[..., m * n:])
    return tuple(kernels), tuple(biases)


def task_conv(x, w, impl: str = "vmap", conv_general_dilated=None):
  """Per-task SAME convolution: x [T, B, H, W, C] with task t's kernel w[t] [kh, kw, C, N].

  'vmap': jax.vmap over tasks of a plain convolution (`conv_general_dilated`,
  e.g. layers.matmul_wgrad_conv, or lax). 'grouped': the tasks stacked on the
  channel axis and one convolution with feature_group_count=T. 'im2col': the
  kh * kw shifted inputs side by side on the channel axis, one task-batched matmul:
  the task axis is a plain batch axis of every operation, so XLA keeps it
  sharded over devices, where it all-gathers the activations of a feature-
  grouped convolution (what 'vmap' and 'grouped' become).
  """
  if impl == "im2col":
    _, kh, kw, _, _ = w.shape
    h, wd = x.shape[2:4]
    top, left = (kh - 1) // 2, (kw - 1) // 2  # SAME at stride 1
    xp = jnp.pad(x, ((0, 0), (0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    patches = jnp.concatenate([xp[:, :, i:i + h, j:j + wd] for i in range(kh) for j in range(kw)], -1)
    return jnp.einsum("tbhwk,tkn->tbhwn", patches, w.reshape(w.shape[0], -1, w.shape[-1]))
  if impl == "vmap":
    conv = conv_general_dilated or lax.conv_general_dilated
    one = lambda xt, wt: conv(xt, wt, (1, 1), "SAME", dimension_numbers=_NHWC)
    return jax.vmap(one)(x, w)
  if impl == "grouped":
    t, b, h, wd, c = x.shape
    _, kh, kw, _, n = w.shape
    xg = jnp.moveaxis(x, 0, -2).reshape(b, h, wd, t * c)  # channel index = task * C + c
    wg = jnp.moveaxis(w, 0, -2).reshape(kh, kw, c, t * n)  # group-major output channels
    y = lax.conv_general_dilated(xg, wg, (1, 1), "SAME", dimension_numbers=_NHWC,
                                 feature_group_count=t)
    return jnp.moveaxis(y.reshape(b, h, wd, t, n), -2, 0)
  raise ValueError(f"task_conv impl {impl!r} is unknown; valid: {list(TASK_CONVS)}")


def target_net(features, kernels, biases, impl: str = "vmap", conv_general_dilated=None):
  """TargetNet on generated weights: [meta-conv + bias, ReLU, SAME maxpool] ..., meta-conv + bias, flatten.

  features [T, B, H, W, C] (a task's supports and queries on one axis);
  kernels[l] [T, kh, kw, C_l, N_l], biases[l] [T, N_l]. No BatchNorm. Returns
  [T, B, D] (D = 6*6*64 = 2304 for 11x11x64 inputs).

  Per-task convolution (`impl`), measured on a shared 2-core CPU, jitted,
  best of 20, whole TargetNet on T=32 tasks x 6 images (5-way 1-shot, 1 query)
  of 11x11x64, sum(sin(.)) loss:
                                   forward   forward + backward
    'vmap' + matmul_wgrad_conv     104 ms    358 ms
    'vmap' + lax conv              111 ms    9469 ms
    'grouped' (lax, T groups)      105 ms    9389 ms
  XLA:CPU's weight-gradient convolution is the slow part (see layers.py), and
  a grouped convolution cannot use the matmul rule, so 'vmap' with
  layers.task_conv_function(model.conv_impl) is the default (method.task_conv). On
  GPU/TPU the two are one computation: vmap's batching rule for a convolution
  whose kernel is batched emits the same feature-grouped convolution.
  """
  x = features
  t, b = x.shape[:2]
  for l, (w, bias) in enumerate(zip(kernels, biases)):
    x = task_conv(x, w, impl, conv_general_dilated) + bias[:, None, None, None, :]
    if l < len(kernels) - 1:
      x = layers.max_pool_2x2_same(nn.relu(x))
  return x.reshape(t, b, -1)
