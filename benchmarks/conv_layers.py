"""One convolution layer, forward and forward + backward, in JAX and PyTorch: where the CPU time goes.

The training steps of benchmarks/torch_vs_jax.py spend most of their time in
3x3 convolutions. This times the layers of those steps alone, at the steps'
shapes: XLA's convolution (lax.conv_general_dilated), the matmul weight-gradient
variant (models/layers.py) and PyTorch's (oneDNN on the CPU), each forward and
forward + backward (gradients of 0.5 * sum(y^2) with respect to input and
kernel), float32, median of 3 repeats of `--iters` calls after 2 warm-up calls.
XLA_FLAGS is set as launch.py sets it (xla_setup.set_cpu_defaults: convolutions
on XLA's own kernels); FEWSHOT_XLA_CPU_DEFAULTS=0 times jaxlib's defaults
(convolutions on YNNPACK).

  python benchmarks/conv_layers.py
  FEWSHOT_XLA_CPU_DEFAULTS=0 python benchmarks/conv_layers.py
"""

import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()  # as launch.py: before JAX creates its backend

from fewshot_jax.models import layers  # pylint: disable=g-import-not-at-top

# name -> (images, size, in channels, out channels, kernel, stride): the layers of the timed steps
LAYERS = {
    "conv4-omniglot-1": (80, 28, 1, 64, 3, 1), "conv4-omniglot-2": (80, 14, 64, 64, 3, 1),
    "conv4-mini-1": (100, 84, 3, 64, 3, 1), "conv4-mini-2": (100, 42, 64, 64, 3, 1),
    "conv4-mini-3": (100, 21, 64, 64, 3, 1),
    "resnet84-conv1": (80, 84, 3, 64, 7, 2), "resnet84-layer1": (80, 21, 64, 64, 3, 1),
    "resnet84-layer2": (80, 11, 128, 128, 3, 1), "resnet84-layer3": (80, 6, 256, 256, 3, 1),
    "resnet84-layer4": (80, 3, 512, 512, 3, 1),
}
flags.DEFINE_list("layers", list(LAYERS), f"Layers to time; valid: {', '.join(LAYERS)}.")
flags.DEFINE_integer("iters", 10, "Calls per timed repeat.")
FLAGS = flags.FLAGS
_NHWC = ("NHWC", "HWIO", "NHWC")


def _median_ms(fn):
  fn()
  fn()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(FLAGS.iters):
      fn()
    times.append(1000 * (time.perf_counter() - start) / FLAGS.iters)
  return statistics.median(times)


def time_layer(n, size, cin, cout, k, stride):
  """[XLA fwd, XLA fwd+bwd, matmul_wgrad fwd+bwd, torch fwd, torch fwd+bwd] in ms."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, size, size, cin), dtype=np.float32)
  w = (rng.standard_normal((k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))).astype(np.float32)
  pads = [(k // 2, k // 2)] * 2
  xla = lambda x_, w_: jax.lax.conv_general_dilated(x_, w_, (stride, stride), pads, dimension_numbers=_NHWC)
  mm = lambda x_, w_: layers.matmul_wgrad_conv(x_, w_, (stride, stride), pads, dimension_numbers=_NHWC)
  grads = lambda conv: jax.jit(jax.grad(lambda x_, w_: 0.5 * (conv(x_, w_) ** 2).sum(), argnums=(0, 1)))
  xj, wj = jax.device_put(x), jax.device_put(w)
  run = lambda f: (lambda: jax.block_until_ready(f(xj, wj)))
  row = [_median_ms(run(jax.jit(xla))), _median_ms(run(grads(xla))), _median_ms(run(grads(mm)))]
  conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)

  def forward():
    with torch.no_grad():
      conv(xt)

  def backward():
    xt.grad, conv.weight.grad = None, None
    (0.5 * conv(xt).pow(2).sum()).backward()

  return row + [_median_ms(forward), _median_ms(backward)]


def main(argv):
  del argv
  unknown = [l for l in FLAGS.layers if l not in LAYERS]
  if unknown:
    raise app.UsageError(f"unknown --layers {unknown}; valid: {list(LAYERS)}")
  torch.set_num_threads(os.cpu_count())
  print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores | jax {jax.__version__} "
        f"on {jax.default_backend()} | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | convolutions on "
        f"{'XLA (Eigen)' if xla_setup.eigen_convolutions() else 'YNNPACK'}")
  print("\nms per call, float32; fwd+bwd = forward and the gradients for input and kernel\n")
  print("| layer (images, HxWxCin -> Cout, kernel/stride) | XLA fwd | XLA fwd+bwd | matmul_wgrad fwd+bwd "
        "| PyTorch fwd | PyTorch fwd+bwd | PyTorch/XLA fwd+bwd |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name in FLAGS.layers:
    n, size, cin, cout, k, stride = LAYERS[name]
    r = time_layer(n, size, cin, cout, k, stride)
    print(f"| {name} ({n}, {size}x{size}x{cin} -> {cout}, {k}/{stride}) | "
          + " | ".join(f"{v:.1f}" for v in r) + f" | {r[4] / r[1]:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
