"""IDeMe-Net's deformation sub-network D and the patch-wise fusion it drives.

D sees a probe and a gallery image stacked on channels (probe first, as the
reference's torch.cat((A, B), 1) with A the probe), and predicts one weight per
cell of a G x G grid. The deformed image is W * probe + (1 - W) * gallery with
W constant inside each cell. Facts checked against tankche1/IDeMe-Net
(onlyBasetwoLoss.py: smallNet, GNet, fixSquare; datasets/softRandom.py):
  * encoder convs are torch.nn.Conv2d(c_in, c_out, 3, padding=1), so they carry
    a bias; MaxPool2d(2) floors odd sizes.
  * patch k covers rows [p[k // G], p[k // G + 1]) and columns
    [p[k % G], p[k % G + 1]): row-major, rows along image height.
  * borders for 224: [0,74,148,224], [0,44,...,224], [0,32,...,224], i.e.
    i * (224 // G) with the last cell absorbing the remainder.
  * the weights are used raw (no sigmoid / clamp), so fusion may extrapolate.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fewshot_jax.models import layers
from fewshot_jax.models.resnet import torch_uniform_bias_init

# torch Conv2d / Linear default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def patch_borders(size: int, grid: int) -> tuple[int, ...]:
  """The reference's G + 1 cell borders: i * (size // G), then size (84, 3 -> 0, 28, 56, 84)."""
  step = size // grid
  return tuple(i * step for i in range(grid)) + (size,)


def patch_index(size: int, grid: int) -> np.ndarray:
  """[size, size] int32: row-major cell index (row * G + col) of each pixel, built at trace time."""
  cell = np.searchsorted(np.asarray(patch_borders(size, grid)[1:]), np.arange(size), side="right")
  return (cell[:, None] * grid + cell[None, :]).astype(np.int32)


def weight_map(weights, size: int, grid: int):
  """[..., G*G] patch weights -> [..., size, size, 1] per-pixel map (a static gather)."""
  return jnp.take(weights, patch_index(size, grid), axis=-1)[..., None]


def fuse(probe, gallery, wmap):
  """W * probe + (1 - W) * gallery on normalised NHWC images; the map broadcasts over channels."""
  return wmap * probe + (1 - wmap) * gallery


class _EncoderBlock(nn.Module):
  """conv3x3 (pad 1, bias) -> BN -> ReLU -> 2x2/2 max-pool (floor), as torch's conv_block."""

  features: int
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_general_dilated: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=_torch_kernel_init, bias_init=torch_uniform_bias_init(9 * x.shape[-1]),
                conv_general_dilated=self.conv_general_dilated, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)
    return layers.max_pool_2x2(nn.relu(x))


class DeformationNet(nn.Module):
  """[B, H, W, 6] (probe ++ gallery) -> [B, G*G] float32 raw patch weights.

  Spatial sizes: 224 -> 112 -> 56 -> 28 -> 14 -> 7 (7*7*16 = 784 inputs to
  `to_weight`, the reference's Linear(784, G*G)); 84 -> 42 -> 21 -> 10 -> 5 -> 2
  (64 inputs). The map is flattened in PyTorch's C, H, W order so the torch
  Linear weight converts by a plain transpose.
  """

  grid: int = 3
  channels: Sequence[int] = (32, 64, 64, 32, 16)
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_general_dilated: Any = None
  remat: bool = False  # recompute each encoder block in the backward pass (same parameter names)

  @nn.compact
  def __call__(self, pairs, train: bool):
    x = pairs.astype(self.dtype)
    # static_argnums counts `self` as 0: `train` (2) selects the BatchNorm mode at trace time.
    block_cls = nn.remat(_EncoderBlock, static_argnums=(2,)) if self.remat else _EncoderBlock
    for i, features in enumerate(self.channels):
      x = block_cls(features, dtype=self.dtype, bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon, conv_general_dilated=self.conv_general_dilated,
                    name=f"encoder_{i}")(x, train)
    x = x.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    return nn.Dense(self.grid * self.grid, kernel_init=_torch_kernel_init,
                    bias_init=torch_uniform_bias_init(x.shape[-1]), name="to_weight")(x)
