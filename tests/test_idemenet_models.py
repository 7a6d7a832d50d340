"""IDeMe-Net networks: ResNet-18 layout / remat / dtypes, deformation net, patch grid, fusion.

Small inputs (32-84 px ResNet, batch 1-2) keep the module quick on a CPU; the
PyTorch comparisons use torch.nn.functional only (torchvision is not needed).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax.models import layers
from fewshot_jax.models.deformation import DeformationNet, fuse, patch_borders, weight_map
from fewshot_jax.models.resnet import ResNet18

KEY = jax.random.PRNGKey(0)
BLOCKS = [f"layer{l}_{i}" for l in range(1, 5) for i in range(2)]


def _images(size, batch=2, channels=3, seed=1):
  # numpy, not jax.random: every new shape would cost an RNG compile.
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, channels)),
                     jnp.float32)


def _shapes(tree):
  return {"/".join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _np_variables(abstract, seed=0):
  """Random variables from numpy for an eval_shape'd tree: jitting a ResNet init costs ~10 s of
  XLA:CPU compile here. Non-trivial BN scale / bias / statistics so a layout or epsilon mistake
  shows up in the PyTorch comparisons."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  for path, leaf in sorted(flat.items()):
    shape, name = leaf.shape, path[-1]
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:  # bias, mean
      value = 0.1 * rng.normal(size=shape)
    flat[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _abstract(model, size, channels=3):
  return jax.eval_shape(lambda x: model.init(KEY, x, train=False), _images(size, 1, channels))


@pytest.fixture(scope="module")
def resnet_vars():
  return _np_variables(_abstract(ResNet18(), 32))


@pytest.fixture(scope="module")
def eval64(resnet_vars):
  """float32 eval-mode outputs at 64x64 (and the statistics eval returns), shared by three tests."""
  x = _images(64)
  (feats, logits), upd = jax.jit(lambda v: ResNet18().apply(
      v, x, train=False, mutable=["batch_stats"]))(resnet_vars)
  return x, feats, logits, upd


# ----------------------------------------------------------------------------- ResNet-18

def test_resnet_tree_names_and_shapes():
  for remat in (False, True):
    v = _abstract(ResNet18(remat=remat), 32)
    params, stats = _shapes(v["params"]), _shapes(v["batch_stats"])
    assert set(v["params"]) == {"conv1", "bn1", "fc", *BLOCKS}
    assert set(v["batch_stats"]) == {"bn1", *BLOCKS}
    assert params["conv1/kernel"] == (7, 7, 3, 64) and "conv1/bias" not in params
    assert params["fc/kernel"] == (512, 64) and params["fc/bias"] == (64,)
    for name in BLOCKS:
      subs = {"conv1", "bn1", "conv2", "bn2"}
      if name in ("layer2_0", "layer3_0", "layer4_0"):
        subs |= {"downsample_conv", "downsample_bn"}
      assert set(v["params"][name]) == subs, (remat, name)
      assert set(v["batch_stats"][name]) == subs - {"conv1", "conv2", "downsample_conv"}
    assert params["layer1_0/conv1/kernel"] == (3, 3, 64, 64)
    assert params["layer2_0/conv1/kernel"] == (3, 3, 64, 128)
    assert params["layer2_0/downsample_conv/kernel"] == (1, 1, 64, 128)
    assert params["layer4_1/conv2/kernel"] == (3, 3, 512, 512)
    assert params["layer4_0/downsample_bn/scale"] == (512,)
    assert stats["layer3_0/downsample_bn/mean"] == (256,) and stats["bn1/var"] == (64,)
    assert not any(k.endswith("conv1/bias") or k.endswith("conv2/bias") for k in params)


def test_resnet_param_count_matches_torchvision():
  # torchvision documents resnet18 at 11,689,512 parameters with its 1000-way fc
  # (512 * 1000 + 1000 = 513,000); BN running stats are buffers, not parameters.
  # Trunk 11,176,512 + a 64-way fc (512 * 64 + 64 = 32,832) = 11,209,344.
  count = lambda m: sum(int(np.prod(s)) for s in _shapes(_abstract(m, 32)["params"]).values())
  assert count(ResNet18()) == 11_209_344
  assert count(ResNet18(num_classes=1000)) == 11_689_512
  assert count(ResNet18(num_classes=0)) == 11_176_512


def test_resnet_train_mode_updates_batch_stats(resnet_vars):
  (feats, logits), upd = jax.jit(lambda v, x: ResNet18().apply(
      v, x, train=True, mutable=["batch_stats"]))(resnet_vars, _images(84))
  assert feats.shape == (2, 512) and logits.shape == (2, 64)
  assert feats.dtype == logits.dtype == jnp.float32
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   resnet_vars["batch_stats"], upd["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))


def test_resnet_eval_mode_keeps_batch_stats(resnet_vars, eval64):
  _, feats, logits, upd = eval64
  assert feats.shape == (2, 512) and logits.shape == (2, 64)
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)),
                                resnet_vars["batch_stats"], upd["batch_stats"])
  assert all(jax.tree_util.tree_leaves(same))
  out = jax.eval_shape(lambda v: ResNet18(num_classes=0).apply(v, _images(84), train=False),
                       resnet_vars)
  assert out[0].shape == (2, 512) and out[1] is None


def test_resnet_remat_same_outputs_and_grads(resnet_vars):
  x = _images(32)

  def grads(model):
    def loss(params):
      (f, lg), _ = model.apply({"params": params, "batch_stats": resnet_vars["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
      return jnp.sum(lg ** 2) + jnp.sum(f), (f, lg)
    return jax.jit(jax.grad(loss, has_aux=True))(resnet_vars["params"])

  g0, (f0, l0) = grads(ResNet18())
  g1, (f1, l1) = grads(ResNet18(remat=True))
  np.testing.assert_allclose(f1, f0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_resnet_bfloat16_close_to_float32(resnet_vars, eval64):
  x, f32, l32, _ = eval64
  f16, l16 = jax.jit(lambda v: ResNet18(dtype=jnp.bfloat16).apply(v, x, train=False))(resnet_vars)
  assert f16.dtype == l16.dtype == jnp.float32
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(f16, f32) < 0.05 and rel(l16, l32) < 0.05


@pytest.mark.parametrize("kernel,stride,pad,size", [(7, 2, 3, 22), (3, 2, 1, 21), (1, 2, 0, 21)])
def test_matmul_wgrad_conv_handles_resnet_convs(kernel, stride, pad, size):
  """The CPU conv hook (layers.conv_function) with ResNet's strides and explicit torch padding, on
  even (224 path) and odd (84 path) sizes, equals lax in outputs and both gradients."""
  x = _images(size, 2, 8)
  w = jnp.asarray(np.random.default_rng(7).normal(size=(kernel, kernel, 8, 16)), jnp.float32)

  def both(x, w):
    out = []
    for f in (jax.lax.conv_general_dilated, layers.matmul_wgrad_conv):
      loss = lambda x, w: jnp.sum(f(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
      out.append(jax.value_and_grad(loss, (0, 1))(x, w))
    return out

  (v0, (dx0, dw0)), (v1, (dx1, dw1)) = jax.jit(both)(x, w)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(dx1, dx0, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(dw1, dw0, rtol=1e-4, atol=1e-2)


def _torch_resnet_eval(torch, v, x):
  """torchvision's resnet18 forward (eval BN) written with torch.nn.functional ops."""
  F = torch.nn.functional
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  conv = lambda x, p, s, pad: F.conv2d(x, t(p["kernel"]).permute(3, 2, 0, 1), stride=s, padding=pad)
  bn = lambda x, p, st: F.batch_norm(x, t(st["mean"]), t(st["var"]), t(p["scale"]), t(p["bias"]),
                                     training=False, eps=1e-5)
  P, S = v["params"], v["batch_stats"]
  h = t(x).permute(0, 3, 1, 2)
  h = F.max_pool2d(F.relu(bn(conv(h, P["conv1"], 2, 3), P["bn1"], S["bn1"])), 3, 2, 1)
  for name in BLOCKS:
    p, s = P[name], S[name]
    stride = 2 if "downsample_conv" in p else 1
    y = F.relu(bn(conv(h, p["conv1"], stride, 1), p["bn1"], s["bn1"]))
    y = bn(conv(y, p["conv2"], 1, 1), p["bn2"], s["bn2"])
    if "downsample_conv" in p:
      h = bn(conv(h, p["downsample_conv"], stride, 0), p["downsample_bn"], s["downsample_bn"])
    h = F.relu(y + h)
  feats = h.mean(dim=(2, 3))
  return feats, F.linear(feats, t(P["fc"]["kernel"]).T, t(P["fc"]["bias"]))


def test_resnet_matches_torch_functional(resnet_vars, eval64):
  """Same numbers as PyTorch's ops on transposed weights: paddings, pool and BN agree with torch."""
  torch = pytest.importorskip("torch")
  x, feats, logits, _ = eval64
  with torch.no_grad():
    tf, tl = _torch_resnet_eval(torch, resnet_vars, x)
  scale = float(jnp.max(jnp.abs(feats)))
  np.testing.assert_allclose(feats, tf.numpy(), rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(logits, tl.numpy(), rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- patch grid

def test_patch_borders_reference_values():
  assert patch_borders(224, 3) == (0, 74, 148, 224)
  assert patch_borders(224, 5) == (0, 44, 88, 132, 176, 224)
  assert patch_borders(224, 7) == (0, 32, 64, 96, 128, 160, 192, 224)
  assert patch_borders(84, 3) == (0, 28, 56, 84)
  assert patch_borders(96, 5) == (0, 19, 38, 57, 76, 96)


@pytest.mark.parametrize("size,grid", [(224, 3), (224, 5), (224, 7), (84, 3)])
def test_weight_map_row_major_layout(size, grid):
  w = jnp.stack([jnp.arange(grid * grid, dtype=jnp.float32) + 1,
                 -(jnp.arange(grid * grid, dtype=jnp.float32) + 1)])
  m = np.asarray(weight_map(w, size, grid))
  assert m.shape == (2, size, size, 1)
  b = patch_borders(size, grid)
  for r in range(grid):
    for c in range(grid):
      region = m[:, b[r]:b[r + 1], b[c]:b[c + 1], 0]
      np.testing.assert_array_equal(region[0], r * grid + c + 1)
      np.testing.assert_array_equal(region[1], -(r * grid + c + 1))
  assert m[0, 0, -1, 0] == grid  # top-right pixel: row 0, last column


def test_fuse_algebra():
  probe, gallery = _images(84, 2, seed=5), _images(84, 2, seed=6)
  ones = lambda value: weight_map(jnp.full((2, 9), value), 84, 3)
  np.testing.assert_allclose(fuse(probe, gallery, ones(1.0)), probe)
  np.testing.assert_allclose(fuse(probe, gallery, ones(0.0)), gallery)
  np.testing.assert_allclose(fuse(probe, gallery, ones(0.25)), 0.25 * probe + 0.75 * gallery,
                             rtol=1e-6, atol=1e-6)
  # Raw weights outside [0, 1] extrapolate (the reference does not clamp).
  np.testing.assert_allclose(fuse(probe, gallery, ones(1.5)), 1.5 * probe - 0.5 * gallery,
                             rtol=1e-6, atol=1e-6)
  # Per-patch: only the weighted cell takes the probe.
  wmap = weight_map(jnp.zeros((2, 9)).at[:, 4].set(1.0), 84, 3)
  out = fuse(probe, gallery, wmap)
  np.testing.assert_allclose(out[:, 28:56, 28:56], probe[:, 28:56, 28:56])
  np.testing.assert_allclose(out[:, :28], gallery[:, :28])


# ----------------------------------------------------------------------------- deformation net

@pytest.mark.parametrize("grid", [3, 5, 7])
def test_deformation_net_224(grid):
  model = DeformationNet(grid=grid)
  x = _images(224, batch=1, channels=6)
  v = _abstract(model, 224, 6)
  params = _shapes(v["params"])
  assert set(v["params"]) == {f"encoder_{i}" for i in range(5)} | {"to_weight"}
  assert set(v["batch_stats"]) == {f"encoder_{i}" for i in range(5)}
  assert params["to_weight/kernel"] == (784, grid * grid)
  assert params["encoder_0/conv/kernel"] == (3, 3, 6, 32) and params["encoder_0/conv/bias"] == (32,)
  assert params["encoder_4/conv/kernel"] == (3, 3, 32, 16) and params["encoder_4/bn/scale"] == (16,)
  if grid == 3:  # one real run (train mode); the others only trace
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        _np_variables(v), x)
  else:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert out.shape == (1, grid * grid) and out.dtype == jnp.float32


def _torch_deformation_eval(torch, v, x):
  F = torch.nn.functional
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  P, S = v["params"], v["batch_stats"]
  h = t(x).permute(0, 3, 1, 2)
  for i in range(5):
    p, s = P[f"encoder_{i}"], S[f"encoder_{i}"]
    h = F.conv2d(h, t(p["conv"]["kernel"]).permute(3, 2, 0, 1), t(p["conv"]["bias"]), padding=1)
    h = F.batch_norm(h, t(s["bn"]["mean"]), t(s["bn"]["var"]), t(p["bn"]["scale"]),
                     t(p["bn"]["bias"]), training=False, eps=1e-5)
    h = F.max_pool2d(F.relu(h), 2)
  fc = P["to_weight"]
  return F.linear(h.reshape(h.shape[0], -1), t(fc["kernel"]).T, t(fc["bias"]))


def test_deformation_net_84_matches_torch_flatten_order():
  """84 -> 42 -> 21 -> 10 -> 5 -> 2: 64 inputs; NCHW flatten = torch Linear weight transposed."""
  model = DeformationNet()
  x = _images(84, batch=2, channels=6)
  v = _abstract(model, 84, 6)
  assert _shapes(v["params"])["to_weight/kernel"] == (64, 9)
  v = _np_variables(v)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  assert out.shape == (2, 9) and out.dtype == jnp.float32
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    ref = _torch_deformation_eval(torch, v, x).numpy()
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [42, 21, 11, 4, 3])
def test_separable_max_pool_is_torchs_maxpool_3x3_s2_p1(size):
  """Values and gradient of resnet.max_pool_3x3_s2_p1 against a -inf-padded 3x3/2 reduce_window
  (torch's MaxPool2d(3, 2, 1)), on ReLU maps (zeros: ties) and odd sizes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fewshot_jax.models import resnet  # pylint: disable=g-import-not-at-top
  x = jax.nn.relu(jax.random.normal(jax.random.key(size), (2, size, size, 3)))

  def window(v):
    v = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(v, (3, 3), strides=(2, 2), padding="VALID")

  out = resnet.max_pool_3x3_s2_p1(x)
  assert out.shape == (2, (size - 1) // 2 + 1, (size - 1) // 2 + 1, 3)
  np.testing.assert_array_equal(out, window(x))
  # Gradients on continuous values (no ties; at a tie torch and XLA pick one element, jnp.maximum
  # splits, and after a ReLU tied maxima are zeros whose ReLU gradient is 0 anyway).
  y = jax.random.normal(jax.random.key(size + 1), x.shape)
  grad = lambda f: jax.grad(lambda v: (f(v) ** 3).sum())(y)
  np.testing.assert_array_equal(grad(resnet.max_pool_3x3_s2_p1), grad(window))
