"""ResNet-18 in torchvision's layout: IDeMe-Net's embedding sub-network E.

The parameter tree mirrors torchvision's state_dict one to one so converted
PyTorch checkpoints (softRandom.t7, the CNet part of metaNet_*.t7) load
without renaming tricks:

  torchvision            here
  conv1, bn1             conv1, bn1
  layerL.B.conv1 ...     layerL_B/conv1, bn1, conv2, bn2
  layerL.B.downsample.0  layerL_B/downsample_conv
  layerL.B.downsample.1  layerL_B/downsample_bn
  fc                     fc

Paddings are explicit, as PyTorch's: 'SAME' would pad a stride-2 conv of an
even-sized input (0, 1) / (2, 3) instead of torch's symmetric (1, 1) / (3, 3)
and shift every output pixel, so converted weights would see different inputs.
"""

from typing import Any, Optional

import flax.linen as nn
from jax import lax
import jax.numpy as jnp
import numpy as np

# torchvision initialises convs with kaiming_normal_(mode='fan_out', relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_uniform_bias_init(fan_in: int):
  """Bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's Linear / Conv2d default."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound

  return init


def max_pool_3x3_s2_p1(x):
  """torch MaxPool2d(3, 2, padding=1) on [B, H, W, C]; the padding is -inf so it never wins.

  Separable (a 3-wide, stride-2 max along H, then along W), each pass a pair max by
  reshape plus the third element by a strided slice: the same values as a 3x3
  reduce_window, and a gradient of selects instead of XLA:CPU's windowed
  bookkeeping: the IDeMe-Net stage-2 step (benchmarks/torch_vs_jax.py, 2-core CPU)
  went from 658.8 to 620.2 ms/step.
  """
  return _max3_s2(_max3_s2(x, 1), 2)


def _max3_s2(x, axis):
  """out[i] = max(x[2i - 1], x[2i], x[2i + 1]) along `axis`, out of range = -inf."""
  n = x.shape[axis]
  out = (n - 1) // 2 + 1
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 2 * out + 1 - n)
  xp = jnp.pad(x, pad, constant_values=-jnp.inf)  # length 2 * out + 2
  pairs = lax.slice_in_dim(xp, 0, 2 * out, axis=axis)
  shape = list(pairs.shape)
  shape[axis:axis + 1] = [out, 2]
  return jnp.maximum(pairs.reshape(shape).max(axis=axis + 1),
                     lax.slice_in_dim(xp, 2, 2 * out + 2, stride=2, axis=axis))


class BasicBlock(nn.Module):
  """Two 3x3 convs plus the shortcut; a strided 1x1 conv + BN projects it when shapes change."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_general_dilated: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, p, name: nn.Conv(
        f, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=False, dtype=self.dtype,
        kernel_init=_conv_init, conv_general_dilated=self.conv_general_dilated, name=name)
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                     epsilon=self.bn_epsilon, dtype=self.dtype, name=name)
    y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, 1, "conv1")(x)))
    y = norm("bn2")(conv(self.features, 3, 1, 1, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm("downsample_bn")(conv(self.features, 1, self.strides, 0, "downsample_conv")(x))
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """torchvision resnet18 (+ `fc` to `num_classes`; 0 = no head) on NHWC normalised images.

  Any input size works (224 as the paper, 84 for fast runs: 84 -> 42 -> 21 -> 21
  -> 11 -> 6 -> 3 before the global average pool). `dtype` is the compute dtype;
  parameters stay float32, and the pooled features and `fc` are float32 so the
  logits keep full precision under bfloat16. `remat` recomputes each BasicBlock
  in the backward pass (same parameter names, less activation memory at 224).
  BatchNorm momentum 0.9 in Flax terms is PyTorch's 0.1.
  """

  num_classes: int = 64
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_general_dilated: Any = None  # None = lax; see models/layers.py for the CPU variant
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    """Returns (features [B, 512] float32, logits [B, num_classes] float32 or None)."""
    x = x.astype(self.dtype)
    x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, kernel_init=_conv_init,
                conv_general_dilated=self.conv_general_dilated, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="bn1")(x)
    x = max_pool_3x3_s2_p1(nn.relu(x))
    # static_argnums counts `self` as 0: `train` (2) selects the BatchNorm mode at trace time.
    block_cls = nn.remat(BasicBlock, static_argnums=(2,)) if self.remat else BasicBlock
    for layer, features in enumerate((64, 128, 256, 512), start=1):
      for index in range(2):
        strides = 2 if layer > 1 and index == 0 else 1
        x = block_cls(features, strides, dtype=self.dtype, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon, conv_general_dilated=self.conv_general_dilated,
                      name=f"layer{layer}_{index}")(x, train)
    features = x.astype(jnp.float32).mean(axis=(1, 2))
    logits: Optional[jnp.ndarray] = None
    if self.num_classes:
      logits = nn.Dense(self.num_classes, kernel_init=_linear_kernel_init,
                        bias_init=torch_uniform_bias_init(features.shape[-1]), name="fc")(features)
    return features, logits
