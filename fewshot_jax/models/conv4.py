"""Conv-4 backbone of ProtoNet / MatchingNet: 4 x [conv3x3 64, BN, ReLU, maxpool 2]."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fewshot_jax.models import layers


class Conv4(nn.Module):
  """Returns a flat embedding (64 for 28x28 inputs, 1600 for 84x84).

  BatchNorm momentum 0.9 in Flax terms is PyTorch's momentum 0.1, so converted
  and reference models keep the same running statistics. `remat` recomputes
  each block in the backward pass; layer names (Conv_i, BatchNorm_i) are the
  same either way.
  """

  features: int = 64
  blocks: int = 4
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  conv_general_dilated: Any = None  # None = lax; see models/layers.py for the CPU variant
  remat: bool = False

  def block(self, x, i: int, train: bool):
    x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype,
                conv_general_dilated=self.conv_general_dilated, name=f"Conv_{i}")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name=f"BatchNorm_{i}")(x)
    return layers.max_pool_2x2(nn.relu(x))

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.astype(self.dtype)
    block = layers.remat_block(type(self).block, self.remat)
    for i in range(self.blocks):
      x = block(self, x, i, train)
    return x.reshape(x.shape[0], -1).astype(jnp.float32)
