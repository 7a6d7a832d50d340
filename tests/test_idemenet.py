"""IDeMe-Net stage 2 and stage 1: gallery choice, the two losses' parameter groups,
frozen BatchNorm, batching over tasks, and short real miniImageNet runs.

Unit tests use 32x32 images (the smallest size the deformation net's five
pools accept) of 8 generated classes.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax import evaluate
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import train as train_lib
from fewshot_jax.data import episodes
from fewshot_jax.methods import idemenet
from fewshot_jax.models import deformation
from tests.conftest import load_config

SIZE, CLASSES, PER_CLASS = 32, 8, 10


def _config(**method):
  c = load_config("idemenet", "mini-5w1s")
  c.data.update(image_size=SIZE, input_size=SIZE)
  c.method.update(**{**dict(num_classes=CLASSES, gallery_per_class=3, choose_num=4, augnum=2), **method})
  c.episode.queries = 2
  return c


@functools.lru_cache(maxsize=None)
def _images():
  rng = np.random.default_rng(0)
  protos = rng.integers(0, 256, (CLASSES, 1, SIZE, SIZE, 3))
  noise = rng.integers(-50, 50, (CLASSES, PER_CLASS, SIZE, SIZE, 3))
  images = np.clip(protos + noise, 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE, 3)
  return images, np.repeat(np.arange(CLASSES), PER_CLASS)


def _dataset():
  return jax.device_put(episodes.from_arrays(*_images()))


def _variables(method, config, seed=0):
  """init + a gallery embedded by the (random) E, as setup() would build it from a stage-1 E."""
  example = state_lib.train_example(method, config)
  variables = method.init(jax.random.key(seed), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example))
  data = _dataset()
  idx, labels = idemenet.choose_gallery(np.asarray(data.class_index), np.asarray(data.class_counts),
                                        config.method.gallery_per_class, 0)
  images = jnp.asarray(_images()[0][idx])
  e_vars = {"params": variables["params"]["embedding"], "batch_stats": variables["batch_stats"]["embedding"]}
  feats = idemenet.embed_batched(idemenet.embedding_model(config), e_vars, images, config)
  variables["gallery"] = {"images": images, "labels": jnp.asarray(labels), "features": feats}
  params = variables.pop("params")
  return params, variables


def _episode(config, tasks=2, seed=1):
  aug = __import__("fewshot_jax.data.augment", fromlist=["x"]).from_config(config, config.episode.ways)
  return episodes.sample_episodes(jax.random.key(seed), _dataset(), tasks=tasks, ways=config.episode.ways,
                                  shots=config.episode.shots, queries=2, augment=aug)


def test_gallery_candidates_equal_numpy_topk():
  rng = np.random.default_rng(0)
  support = rng.normal(size=(10, 16)).astype(np.float32)
  labels = np.repeat(np.arange(5), 2).astype(np.int32)
  gallery = rng.normal(size=(40, 16)).astype(np.float32)
  got = np.asarray(idemenet.gallery_candidates(support, labels, gallery, 5, 7))
  protos = np.stack([support[labels == c].mean(0) for c in range(5)])
  dist = ((protos[:, None] - gallery[None]) ** 2).sum(-1)
  want = np.argsort(dist, axis=1, kind="stable")[:, :7]
  np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))
  np.testing.assert_array_equal(got[:, 0], want[:, 0])  # nearest first


def test_choose_gallery_is_per_class_and_seeded():
  data = _dataset()
  args = (np.asarray(data.class_index), np.asarray(data.class_counts), 3)
  idx, labels = idemenet.choose_gallery(*args, 0)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(CLASSES), 3))
  np.testing.assert_array_equal(_images()[1][idx], labels)  # each image belongs to its class
  assert len(set(idx.tolist())) == len(idx)
  np.testing.assert_array_equal(idemenet.choose_gallery(*args, 0)[0], idx)
  assert not np.array_equal(idemenet.choose_gallery(*args, 1)[0], idx)


def _grads(config, params, state, episode):
  method = methods.build(config)
  return jax.jit(jax.grad(lambda p: method.loss(p, state, episode, jax.random.key(5))[0]))(params)


def _norms(tree):
  return float(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_each_loss_reaches_only_its_parameter_groups():
  fixed_e = _config(fix_embedding=True)
  method = methods.build(fixed_e)
  params, state = _variables(method, fixed_e)
  ep = _episode(fixed_e)
  g_fixed = _grads(fixed_e, params, state, ep)
  g_both = _grads(_config(fix_embedding=False), params, state, ep)
  # Prototype loss alone: D and scale move, E and fc get exactly nothing.
  assert _norms(g_fixed["embedding"]) == 0.0
  assert _norms(g_fixed["deformation"]) > 0 and float(g_fixed["scale"]) != 0
  # Adding the classification loss: E and fc get gradients, D and scale exactly the same as before.
  for a, b in zip(jax.tree.leaves(g_both["deformation"]), jax.tree.leaves(g_fixed["deformation"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_both["scale"], g_fixed["scale"], rtol=1e-5)
  assert _norms(g_both["embedding"]["fc"]) > 0 and _norms(g_both["embedding"]["layer4_1"]) > 0


def _changed(before, after):
  return {k: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])))
          for k in before}


@pytest.mark.parametrize("flags,moves", [
    (dict(fix_embedding=True), {"deformation", "scale"}),
    (dict(fix_embedding=False, fix_deformation=True), {"scale", "embedding"}),
])
def test_optimizer_updates_only_unfixed_groups_and_frozen_batchnorm(flags, moves):
  config = _config(cls_start_step=2, **flags)
  method = methods.build(config)
  params, state = _variables(method, config)
  tx = state_lib.optimizer_for(method, config)
  ts = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=state,
                            opt_state=tx.init(params))
  train_fn = train_lib.make_train_fn(method, tx, config, sharding.make_mesh())
  data = _dataset()
  after1, _ = train_fn(jax.tree.map(jnp.copy, ts), data, jax.random.key(0), 1)
  changed = _changed(params, after1.params)
  # Step 0 < cls_start_step: E and fc are not stepped even when they train.
  assert {k for k, v in changed.items() if v} == moves - {"embedding"}
  after3, _ = train_fn(jax.tree.map(jnp.copy, ts), data, jax.random.key(0), 3)
  assert {k for k, v in _changed(params, after3.params).items() if v} == moves
  # BatchNorm is in inference mode throughout stage 2: statistics and gallery untouched.
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(after3.model_state)):
    np.testing.assert_array_equal(a, b)


def test_tasks_batched_give_the_per_task_results_of_single_task_calls():
  # One candidate and no flips: the deformation inputs do not depend on the key.
  config = _config(choose_num=1, probe_flip=0.0, gallery_flip=0.0)
  method = methods.build(config)
  params, state = _variables(method, config)
  ep = _episode(config, tasks=3)
  predict = jax.jit(method.predict_all_modes)
  together = predict(params, state, ep, jax.random.split(jax.random.key(0), 3))
  for t in range(3):
    one = jax.tree.map(lambda x, t=t: x[t:t + 1], ep)
    alone = predict(params, state, one, jax.random.split(jax.random.key(t + 7), 1))
    for mode in idemenet.EVAL_MODES:
      np.testing.assert_allclose(alone[mode][0], together[mode][t], rtol=2e-4, atol=2e-3)
  loss = jax.jit(lambda e: method.loss(params, state, e, jax.random.key(0))[0])
  per_task = [float(loss(jax.tree.map(lambda x, t=t: x[t:t + 1], ep))) for t in range(3)]
  np.testing.assert_allclose(float(loss(ep)), np.mean(per_task), rtol=1e-4)


def test_deformed_images_are_the_patchwise_fusion_of_probe_and_candidate():
  config = _config()
  method = methods.build(config)
  params, state = _variables(method, config)
  ep = _episode(config, tasks=2)
  probe, gallery, weights, deformed = jax.jit(method.deform)(params, state, ep, jax.random.split(jax.random.key(3), 2))
  t, s, a = 2, ep.support.shape[1], config.method.augnum
  assert probe.shape == gallery.shape == deformed.shape == (t, s, a, SIZE, SIZE, 3)
  assert weights.shape == (t, s, a, 9)
  wmap = deformation.weight_map(weights, SIZE, 3)
  np.testing.assert_allclose(deformed, wmap * probe + (1 - wmap) * gallery, rtol=1e-5, atol=1e-5)
  support = np.asarray(ep.support)[:, :, None]
  is_plain = np.all(np.isclose(probe, support), axis=(3, 4, 5))
  is_flip = np.all(np.isclose(probe, support[..., ::-1, :]), axis=(3, 4, 5))
  assert np.all(is_plain | is_flip) and is_flip.any() and is_plain.any()
  # Every gallery image is one of its class's choose_num nearest gallery images.
  feats = np.asarray(state["gallery"]["features"])
  gal = np.asarray(idemenet.preprocess(config, state["gallery"]["images"]))
  e_vars = {"params": params["embedding"], "batch_stats": state["batch_stats"]["embedding"]}
  model = idemenet.embedding_model(config)
  for task in range(t):
    sup_feats = model.apply(e_vars, ep.support[task], train=False)[0]
    cands = np.asarray(idemenet.gallery_candidates(sup_feats, ep.support_labels[task], feats, 5,
                                                   config.method.choose_num))
    for si in range(s):
      allowed = gal[cands[int(ep.support_labels[task, si])]]
      allowed = np.concatenate([allowed, allowed[:, :, ::-1]])  # method.gallery_flip
      for ai in range(a):
        assert np.any(np.all(np.isclose(allowed, gallery[task, si, ai], atol=1e-5), axis=(1, 2, 3)))


def test_bad_config_values_name_the_key():
  from fewshot_jax.errors import ConfigError
  for key, value in (("grid", 4), ("eval_mode", "both"), ("augnum", 0), ("choose_num", 10 ** 6)):
    with pytest.raises(ConfigError, match=f"method.{key}"):
      methods.build(_config(**{key: value}))
  with pytest.raises(ConfigError, match="both True"):
    methods.build(_config(fix_embedding=True, fix_deformation=True))


@pytest.mark.slow
def test_two_stages_on_real_mini_imagenet(make_config, tmp_path):
  """Stage 1 writes a checkpoint, stage 2 loads it, builds the gallery from real base classes,
  trains, and evaluation scores both modes and draws the deformation figure (32 px, few steps);
  round 2 loads the stage-2 workdir whole, and a stage-1 workdir with D fixed is refused."""
  from PIL import Image
  small = {"data.input_size": 32, "eval.val_episodes": 4, "eval.episodes": 4, "eval.tasks": 4,
           "train.log_every": 2, "train.steps_per_call": 2}
  stage1 = make_config("idemenet", "pretrain", **small, **{
      "method.batch_size": 16, "train.steps": 2, "train.eval_every": 2})
  train_lib.train_and_evaluate(stage1, str(tmp_path / "stage1"))
  stage2 = make_config("idemenet", "mini-5w1s", **small, **{
      "method.pretrained": str(tmp_path / "stage1"), "method.augnum": 2, "episode.queries": 3,
      "method.gallery_per_class": 4, "method.choose_num": 8,
      "train.steps": 2, "train.eval_every": 2, "method.fix_embedding": False, "method.cls_start_step": 0})
  state = train_lib.train_and_evaluate(stage2, str(tmp_path / "stage2"))
  gallery = state.model_state["gallery"]
  assert gallery["images"].shape == (64 * 4, 84, 84, 3) and gallery["features"].shape == (64 * 4, 512)
  np.testing.assert_array_equal(np.asarray(gallery["labels"]), np.repeat(np.arange(64), 4))
  assert float(jnp.abs(gallery["features"]).sum()) > 0
  result = evaluate.evaluate_checkpoint(stage2, str(tmp_path / "stage2"))
  assert set(result["modes"]) == {"deformed", "plain"} and result["mode"] == "deformed"
  assert all(0.0 <= m["accuracy"] <= 100.0 for m in result["modes"].values())
  with open(tmp_path / "stage2" / "eval_test.json") as f:
    assert json.load(f)[evaluate.result_key(result)]["modes"] == result["modes"]
  with Image.open(result["figure"]) as image:
    assert image.size[0] > 4 * 32 and image.size[1] > 32
  # Round 2 of the published recipe: a stage-2 workdir as method.pretrained gives its D, E, fc and
  # scale (and with gallery_bn='eval' E's statistics unchanged); D must then be fixed.
  from fewshot_jax import restore  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from fewshot_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  round2 = make_config("idemenet", "mini-5w1s", **small, **{
      "method.pretrained": str(tmp_path / "stage2"), "method.augnum": 2, "method.fix_deformation": True,
      "method.gallery_per_class": 4, "method.choose_num": 8, "method.fix_embedding": False,
      "method.gallery_bn": "eval"})
  method2 = methods.build(round2)
  example = state_lib.train_example(method2, round2)
  # Zeros of init's shapes (an eager ResNet-18 init costs seconds): setup must replace every variable.
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(method2.init, jax.random.key(9), example))
  train_data = input_pipeline.load(round2, "train")
  loaded = method2.setup(variables, train_data)
  _, saved = restore.load_for_eval(stage2, str(tmp_path / "stage2"), sharding.make_mesh(), "best")
  for got, want in ((loaded["params"], saved.params), (loaded["batch_stats"], saved.model_state["batch_stats"])):
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
  stage1_d = make_config("idemenet", "mini-5w1s", **small, **{
      "method.pretrained": str(tmp_path / "stage1"), "method.fix_deformation": True,
      "method.fix_embedding": False})
  # Refused by the setup a training run starts with (train._start: method.setup of the initial
  # variables), before any step: D would stay frozen at its random init.
  with pytest.raises(ConfigError, match="no trained D"):
    methods.build(stage1_d).setup(variables, train_data)
