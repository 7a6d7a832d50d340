"""Convolution choices for XLA:CPU, and max-pooling as reshape + max.

XLA:CPU lowers the weight-gradient convolution (the batch axis contracted) to a
slow generic loop when it sits inside a loop (lax.scan) or is batched over
kernels (vmap, LGM-Net's per-task convolutions): measured here, a 3x3 64->64
conv on 360 14x14 maps took over 10 s per step inside lax.scan against 0.17 s
with `matmul_wgrad_conv`, which computes that gradient as shifted matmuls
(forward and input gradient stay XLA convolutions; gradients equal to float32
rounding). Outside loops, and with convolutions on XLA's own kernels rather than
YNNPACK's (xla_setup.py), XLA's convolution is the faster one
(benchmarks/conv_layers.py), so on the CPU `model.conv_impl='auto'` picks 'xla'
when xla_setup's flag is in effect (the trainer then runs its steps from a
Python loop, train.loop='auto') and 'matmul_wgrad' otherwise; kernel-batched
convolutions always take 'matmul_wgrad' there (`task_conv_function`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fewshot_jax import xla_setup

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, x_shape, w_shape, strides):
  if isinstance(padding, str):
    return lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
  return [tuple(p) for p in padding]


def _weight_grad(x, g, w_shape, strides, pads):
  kh, kw, cin, cout = w_shape
  sh, sw = strides
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  g2 = g.reshape(-1, cout)
  taps = [
      xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :].reshape(-1, cin).T @ g2
      for i in range(kh) for j in range(kw)
  ]
  return jnp.stack(taps).reshape(w_shape).astype(x.dtype)


def _make(strides, pads, precision):
  conv = lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                                precision=precision)

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    _, dx_fn = jax.vjp(lambda x_: conv(x_, w), x)
    return dx_fn(g)[0], _weight_grad(x, g, w.shape, strides, pads)

  f.defvjp(fwd, bwd)
  return f


def matmul_wgrad_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                      precision=None, preferred_element_type=None):
  """Drop-in for lax.conv_general_dilated (as nn.Conv calls it) on NHWC/HWIO, 2-D, ungrouped."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and preferred_element_type is None
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  strides = tuple(window_strides)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides)
  return _make(strides, tuple(map(tuple, pads)), precision)(lhs, rhs)


CONV_IMPLS = ("auto", "xla", "matmul_wgrad")  # model.conv_impl


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> what this backend wants for a plain convolution: 'xla' off the CPU and on a CPU
  whose convolutions run on XLA's own kernels (xla_setup), 'matmul_wgrad' on other CPUs."""
  if impl != "auto":
    return impl
  return "matmul_wgrad" if jax.default_backend() == "cpu" and not xla_setup.eigen_convolutions() else "xla"


def conv_function(impl: str):
  """The conv_general_dilated for nn.Conv: 'xla' (None: lax's), 'matmul_wgrad', or 'auto'."""
  return matmul_wgrad_conv if resolve_conv_impl(impl) == "matmul_wgrad" else None


def task_conv_function(impl: str):
  """conv_function for kernel-batched (vmapped) convolutions: 'auto' is 'matmul_wgrad' on the CPU
  whatever XLA_FLAGS say (the batched weight gradient is XLA:CPU's slow loop)."""
  if impl == "auto" and jax.default_backend() == "cpu":
    impl = "matmul_wgrad"
  return conv_function(impl)


def max_pool_2x2(x):
  """2x2/2 VALID max-pool as reshape + max: same values as nn.max_pool, and its
  gradient avoids XLA:CPU's slow select-and-scatter (0.58 vs 0.76 s per Conv-4
  step of 360 images under lax.scan, measured here)."""
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  return x[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def max_pool_2x2_same(x):
  """2x2/2 max-pool with TF 'SAME' padding (ceil(H/2) x ceil(W/2)) on [..., H, W, C].

  SAME puts the one padding row / column of an odd size at the bottom / right;
  padding with -inf keeps every window's max on real values (11 -> 6, 3 -> 2).
  Reshape + max like `max_pool_2x2`, for the same gradient-speed reason.
  """
  *lead, h, w, c = x.shape
  h2, w2 = -(-h // 2), -(-w // 2)
  pad = [(0, 0)] * len(lead) + [(0, 2 * h2 - h), (0, 2 * w2 - w), (0, 0)]
  x = jnp.pad(x, pad, constant_values=-jnp.inf)
  return x.reshape(*lead, h2, 2, w2, 2, c).max(axis=(-4, -2))


def remat_block(fn, remat: bool, static_argnums=(2, 3)):
  """fn(module, x, *args) recomputed in the backward pass when `remat` (model.remat).

  Flax's function form of nn.remat: the layers fn creates stay the module's own,
  under the same names, so parameter trees (and checkpoints) are the same with
  and without remat. static_argnums count the module as 0; pass the train flag
  and block index there, as they select BatchNorm's mode and layer names.
  """
  return nn.remat(fn, static_argnums=static_argnums) if remat else fn
