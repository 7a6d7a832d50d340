"""JAX vs PyTorch accuracy comparison (fewshot_jax.compare) on 32x32 random images.

Random IDeMe-Net and stage-1 embeddings with non-trivial BatchNorm
parameters and statistics (so a swapped mean/var or scale/bias would show),
evaluated on the evaluator's own episodes: both frameworks must give the same
accuracies (within 0.1 points), the same predictions (>= 99%) and logits within
1e-3 relative; the JAX accuracies must be those of evaluate.Evaluator.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fewshot_jax import checkpoint  # pylint: disable=g-import-not-at-top
from fewshot_jax import compare
from fewshot_jax import convert
from fewshot_jax import evaluate
from fewshot_jax import methods
from fewshot_jax import restore
from fewshot_jax import sharding
from fewshot_jax import state_dicts
from fewshot_jax import state as state_lib
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import CheckpointError, ConfigError
from fewshot_jax.methods import idemenet
from fewshot_jax.methods import idemenet_torch
from tests import test_idemenet as ti
from tests.conftest import load_config

EPISODES = 3  # two batches of eval.tasks = 2, the second cut to one episode


@functools.lru_cache(maxsize=None)
def _dataset():
  """8 classes of 10 images, each a faint class pattern under strong noise: random networks score
  well below 100%, so wrong predictions (and near ties) occur."""
  rng = np.random.default_rng(3)
  protos = rng.uniform(0, 255, (ti.CLASSES, 1, ti.SIZE, ti.SIZE, 3))
  noise = rng.normal(0, 50, (ti.CLASSES, ti.PER_CLASS, ti.SIZE, ti.SIZE, 3))
  images = np.clip(128 + 0.6 * (protos - 128) + noise, 0, 255).astype(np.uint8).reshape(-1, ti.SIZE, ti.SIZE, 3)
  return images, jax.device_put(episodes.from_arrays(images, np.repeat(np.arange(ti.CLASSES), ti.PER_CLASS)))


def _eval_settings(c):
  c.eval.update(queries=3, tasks=2, seed=7)
  return c


def _random_variables(method, config, seed):
  """Numpy-random params and BatchNorm statistics for method.init's shapes (jitting a ResNet
  init costs ~20 s of XLA:CPU compile here); BN scale / bias / mean / var away from their init
  values, so a swapped mean / var or scale / bias would show."""
  example = state_lib.train_example(method, config)
  abstract = jax.eval_shape(method.init, jax.random.key(0), example)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.6, 1.4, size=shape)
    else:  # bias, mean
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return (jax.tree_util.tree_map_with_path(fill, abstract["params"]),
          jax.tree_util.tree_map_with_path(fill, abstract["batch_stats"]))


@functools.lru_cache(maxsize=None)
def _idemenet_variables():
  config = _eval_settings(ti._config())  # pylint: disable=protected-access
  method = methods.build(config)
  params, stats = _random_variables(method, config, 0)
  # Patch weights near 0.5 +- 0.3 (a trained D's range), not the unbounded values of random
  # weights, whose extrapolated images would swamp the prototypes.
  to_weight = params["deformation"]["to_weight"]
  to_weight["kernel"] = to_weight["kernel"] * (0.3 / float(jnp.abs(to_weight["kernel"]).sum(0).max()))
  to_weight["bias"] = to_weight["bias"] + 0.5
  images, data = _dataset()
  idx, labels = idemenet.choose_gallery(np.asarray(data.class_index), np.asarray(data.class_counts),
                                        config.method.gallery_per_class, 0)
  gallery = jnp.asarray(images[idx])
  # Random gallery features (they only steer the candidate choice, which both frameworks share);
  # embedding the gallery would cost one more XLA compile.
  feats = jnp.asarray(np.random.default_rng(5).normal(0, 10, (len(idx), 512)), jnp.float32)
  state = {"batch_stats": stats, "gallery": {"images": gallery, "labels": jnp.asarray(labels), "features": feats}}
  return config, method, params, state


@functools.lru_cache(maxsize=None)
def _pretrain_variables():
  config = _eval_settings(load_config("idemenet", "pretrain"))
  config.data.update(image_size=ti.SIZE, input_size=ti.SIZE)
  config.method.num_classes = ti.CLASSES
  method = methods.build(config)
  params, stats = _random_variables(method, config, 1)
  return config, method, params, {"batch_stats": stats}


def _report(name, mode, m):
  print(f"\n  {name}/{mode}: jax {m['jax']['accuracy']:.2f} torch {m['torch']['accuracy']:.2f} "
        f"difference {m['difference']:.3f} agreement {m['prediction_agreement']:.4f} "
        f"max rel logit diff {m['max_logit_rel_diff']:.2e}", end="")


def test_compare_checkpoint_idemenet_agrees_and_matches_the_evaluator(tmp_path, monkeypatch):
  """End to end: a saved best checkpoint, compare_checkpoint, compare_test.json; the JAX side
  gives the evaluator's per-episode accuracies, PyTorch the same within tolerance."""
  config, method, params, state = _idemenet_variables()
  _, data = _dataset()
  tx = state_lib.optimizer_for(method, config)
  ts = state_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params, model_state=state,
                            opt_state=tx.init(params))
  ckpt = checkpoint.Checkpoints(str(tmp_path), 1)
  ckpt.save(ckpt.best, ts, checkpoint.checkpoint_meta(config), metrics={"val_accuracy": 0.5})
  ckpt.wait()
  ckpt.close()
  monkeypatch.setattr(input_pipeline, "load", lambda *args, **kwargs: data)
  result = compare.compare_checkpoint(config, str(tmp_path), episodes=EPISODES)
  with open(tmp_path / "compare_test.json") as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert result["episodes"] == EPISODES and result["step"] == 5 and set(result["modes"]) == {"deformed", "plain"}
  evaluator = evaluate.Evaluator(method, config, sharding.make_mesh(), "test", EPISODES, dataset=data,
                                 protocol="standard")
  want = evaluator.per_episode(params, state)
  for mode, m in result["modes"].items():
    np.testing.assert_allclose(result["per_episode"][mode]["jax"], want[mode], atol=1e-6)  # same counts
    _report("idemenet", mode, m)
    assert m["difference"] <= compare.TOLERANCE_POINTS and m["within_tolerance"], (mode, m)
    assert m["prediction_agreement"] >= 0.99, (mode, m)
    assert m["max_logit_rel_diff"] < 1e-3, (mode, m)
  # The deformed supports matter: the modes score differently.
  assert result["per_episode"]["deformed"]["torch"] != result["per_episode"]["plain"]["torch"]
  table = compare.format_table(result)
  assert "| deformed |" in table and "| plain |" in table and "step 5" in table


def test_idemenet_pretrain_jax_and_torch_agree():
  config, _, params, state = _pretrain_variables()
  _, data = _dataset()
  batches, key = compare.standard_episode_batches(config, data, EPISODES)
  got = compare.compare_on_episodes(config, params, state, batches, key,
                                    num_episodes=EPISODES, return_logits=True)
  assert set(got) == {"default"}
  r = got["default"]
  assert r["jax"].shape == r["torch"].shape == (EPISODES,)
  m = compare.summarize_comparison(got)["default"]
  _report("idemenet_pretrain", "default", m)
  assert m["difference"] <= compare.TOLERANCE_POINTS and m["prediction_agreement"] >= 0.99
  jl, tl = r["jax_logits"], r["torch_logits"]
  assert jl.shape == tl.shape == (EPISODES, 15, 5)
  assert np.abs(jl - tl).max() / np.abs(tl).max() < 1e-3


def test_flax_to_torch_inverts_the_converters_exactly():
  config, _, params, state = _idemenet_variables()
  net = idemenet_torch.gnet_to_torch(params, state["batch_stats"], config)
  sd = net.state_dict()
  # The duplicate trunk is the same tensors; the unused stage-1 head carries GNet's fc.
  assert torch.equal(sd["CNet.resnet.convnet.layer3.1.bn2.running_var"], sd["CNet.layer3.1.bn2.running_var"])
  assert torch.equal(sd["CNet.resnet.convnet.fc.weight"], sd["fc.weight"])
  back = idemenet_torch.idemenet_from_torch(sd, grid=3, num_classes=ti.CLASSES, image_size=ti.SIZE)
  want = {"params": params, "batch_stats": state["batch_stats"]}
  assert jax.tree.structure(back) == jax.tree.structure(state_dicts.plain(want))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, np.asarray(b))
  p_config, _, p_params, p_state = _pretrain_variables()
  cnet = idemenet_torch.embedding_to_torch(p_params, p_state["batch_stats"], p_config.method.num_classes)
  back = idemenet_torch.embedding_from_torch(cnet.state_dict(), num_classes=ti.CLASSES)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"params": p_params, "batch_stats": p_state["batch_stats"]})):
    np.testing.assert_array_equal(a, np.asarray(b))


def _save_best(config, method, params, state, directory, step=5):
  tx = state_lib.optimizer_for(method, config)
  ts = state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, model_state=state,
                            opt_state=tx.init(params))
  ckpt = checkpoint.Checkpoints(str(directory), 1)
  ckpt.save(ckpt.best, ts, checkpoint.checkpoint_meta(config), metrics={"val_accuracy": 0.5})
  ckpt.wait()
  ckpt.close()


def test_export_writes_the_authors_format_and_converts_back_exactly(tmp_path):
  """--mode=export: a saved best checkpoint -> a .t7 that torch.load(weights_only=True) reads, with
  GNet's keys (duplicate trunk included), which the converter turns back into the same variables."""
  config, method, params, state = _idemenet_variables()
  _save_best(config, method, params, state, tmp_path / "run")
  out = tmp_path / "metaNet_1shot.t7"
  info = convert.export_checkpoint(config, str(tmp_path / "run"), str(out))
  assert info["step"] == 5 and info["method"] == "idemenet" and not list(tmp_path.glob(".*.tmp"))
  sd = convert.load_state_dict(str(out))
  assert {"CNet.resnet.convnet.conv1.weight", "CNet.conv1.weight", "attentionNet.encoder.0.0.weight", "toWeight.0.weight",
          "fc.weight", "scale"} <= set(sd), sorted(sd)[:10]
  back = idemenet_torch.idemenet_from_torch(sd, grid=3, num_classes=ti.CLASSES, image_size=ti.SIZE, source=str(out))
  want = state_dicts.plain({"params": params, "batch_stats": state["batch_stats"]})
  assert jax.tree.structure(back) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  p_config, p_method, p_params, p_state = _pretrain_variables()
  _save_best(p_config, p_method, p_params, p_state, tmp_path / "pre")
  convert.export_checkpoint(p_config, str(tmp_path / "pre"), str(tmp_path / "softRandom.t7"))
  sd = convert.load_state_dict(str(tmp_path / "softRandom.t7"))
  assert all(k.startswith("convnet.") for k in sd) and "convnet.fc.weight" in sd
  back = idemenet_torch.embedding_from_torch(sd, num_classes=ti.CLASSES)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"params": p_params, "batch_stats": p_state["batch_stats"]})):
    np.testing.assert_array_equal(a, np.asarray(b))
  with pytest.raises(ConfigError, match="not a directory"):
    convert.export_checkpoint(config, str(tmp_path / "run"), str(tmp_path / "missing" / "x.t7"))
  with pytest.raises(CheckpointError, match="method is 'idemenet' in the checkpoint but 'protonet'"):
    convert.export_checkpoint(load_config("protonet", "synthetic"), str(tmp_path / "run"), str(out))


def test_summary_table_and_unsupported_method(monkeypatch):
  per_mode = {"deformed": {"jax": np.array([0.6, 0.8]), "torch": np.array([0.6, 0.8]),
                           "agreement": np.array([1.0, 0.95]), "logit_rel_diff": np.array([1e-6, 2e-6])}}
  modes = compare.summarize_comparison(per_mode)
  assert modes["deformed"]["jax"]["accuracy"] == pytest.approx(70.0)
  assert modes["deformed"]["difference"] == 0.0 and modes["deformed"]["within_tolerance"]
  assert modes["deformed"]["prediction_agreement"] == pytest.approx(0.975)
  table = compare.format_table({"method": "idemenet", "episodes": 2, "split": "test", "modes": modes})
  assert "| deformed | 70.00 ± 13.86 | 70.00 ± 13.86 | 0.000 | 97.50% |" in table
  c = load_config("protonet", "synthetic")
  monkeypatch.setattr(methods, "torch_bridge_module", lambda name: None)  # as a method without a bridge
  with pytest.raises(ConfigError, match="method.name='protonet'"):
    compare.compare_checkpoint(c, "/nonexistent")


@functools.lru_cache(maxsize=None)
def _gray_dataset():
  """8 classes of 10 noisy 28x28 grey images (the synthetic presets' shape)."""
  rng = np.random.default_rng(4)
  protos = rng.uniform(0, 255, (8, 1, 28, 28, 1))
  noise = rng.normal(0, 60, (8, 10, 28, 28, 1))
  images = np.clip(128 + 0.6 * (protos - 128) + noise, 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return jax.device_put(episodes.from_arrays(images, np.repeat(np.arange(8), 10)))


@pytest.mark.parametrize("name", ["protonet", "matchingnet", "lgmnet"])
def test_every_method_compares_exports_and_converts_back(name, tmp_path, monkeypatch):
  """--mode=compare, export and convert for the methods beside IDeMe-Net: a saved best checkpoint,
  JAX and PyTorch agree on the evaluator's episodes in every mode, and export -> convert gives
  bit-identical variables."""
  config = _eval_settings(load_config(name, "synthetic"))
  method = methods.build(config)
  params, stats = _random_variables(method, config, 2)
  state = {"batch_stats": stats}
  _save_best(config, method, params, state, tmp_path / "run")
  data = _gray_dataset()
  monkeypatch.setattr(input_pipeline, "load", lambda *args, **kwargs: data)
  result = compare.compare_checkpoint(config, str(tmp_path / "run"), episodes=EPISODES)
  modes = {"lgmnet": {"single", "mean", "ensemble"}}.get(name, {"default"})
  assert set(result["modes"]) == modes and result["default_mode"] == method.checkpoint_mode(config)
  for mode, m in result["modes"].items():
    _report(name, mode, m)
    assert m["difference"] <= compare.TOLERANCE_POINTS and m["prediction_agreement"] >= 0.99, (mode, m)
    # An ensemble's scores count votes: a near tie in one draw moves a count by 1 without changing
    # the prediction, so only its predictions are compared (its draws are 'single''s, checked here).
    assert mode == "ensemble" or m["max_logit_rel_diff"] < 1e-3, (mode, m)
  out = tmp_path / "model.pt"
  info = convert.export_checkpoint(config, str(tmp_path / "run"), str(out))
  assert info["method"] == name and info["step"] == 5
  convert.convert_to_workdir(config, str(out), str(tmp_path / "back"))
  _, back = restore.load_for_eval(config, str(tmp_path / "back"), sharding.make_mesh(), "best")
  got = state_dicts.plain({"params": back.params, **back.model_state})
  expected = state_dicts.plain({"params": params, **state})
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
