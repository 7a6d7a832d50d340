"""PyTorch -> Flax conversion: numerical parity with the PyTorch reference models, files
saved the reference's way, and strict, all-at-once error reports.

Weights are random (torch init) with BatchNorm statistics taken from a batch and
then perturbed, so inference-mode BatchNorm is neither the identity nor blows
activations up; float32 throughout, parity to 1e-4 absolute (1e-5 relative for
squared distances, whose values are in the hundreds). Small inputs (64 px
for the ResNet, 84 for GNet, one 224 case for the 784-wide toWeight) keep the
file quick on a CPU.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fewshot_jax import convert
from fewshot_jax.errors import ConfigError
from fewshot_jax.errors import CheckpointError
from fewshot_jax.methods import common
from fewshot_jax.methods import idemenet_torch
from fewshot_jax.methods import protonet_torch
from fewshot_jax.models import conv4 as flax_conv4
from fewshot_jax.models import deformation
from fewshot_jax.models import resnet
from fewshot_jax.torch_reference import conv4 as torch_conv4
from fewshot_jax.torch_reference import idemenet
from fewshot_jax.torch_reference import resnet as torch_resnet

ATOL = 1e-4
RTOL = 1e-5
MAX_DIFF = {}  # name -> max abs difference, printed at the end with -s


def _check(name, flax_value, torch_value, relative=False):
  """Max abs difference below ATOL; `relative` divides it by the largest |value| first (for
  squared distances of 512-d embeddings, where float32 rounding of the embeddings is
  amplified by the distance's magnitude and the a^2 + b^2 - 2ab form cancels)."""
  a, b = np.asarray(flax_value), torch_value.detach().numpy()
  assert a.shape == b.shape, (name, a.shape, b.shape)
  diff = float(np.max(np.abs(a - b)))
  if relative:
    diff /= float(np.max(np.abs(b)))
    name += " (relative)"
  MAX_DIFF[name] = max(diff, MAX_DIFF.get(name, 0.0))
  assert diff < (RTOL if relative else ATOL), f"{name}: max {'relative' if relative else 'abs'} difference {diff:.2e}"


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  for name, diff in sorted(MAX_DIFF.items()):
    print(f"\n  max |flax - torch| {name}: {diff:.2e}", end="")


def _images(n, size, channels=3, seed=0):
  return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32))


def _nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _calibrate(model, *inputs, seed=0):
  """Running statistics from a training-mode pass, then perturbed, and random BN affines."""
  gen = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.reset_running_stats()
      m.momentum = None  # cumulative average: exactly this batch's statistics
  model.train()
  with torch.no_grad():
    model(*inputs)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.running_mean += 0.1 * torch.randn(c, generator=gen)
        m.running_var *= 0.8 + 0.4 * torch.rand(c, generator=gen)
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.1 * torch.randn(c, generator=gen))
        m.momentum = 0.1
  return model.eval()


def _gnet(grid, size, seed=0):
  torch.manual_seed(seed)
  net = idemenet.GNet(grid=grid, weight_features=idemenet.weight_features(size))
  probe, gallery = _images(4, size, seed=seed + 1), _images(4, size, seed=seed + 2)
  _calibrate(net, probe, gallery, seed=seed)
  with torch.no_grad():
    net.scale.fill_(0.37)
  return net, probe, gallery


def _split(variables, part):
  return {"params": variables["params"][part], "batch_stats": variables["batch_stats"][part]}


@pytest.fixture(scope="module")
def classification_net():
  torch.manual_seed(0)
  net = torch_resnet.ClassificationNetwork(64)
  x = _images(4, 64)
  return _calibrate(net, x), x


@pytest.fixture(scope="module")
def gnet84():
  return _gnet(3, 84)


def _embedding_parity(variables, net, x, tag):
  features, logits = resnet.ResNet18(num_classes=64).apply(variables, _nhwc(x), train=False)
  with torch.no_grad():
    _check(f"ResNet-18 features ({tag})", features, net.embed(x))
    _check(f"ResNet-18 logits ({tag})", logits, net(x))


def test_state_dict_keys_are_torchvisions(classification_net):
  keys = list(classification_net[0].state_dict())
  assert keys[:3] == ["convnet.conv1.weight", "convnet.bn1.weight", "convnet.bn1.bias"]
  assert "convnet.layer2.0.downsample.0.weight" in keys and "convnet.layer1.0.downsample.0.weight" not in keys
  assert keys[-2:] == ["convnet.fc.weight", "convnet.fc.bias"] and len(keys) == 122


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_converted_trees_are_the_flax_models_trees(classification_net, gnet84):
  """Same names and shapes as init: apply would silently ignore extra parameters."""
  images = jnp.zeros((1, 84, 84, 3))
  embedding = jax.eval_shape(lambda: resnet.ResNet18(num_classes=64).init(jax.random.key(0), images, train=False))
  assert _shapes(idemenet_torch.embedding_from_torch(classification_net[0].state_dict())) == _shapes(embedding)
  deform = jax.eval_shape(lambda: deformation.DeformationNet(grid=3).init(
      jax.random.key(0), jnp.zeros((1, 84, 84, 6)), train=False))
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  full = {"params": {"embedding": embedding["params"], "deformation": deform["params"], "scale": scale},
          "batch_stats": {"embedding": embedding["batch_stats"], "deformation": deform["batch_stats"]}}
  converted = idemenet_torch.idemenet_from_torch(gnet84[0].state_dict(), image_size=84)
  assert _shapes(converted) == _shapes(full)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(converted))


def test_embedding_parity(classification_net):
  net, x = classification_net
  _embedding_parity(idemenet_torch.embedding_from_torch(net.state_dict()), net, x, "state_dict")


def test_gnet_state_dict_has_the_reference_keys(gnet84):
  keys = set(gnet84[0].state_dict())
  assert {"scale", "toWeight.0.weight", "attentionNet.encoder.4.0.bias", "attentionNet.encoder.4.1.running_var",
          "CNet.conv1.weight", "CNet.layer4.1.bn2.running_mean", "CNet.resnet.convnet.conv1.weight",
          "CNet.resnet.convnet.fc.weight", "fc.weight"} <= keys
  assert gnet84[0].state_dict()["toWeight.0.weight"].shape == (9, 64)


def test_patch_borders_match_the_reference():
  assert deformation.patch_borders(224, 3) == (0, 74, 148, 224)
  assert deformation.patch_borders(224, 5) == (0, 44, 88, 132, 176, 224)
  assert deformation.patch_borders(224, 7) == (0, 32, 64, 96, 128, 160, 192, 224)
  for size in (84, 224):
    for grid in (3, 5, 7):
      assert list(deformation.patch_borders(size, grid)) == idemenet.patch_borders(size, grid)


def _gnet_parity(net, probe, gallery, variables, grid, tag):
  """Patch weights, deformed images, embeddings, fc logits and prototype logits of both frameworks."""
  size = probe.shape[-1]
  pairs = jnp.concatenate([_nhwc(probe), _nhwc(gallery)], -1)
  weights = deformation.DeformationNet(grid=grid).apply(_split(variables, "deformation"), pairs, train=False)
  with torch.no_grad():
    t_weights = net.patch_weights(probe, gallery)
    _check(f"patch weights ({tag})", weights, t_weights)
    deformed = deformation.fuse(_nhwc(probe), _nhwc(gallery), deformation.weight_map(weights, size, grid))
    t_deformed = net.deform(probe, gallery, t_weights)
    _check(f"deformed images ({tag})", deformed, t_deformed.permute(0, 2, 3, 1))
    features, logits = resnet.ResNet18(num_classes=64).apply(_split(variables, "embedding"), deformed, train=False)
    t_features = net.embed(t_deformed)
    _check(f"embeddings of deformed images ({tag})", features, t_features)
    _check(f"GNet fc logits ({tag})", logits, net.classify(t_features))
    labels = np.array([0, 1, 0])
    ways = 2
    scale = variables["params"]["scale"]
    assert scale.shape == () and np.isclose(scale, 0.37)
    head = lambda f: -scale * common.squared_distances(f[3:], common.prototypes(f[:3], jnp.asarray(labels), ways))
    t_logits = net.prototype_logits(t_features[:3], torch.from_numpy(labels), t_features[3:], ways)
    # The same (torch) embeddings through both heads: the converted scale and the formula. Relative:
    # the logits reach ~1e3, where one float32 rounding step is 1.2e-4 (measured: 1.22e-4 at 64 px).
    _check(f"prototype logits, same embeddings ({tag})", head(jnp.asarray(t_features.numpy())), t_logits,
           relative=True)
    # Each framework's own embeddings, end to end: the logits are in the hundreds here, and
    # the embeddings' own 1e-5-level float32 differences scale with them, so relative.
    _check(f"prototype logits ({tag})", head(features), t_logits, relative=True)


def test_gnet_parity(gnet84):
  net, probe, gallery = gnet84
  variables = idemenet_torch.idemenet_from_torch(net.state_dict(), grid=3, image_size=84)
  _gnet_parity(net, probe, gallery, variables, 3, "84 px, G=3")


def test_patch_weights_parity_grid5():
  net, probe, gallery = _gnet(5, 84, seed=1)
  variables = idemenet_torch.idemenet_from_torch(net.state_dict(), grid=5, image_size=84)
  pairs = jnp.concatenate([_nhwc(probe), _nhwc(gallery)], -1)
  weights = deformation.DeformationNet(grid=5).apply(_split(variables, "deformation"), pairs, train=False)
  with torch.no_grad():
    t_weights = net.patch_weights(probe, gallery)
    _check("patch weights (84 px, G=5)", weights, t_weights)
    deformed = deformation.fuse(_nhwc(probe), _nhwc(gallery), deformation.weight_map(weights, 84, 5))
    _check("deformed images (84 px, G=5)", deformed, net.deform(probe, gallery, t_weights).permute(0, 2, 3, 1))


def test_patch_weights_parity_224():
  """The reference's own size: toWeight is Linear(784, 9) on the NCHW-flattened 16x7x7 map."""
  torch.manual_seed(2)
  net = idemenet.AttentionNet()
  to_weight = torch.nn.Linear(784, 9)
  probe, gallery = _images(2, 224, seed=3), _images(2, 224, seed=4)
  _calibrate(net, torch.cat((probe, gallery), 1), seed=2)
  gnet = idemenet.GNet(grid=3)
  state = {**gnet.state_dict(), **{f"attentionNet.{k}": v for k, v in net.state_dict().items()},
           **{f"toWeight.0.{k}": v for k, v in to_weight.state_dict().items()}}
  variables = idemenet_torch.idemenet_from_torch(state)
  pairs = jnp.concatenate([_nhwc(probe), _nhwc(gallery)], -1)
  weights = deformation.DeformationNet(grid=3).apply(_split(variables, "deformation"), pairs, train=False)
  with torch.no_grad():
    _check("patch weights (224 px, G=3)", weights, to_weight(net(torch.cat((probe, gallery), 1))))


def test_checkpoint_saved_by_the_reference(classification_net, tmp_path):
  net, x = classification_net
  path = tmp_path / "softRandom.t7"
  torch.save(net.state_dict(), path)
  state = convert.load_state_dict(path)
  assert all(isinstance(v, np.ndarray) for v in state.values()) and "convnet.bn1.num_batches_tracked" in state
  _embedding_parity(idemenet_torch.embedding_from_torch(state, source=str(path)), net, x, "softRandom.t7")


def test_data_parallel_gnet_checkpoint(gnet84, tmp_path):
  net, probe, gallery = gnet84
  path = tmp_path / "metaNet_5shot.t7"
  torch.save(torch.nn.DataParallel(net).state_dict(), path)  # keys module.*
  assert next(iter(torch.load(path, weights_only=True))).startswith("module.")
  variables = idemenet_torch.idemenet_from_torch(convert.load_state_dict(path), image_size=84, source=str(path))
  _gnet_parity(net, probe, gallery, variables, 3, "DataParallel file")


def test_conv4_parity():
  torch.manual_seed(3)
  net = torch_conv4.Conv4()
  x = _images(4, 28, seed=5)
  _calibrate(net, x, seed=3)
  variables = protonet_torch.conv4_from_torch(net.state_dict())
  out = flax_conv4.Conv4().apply(variables, _nhwc(x), train=False)
  with torch.no_grad():
    t_out = net(x)
  # Same numbers, flattened NHWC in Flax and NCHW in torch.
  _check("Conv-4 embeddings", out.reshape(4, 1, 1, 64).transpose(0, 3, 1, 2).reshape(4, -1), t_out)
  _check("Conv-4 squared distances", common.squared_distances(out, out), torch.cdist(t_out, t_out).pow(2),
         relative=True)


# --- strictness -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_state():
  torch.manual_seed(0)
  return {k: v.numpy() for k, v in torch_resnet.ClassificationNetwork(64).state_dict().items()}


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(CheckpointError) as info:
    fn(*args, **kwargs)
  return str(info.value)


def test_missing_key(embedding_state):
  state = dict(embedding_state)
  del state["convnet.layer3.1.bn2.running_var"]
  message = _error(idemenet_torch.embedding_from_torch, state, source="ckpt.t7")
  assert "ckpt.t7" in message and "1 missing key: convnet.layer3.1.bn2.running_var" in message


def test_unexpected_key(embedding_state):
  message = _error(idemenet_torch.embedding_from_torch, {**embedding_state, "convnet.extra.weight": np.zeros(3)})
  assert "1 unexpected key: convnet.extra.weight" in message


def test_wrong_shape(embedding_state):
  message = _error(idemenet_torch.embedding_from_torch, {**embedding_state, "convnet.fc.weight": np.zeros((10, 512))})
  assert "convnet.fc.weight is [10, 512] in the checkpoint but [64, 512] expected" in message


def test_all_problems_in_one_error(embedding_state):
  state = {**embedding_state, "convnet.extra.weight": np.zeros(3), "convnet.extra.bias": np.zeros(3),
           "convnet.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1))}
  del state["convnet.bn1.weight"], state["convnet.fc.bias"]
  message = _error(idemenet_torch.embedding_from_torch, state)
  for part in ("2 missing keys: convnet.bn1.weight, convnet.fc.bias",
               "2 unexpected keys: convnet.extra.weight, convnet.extra.bias",
               "1 wrong shape: convnet.layer1.0.conv1.weight is [64, 64, 1, 1]"):
    assert part in message, message


def test_gnet_given_to_the_embedding_converter_names_the_right_one(gnet84):
  message = _error(idemenet_torch.embedding_from_torch, gnet84[0].state_dict())
  assert "use idemenet_from_torch" in message


def test_duplicate_copies_must_agree(gnet84):
  state = dict(gnet84[0].state_dict())
  for key in ("CNet.resnet.convnet.layer2.0.conv1.weight", "CNet.resnet.convnet.bn1.running_mean"):
    state[key] = state[key] + 1.0
  state["CNet.resnet.convnet.fc.weight"] = state["CNet.resnet.convnet.fc.weight"] + 1.0  # unused: no error
  message = _error(idemenet_torch.idemenet_from_torch, state, image_size=84)
  assert "2 duplicates differing from their originals" in message
  assert ("CNet.resnet.convnet.bn1.running_mean != CNet.bn1.running_mean" in message
          and "CNet.resnet.convnet.layer2.0.conv1.weight != CNet.layer2.0.conv1.weight" in message)
  assert "fc.weight" not in message


def test_unused_duplicate_fc_is_dropped(gnet84):
  variables = idemenet_torch.idemenet_from_torch(gnet84[0].state_dict(), image_size=84)
  np.testing.assert_array_equal(variables["params"]["embedding"]["fc"]["kernel"],
                                gnet84[0].fc.weight.detach().numpy().T)
  assert set(variables["params"]) == {"embedding", "deformation", "scale"}
  assert set(variables["batch_stats"]) == {"embedding", "deformation"}


def test_wrong_image_size_is_a_shape_error(gnet84):
  message = _error(idemenet_torch.idemenet_from_torch, gnet84[0].state_dict(), image_size=224)
  assert "toWeight.0.weight is [9, 64] in the checkpoint but [9, 784] expected" in message


class _Payload:
  """Unpickling this runs a shell command: what a hostile .t7 could carry."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pickle_carrying_code_is_refused(tmp_path):
  marker = tmp_path / "payload_ran"
  path = tmp_path / "evil.t7"
  torch.save({"convnet.conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
  message = _error(convert.load_state_dict, path)
  assert str(path) in message and "refused" in message
  assert not marker.exists()
  torch.load(path, weights_only=False)  # the payload is live: a plain load runs it
  assert marker.exists()


def test_not_a_flat_mapping_of_tensors(tmp_path):
  path = tmp_path / "nested.t7"
  torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, path)
  message = _error(convert.load_state_dict, path)
  assert str(path) in message and "'state_dict' is a dict, not a tensor" in message


def test_corrupt_and_missing_files(tmp_path):
  path = tmp_path / "corrupt.t7"
  path.write_bytes(b"not a checkpoint")
  message = _error(convert.load_state_dict, path)
  assert str(path) in message and "not a torch.save file" in message and "text" in message
  (tmp_path / "empty.t7").write_bytes(b"")
  assert "is empty (0 bytes)" in _error(convert.load_state_dict, tmp_path / "empty.t7")
  (tmp_path / "random.t7").write_bytes(np.random.default_rng(0).integers(1, 256, 4096, np.uint8).tobytes())
  assert "not a torch.save file: it starts with binary data" in _error(convert.load_state_dict,
                                                                     tmp_path / "random.t7")
  whole = tmp_path / "whole.t7"
  torch.save({"w": torch.zeros(1000)}, whole)
  (tmp_path / "truncated.t7").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  assert "is truncated or corrupt" in _error(convert.load_state_dict, tmp_path / "truncated.t7")
  legacy = tmp_path / "legacy.t7"
  torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
  (tmp_path / "legacy_cut.t7").write_bytes(legacy.read_bytes()[:100])
  assert "is truncated or corrupt" in _error(convert.load_state_dict, tmp_path / "legacy_cut.t7")
  missing = tmp_path / "absent.t7"
  message = _error(convert.load_state_dict, missing)
  assert str(missing) in message and "does not exist" in message


def test_without_torch_only_loading_needs_it(tmp_path):
  """convert imports without torch; load_state_dict then says how to install it."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "from fewshot_jax import convert\n"
          "from fewshot_jax.errors import CheckpointError\n"
          "try:\n"
          f"  convert.load_state_dict({str(tmp_path / 'x.t7')!r})\n"
          "except CheckpointError as e:\n"
          "  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  assert "pip install 'fewshot_jax[torch]'" in out.stdout, out


@pytest.mark.slow
def test_convert_mode_round_trip(make_config, tmp_path, classification_net):
  """--mode=convert writes orbax checkpoints that load like any other and give PyTorch's outputs:
  a softRandom-like embedding file (stage 1) and a DataParallel GNet file (stage 2, gallery built
  from the real base classes with the converted embedding)."""
  from fewshot_jax import restore
  from fewshot_jax import sharding
  from fewshot_jax.methods import idemenet as idemenet_method
  size = 64  # as the other parity tests: at 32 px the 1x1 layer4 maps amplify float32 noise
  small = {"data.input_size": size}
  net, _ = classification_net  # seed 0, calibrated on _images(4, 64)
  torch.save(net.state_dict(), tmp_path / "softRandom.t7")
  stage1 = make_config("idemenet", "pretrain", **small)
  convert.convert_to_workdir(stage1, str(tmp_path / "softRandom.t7"), str(tmp_path / "e"))
  _, state = restore.load_for_eval(stage1, str(tmp_path / "e"), sharding.make_mesh(), "best")
  x = _images(3, size, seed=5)
  _embedding_parity({"params": state.params, **state.model_state}, net, x, "converted workdir")
  direct = idemenet_torch.embedding_from_torch(convert.load_state_dict(tmp_path / "softRandom.t7"))
  for a, b in zip(jax.tree.leaves(direct["params"]), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)  # orbax round trip is exact
  # Another file into the same workdir: refused, the old model kept; with overwrite, replaced.
  other = _calibrate(torch_resnet.ClassificationNetwork(64), _images(4, size, seed=9))
  torch.save(other.state_dict(), tmp_path / "other.t7")
  with pytest.raises(ConfigError, match="already holds checkpoints"):
    convert.convert_to_workdir(stage1, str(tmp_path / "other.t7"), str(tmp_path / "e"))
  _, kept = restore.load_for_eval(stage1, str(tmp_path / "e"), sharding.make_mesh(), "best")
  np.testing.assert_array_equal(jax.tree.leaves(kept.params)[0], jax.tree.leaves(state.params)[0])
  convert.convert_to_workdir(stage1, str(tmp_path / "other.t7"), str(tmp_path / "e"), overwrite=True)
  _, replaced = restore.load_for_eval(stage1, str(tmp_path / "e"), sharding.make_mesh(), "best")
  want = idemenet_torch.embedding_from_torch(convert.load_state_dict(tmp_path / "other.t7"))
  for a, b in zip(jax.tree.leaves(want["params"]), jax.tree.leaves(replaced.params)):
    np.testing.assert_array_equal(a, b)
  assert not (tmp_path / "e" / "lock").exists()

  gnet, probe, gallery = _gnet(3, size)
  torch.save({f"module.{k}": v for k, v in gnet.state_dict().items()}, tmp_path / "metaNet_1shot.t7")
  stage2 = make_config("idemenet", "mini-5w1s", **small, **{"method.gallery_per_class": 2})
  convert.convert_to_workdir(stage2, str(tmp_path / "metaNet_1shot.t7"), str(tmp_path / "g"))
  _, state2 = restore.load_for_eval(stage2, str(tmp_path / "g"), sharding.make_mesh(), "best")
  variables = {"params": state2.params, "batch_stats": state2.model_state["batch_stats"]}
  _gnet_parity(gnet, probe, gallery, variables, 3, "converted workdir")
  g = state2.model_state["gallery"]
  assert g["images"].shape == (64 * 2, 84, 84, 3)
  # Gallery features are the converted embedding's, with BatchNorm in training mode over the first
  # chunk (method.gallery_bn='train'); the stored statistics stay the file's (the parity check above).
  model = idemenet_method.embedding_model(stage2)
  chunk = stage2.method.gallery_bn_chunk
  (want, _), _ = model.apply(_split(variables, "embedding"),
                             idemenet_method.preprocess(stage2, g["images"][:chunk]), train=True,
                             mutable=["batch_stats"])
  np.testing.assert_allclose(g["features"][:8], want[:8], rtol=1e-4, atol=1e-4)
