"""LGM-Net: generated weights, intertask BatchNorm, per-task convs, eval modes, training.

Tiny widths (8 channels, z of 4) and 16x16 inputs keep every test quick on a CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax import config as config_lib
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import train as train_lib
from fewshot_jax.data import episodes
from fewshot_jax.methods import lgmnet as lgm_method
from fewshot_jax.models import layers
from fewshot_jax.models import lgmnet as lgm
from tests.conftest import load_config

WIDTH, Z = 8, 4


def _config(**method):
  c = load_config("lgmnet", "synthetic")
  c.model.features = WIDTH
  c.method.update(context_features=WIDTH, z_dim=Z, target_features=(WIDTH, WIDTH), **method)
  return c


def _episode(tasks=3, ways=5, shots=1, queries=2, size=16, seed=0):
  """Random images; task t's pixels scaled by (1 + t) so tasks' statistics differ."""
  rng = np.random.default_rng(seed)
  labels = lambda n: np.tile(np.repeat(np.arange(ways), n), (tasks, 1)).astype(np.int32)
  scale = (1.0 + np.arange(tasks))[:, None, None, None, None]
  return episodes.Episode(
      support=jnp.asarray(scale * rng.random((tasks, ways * shots, size, size, 1)), jnp.float32),
      support_labels=jnp.asarray(labels(shots)),
      query=jnp.asarray(scale * rng.random((tasks, ways * queries, size, size, 1)), jnp.float32),
      query_labels=jnp.asarray(labels(queries)),
      classes=jnp.asarray(np.tile(np.arange(ways), (tasks, 1)), jnp.int32))


def _setup(seed=0, **method):
  method_ = methods.build(_config(**method))
  ep = _episode()
  variables = method_.init(jax.random.key(seed), ep)
  return method_, ep, variables["params"], {"batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("shape", [(2, 11, 11, 3), (1, 3, 4, 2), (2, 4, 7, 1), (1, 1, 1, 2)])
def test_max_pool_2x2_same_equals_flax_same(shape):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  ours = layers.max_pool_2x2_same(x)
  assert ours.shape[1:3] == (-(-shape[1] // 2), -(-shape[2] // 2))  # 11 -> 6, 3 -> 2
  np.testing.assert_array_equal(ours, nn.max_pool(x, (2, 2), (2, 2), "SAME"))


def test_weight_generator_layout_and_unit_norm():
  """Kernel = Dense output read as (N, C_in, kh, kw) -> (kh, kw, C_in, N), filters of unit L2 norm."""
  shapes = ((3, 3, 5, 6), (3, 3, 6, 4))
  gen = lgm.WeightGenerator(layer_shapes=shapes)
  rng = np.random.default_rng(0)
  mu, log_var = (jnp.asarray(rng.standard_normal((2, Z)), jnp.float32) for _ in range(2))
  noise = jnp.asarray(rng.standard_normal((2, 2, Z)), jnp.float32)
  params = gen.init(jax.random.key(0), mu, log_var, noise)["params"]
  # A non-zero bias so the bias slice is checked too (it initialises to zero).
  params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, params)
  kernels, biases = gen.apply({"params": params}, mu, log_var, noise)
  for l, (kh, kw, cin, n) in enumerate(shapes):
    dense = params[f"layer{l + 1}"]
    assert dense["kernel"].shape == (Z, (kh * kw * cin + 1) * n)
    z = np.asarray(mu) + np.exp(np.asarray(log_var) / 2) * np.asarray(noise[:, l])
    out = z @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    w = out[:, :kh * kw * cin * n].reshape(2, n, cin, kh, kw).transpose(0, 3, 4, 2, 1)
    w = w / np.linalg.norm(w.reshape(2, -1, n), axis=1)[:, None, None, None, :]
    np.testing.assert_allclose(kernels[l], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(biases[l], out[:, kh * kw * cin * n:], rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(np.asarray(kernels[l]).reshape(2, -1, n), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_generated_kernels_are_unit_norm_and_task_specific():
  method, ep, params, state = _setup()
  # Task 1 gets task 0's supports (other queries): the weights depend on the supports only.
  ep = ep.replace(support=ep.support.at[1].set(ep.support[0]))
  noise = jnp.zeros(method.noise_shape(3))
  kernels, biases = jax.jit(method.generated_weights)(params, state, ep, noise)
  assert [k.shape for k in kernels] == [(3, 3, 3, WIDTH, WIDTH)] * 2
  for k in kernels:
    norms = np.linalg.norm(np.asarray(k).reshape(3, -1, WIDTH), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    np.testing.assert_allclose(k[1], k[0], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(k[2] - k[0])).max() > 1e-3, "different supports, same kernels"
  for b in biases:
    np.testing.assert_allclose(b[1], b[0], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(b[2] - b[0])).max() > 1e-4


def test_loss_gradients_reach_every_module():
  method, ep, params, state = _setup()
  grads = jax.jit(jax.grad(lambda p: method.loss(p, state, ep, jax.random.key(1))[0]))(params)
  for module in ("extractor", "context_encoder", "weight_generator"):
    for path, g in jax.tree_util.tree_leaves_with_path(grads[module]):
      assert np.abs(np.asarray(g)).max() > 0, f"zero gradient at {module}{jax.tree_util.keystr(path)}"
  assert set(grads["weight_generator"]) == {"layer1", "layer2"}


def _conv(x, p):
  return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]


def test_intertask_batchnorm_uses_whole_meta_batch_statistics():
  """Training BN statistics of the Extractor (all images of all tasks) and of the
  context encoder (all supports of all tasks) against NumPy, via the running averages."""
  method, ep, params, state = _setup()
  _, (_, new_state) = method.loss(params, state, ep, jax.random.key(1))
  momentum = 0.99
  t, s = ep.support.shape[:2]
  images = jnp.concatenate([ep.support.reshape((-1, 16, 16, 1)), ep.query.reshape((-1, 16, 16, 1))])

  def check(pre, stats, old):
    pre = np.asarray(pre, np.float64).reshape(-1, pre.shape[-1])
    np.testing.assert_allclose(stats["mean"], momentum * old["mean"] + (1 - momentum) * pre.mean(0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], momentum * old["var"] + (1 - momentum) * pre.var(0),
                               rtol=1e-4, atol=1e-6)

  ext = params["extractor"]
  pre = _conv(images, ext["conv1"])
  check(pre, new_state["batch_stats"]["extractor"]["bn1"], state["batch_stats"]["extractor"]["bn1"])
  # Per-task statistics would differ: the tasks' pixels have different scales.
  first_task = np.asarray(pre[:s]).reshape(-1, WIDTH).mean(0)
  assert np.abs(first_task - np.asarray(pre).reshape(-1, WIDTH).mean(0)).max() > 1e-2

  extractor = lgm.Extractor(features=WIDTH)
  feats, _ = extractor.apply({"params": ext, **{"batch_stats": state["batch_stats"]["extractor"]}},
                             images, train=True, mutable=["batch_stats"])
  ctx_pre = jax.nn.relu(_conv(feats[:t * s], params["context_encoder"]["conv1"]))
  check(ctx_pre, new_state["batch_stats"]["context_encoder"]["bn1"],
        state["batch_stats"]["context_encoder"]["bn1"])


def test_task_conv_vmap_equals_grouped():
  rng = np.random.default_rng(0)
  t, b, h, c = 3, 4, 5, 6
  x = jnp.asarray(rng.standard_normal((t, b, h, h, c)), jnp.float32)
  kernels = tuple(jnp.asarray(rng.standard_normal((t, 3, 3, c, c)), jnp.float32) for _ in range(2))
  biases = tuple(jnp.asarray(rng.standard_normal((t, c)), jnp.float32) for _ in range(2))
  variants = {"vmap": ("vmap", None), "vmap_matmul": ("vmap", layers.matmul_wgrad_conv),
              "grouped": ("grouped", None)}
  outs, grads = {}, {}
  for name, (impl, conv) in variants.items():
    f = lambda x, k, bb: lgm.target_net(x, k, bb, impl, conv)
    outs[name] = f(x, kernels, biases)
    grads[name] = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(x, kernels, biases)
  assert outs["vmap"].shape == (t, b, 3 * 3 * c)  # 5 -> SAME pool -> 3
  # Task t uses its own weights: equal to running the net on that task alone.
  one = lgm.target_net(x[1:2], tuple(k[1:2] for k in kernels), tuple(bb[1:2] for bb in biases))
  np.testing.assert_allclose(outs["vmap"][1:2], one, rtol=1e-5, atol=1e-5)
  for name in ("vmap_matmul", "grouped"):
    np.testing.assert_allclose(outs[name], outs["vmap"], rtol=1e-5, atol=1e-4)
    for a, r in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["vmap"])):
      np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_method_task_conv_grouped_gives_same_loss():
  method, ep, params, state = _setup()
  grouped = methods.build(_config(task_conv="grouped"))
  a = method.loss(params, state, ep, jax.random.key(2))[0]
  b = grouped.loss(params, state, ep, jax.random.key(2))[0]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_vote_on_constructed_predictions():
  """10 draws, 3 queries: a 6-4 vote against a confident minority, a 5-5 tie, a unanimous vote."""
  lp = np.full((10, 1, 3, 5), -5.0, np.float32)
  lp[:6, 0, 0, 2], lp[:6, 0, 0, 1] = -0.5, -0.6  # 6 votes for class 2, barely
  lp[6:, 0, 0, 2], lp[6:, 0, 0, 1] = -30.0, 0.0  # 4 confident votes for class 1: mean favours 1
  lp[:5, 0, 1, 0] = -0.1  # tie 5-5 between classes 0 and 3 ...
  lp[5:, 0, 1, 3] = -0.01  # ... broken by the higher mean log-prob (class 3)
  lp[:, 0, 2, 4] = -1.0
  assert np.asarray(jnp.mean(lp, 0))[0, 0].argmax() == 1
  scores = np.asarray(lgm_method.vote(jnp.asarray(lp)))
  np.testing.assert_array_equal(scores.argmax(-1), [[2, 3, 4]])
  np.testing.assert_array_equal(np.floor(scores[0, 0]), [0, 4, 6, 0, 0])  # vote counts


def test_ensemble_predict_is_the_majority_vote_of_its_draws():
  method, ep, params, state = _setup(eval_mode="ensemble")
  keys = jax.random.split(jax.random.key(5), 3)  # one per task
  draws = 10
  # predict's draws: task t's from its own key
  noise = jnp.stack([jax.random.normal(k, (draws,) + method.noise_shape(1)[1:], jnp.float32) for k in keys], 1)
  predict, log_probs = jax.jit(method.predict), jax.jit(method.log_probs)
  got = np.asarray(predict(params, state, ep, keys)).argmax(-1)
  single = np.stack([np.asarray(log_probs(params, state, ep, noise[d:d + 1]))[0] for d in range(draws)])
  votes = single.argmax(-1)  # [D, T, Q]
  counts = np.apply_along_axis(lambda v: np.bincount(v, minlength=5), 0, votes)  # [5, T, Q]
  winners_count = counts.max(0)
  assert np.all(counts[got, np.arange(3)[:, None], np.arange(10)[None]] == winners_count)


def test_eval_modes():
  method, ep, params, state = _setup(eval_mode="mean")
  all_modes = jax.jit(method.predict_all_modes)
  keys = lambda seed: jax.random.split(jax.random.key(seed), 3)  # one per task
  a, b = all_modes(params, state, ep, keys(0)), all_modes(params, state, ep, keys(1))
  np.testing.assert_array_equal(a["mean"], b["mean"])  # z = mu: no randomness
  assert not np.allclose(a["single"], b["single"])  # noise matters
  for mode in ("mean", "single"):
    other = methods.build(_config(eval_mode=mode)) if mode != "mean" else method
    np.testing.assert_allclose(jax.jit(other.predict)(params, state, ep, keys(0)), a[mode],
                               rtol=1e-5, atol=1e-5)
  # 'ensemble' counts votes: the untrained model's log-probabilities lie within 1e-3 of log(1/5),
  # so a draw whose top two classes are closer than float32 rounding may vote either way in
  # the two programs; every other vote count must agree.
  ensemble = jax.jit(methods.build(_config(eval_mode="ensemble")).predict)(params, state, ep, keys(0))
  noise = jnp.swapaxes(lgm_method.task_noise(keys(0), "ensemble", method.noise_shape(1)[1:], 10), 0, 1)
  top2 = np.sort(np.asarray(jax.jit(method.log_probs)(params, state, ep, noise)), -1)[..., -2:]
  near_tie = ((top2[..., 1] - top2[..., 0]) < 1e-5).any(0)  # [T, Q]
  votes_differ = np.any(np.floor(np.asarray(ensemble)) != np.floor(np.asarray(a["ensemble"])), -1)
  assert not np.any(votes_differ & ~near_tie)
  np.testing.assert_allclose(ensemble[~near_tie], a["ensemble"][~near_tie], rtol=1e-5, atol=1e-5)
  assert a["single"].shape == a["ensemble"].shape == (3, 10, 5)


def test_loss_decreases_with_adam():
  """30 Adam steps of the real trainer on a tiny dataset whose classes are fixed patterns + noise."""
  rng = np.random.default_rng(0)
  classes, per_class, size = 8, 6, 16
  protos = rng.integers(0, 256, (classes, size, size, 1))
  noise = rng.integers(-40, 40, (classes, per_class, size, size, 1))
  images = np.clip(protos[:, None] + noise, 0, 255).astype(np.uint8).reshape(-1, size, size, 1)
  labels = np.repeat(np.arange(classes), per_class)
  dataset = jax.device_put(episodes.from_arrays(images, labels))
  config = _config()
  config.data.image_size = size
  config.episode.update(ways=5, shots=1, queries=2, tasks=2)
  config.train.update(lr=5e-3, schedule="constant")
  mesh = sharding.make_mesh()
  method = methods.build(config)
  tx = state_lib.make_optimizer(config)
  example = episodes.episode_shapes(5, 1, 2, 2, (size, size, 1))
  state = jax.jit(functools.partial(state_lib.init_state, method, tx))(jax.random.key(0), example)
  train_fn = train_lib.make_train_fn(method, tx, config, mesh)
  # A fixed episode batch and key: its training-mode loss before and after, free of sampling noise.
  pick = lambda t, n: images.reshape(classes, per_class, size, size, 1)[t:t + 5, n] / 255.0
  probe = episodes.Episode(  # task t: classes t..t+4, image 0 as support, images 1-3 as queries
      support=jnp.asarray(np.stack([pick(t, slice(0, 1)).reshape(5, size, size, 1) for t in range(3)])),
      support_labels=jnp.tile(jnp.arange(5, dtype=jnp.int32), (3, 1)),
      query=jnp.asarray(np.stack([pick(t, slice(1, 4)).reshape(15, size, size, 1) for t in range(3)])),
      query_labels=jnp.tile(jnp.repeat(jnp.arange(5, dtype=jnp.int32), 3), (3, 1)),
      classes=jnp.asarray(np.stack([np.arange(t, t + 5) for t in range(3)]), jnp.int32))
  probe_loss = jax.jit(lambda p, s: method.loss(p, s, probe, jax.random.key(3))[0])
  before = float(probe_loss(state.params, state.model_state))
  for _ in range(6):
    state, metrics = train_fn(state, dataset, jax.random.key(1), 5)
  assert int(state.step) == 30
  after = float(probe_loss(state.params, state.model_state))
  assert np.isfinite(float(metrics["loss"]))
  assert after < 0.85 * before, (before, after)  # measured: 1.58 -> 1.15


@pytest.mark.parametrize("preset", ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                                    "mini-5w1s", "mini-5w5s", "synthetic"])
def test_presets(preset):
  c = config_lib.validate(load_config("lgmnet", preset))
  method = methods.build(c)
  assert method.name == "lgmnet"
  assert c.eval.queries == 15 and c.eval.episodes == 600
  if preset.startswith("mini"):
    assert c.data.image_size == 84 and c.data.mean == (113.77,) and c.data.std == (70.19,)
    assert c.augment.class_rotations == (-45.0, -11.25, 0.0, 11.25, 45.0)
    assert (c.episode.tasks, c.episode.queries, c.train.steps) == (32, 1, 120000)
    schedule = state_lib.learning_rate_schedule(c.train)
    np.testing.assert_allclose(schedule(1499), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(1500), 1e-3 / 1.11111, rtol=1e-5)
    np.testing.assert_allclose(schedule(120000), 1e-6, rtol=1e-5)  # floor (1e-3 / 1.11111^80 < 1e-6)
  elif preset.startswith("omniglot"):
    assert c.data.image_size == 28 and c.data.split == "vinyals"


def test_bad_config_values_name_the_key():
  from fewshot_jax.errors import ConfigError
  for key, value in (("task_conv", "loop"), ("eval_mode", "vote")):
    with pytest.raises(ConfigError, match=f"method.{key}"):
      methods.build(_config(**{key: value}))


def test_standard_evaluation_does_not_rotate_but_reference_does():
  """Per-class rotation is training (and reference-protocol) augmentation only."""
  from fewshot_jax.data import augment
  c = load_config("lgmnet", "mini-5w1s")
  rng = np.random.default_rng(0)
  support = jnp.asarray(rng.integers(0, 256, (5, 84, 84, 3)), jnp.uint8)
  query = jnp.asarray(rng.integers(0, 256, (5, 84, 84, 3)), jnp.uint8)
  labels = jnp.arange(5, dtype=jnp.int32)
  run = lambda aug: aug(jax.random.key(3), support, labels, query, labels)
  plain = augment.normalise(support, c.data.mean, c.data.std)
  standard = run(augment.from_config(c, 5, training=False))
  np.testing.assert_allclose(standard[0], plain, atol=1e-6)
  reference = run(augment.from_config(c, 5, training=True))
  assert not np.allclose(reference[0], plain, atol=1e-3)  # 5 classes: some angle is nonzero


def _tiny_dataset(classes=10, per_class=6, size=16, seed=0):
  rng = np.random.default_rng(seed)
  protos = rng.integers(0, 256, (classes, size, size, 1))
  noise = rng.integers(-40, 40, (classes, per_class, size, size, 1))
  images = np.clip(protos[:, None] + noise, 0, 255).astype(np.uint8).reshape(-1, size, size, 1)
  return jax.device_put(episodes.from_arrays(images, np.repeat(np.arange(classes), per_class)))


def test_protocols_score_every_mode_on_the_same_episodes():
  from fewshot_jax import evaluate
  config = _config(eval_mode="ensemble")
  config.data.image_size = 16
  config.eval.update(tasks=4, queries=4)
  method, ep, params, state = _setup()
  dataset, mesh = _tiny_dataset(), sharding.make_mesh()
  standard = evaluate.Evaluator(method, config, mesh, "val", 12, dataset=dataset, protocol="standard")
  reference = evaluate.Evaluator(method, config, mesh, "val", 40, dataset=dataset, protocol="reference")
  s, r = standard.run(params, state), reference.run(params, state)
  assert set(s["modes"]) == set(r["modes"]) == {"single", "mean", "ensemble"}
  assert s["mode"] == "ensemble" and s["accuracy"] == s["modes"]["ensemble"]["accuracy"]
  assert (s["queries_per_episode"], s["episodes"]) == (5 * 4, 12)
  assert (r["queries_per_episode"], r["episodes"]) == (1, 40)
  per_task = reference.per_episode(params, state)["mean"]
  assert set(np.unique(per_task)) <= {0.0, 1.0}  # one query per task: right or wrong
  # Deterministic: the same episodes and noise on every call.
  np.testing.assert_array_equal(per_task, reference.per_episode(params, state)["mean"])


@pytest.mark.slow
def test_short_real_omniglot_lgmnet_run_learns(make_config, tmp_path):
  """120 meta-batches of real Omniglot lift 5-way 1-shot accuracy far above chance, in both protocols."""
  import json
  from fewshot_jax import evaluate
  config = make_config("lgmnet", "omniglot-5w1s", **{
      "episode.train_ways": 10, "episode.tasks": 2, "train.steps": 120, "train.eval_every": 120,
      "train.log_every": 60, "train.steps_per_call": 30, "eval.val_episodes": 48, "eval.episodes": 96,
      "eval.reference_tasks": 320})
  train_lib.train_and_evaluate(config, str(tmp_path))
  standard = evaluate.evaluate_checkpoint(config, str(tmp_path))
  config.eval.protocol = "reference"
  reference = evaluate.evaluate_checkpoint(config, str(tmp_path))
  for result in (standard, reference):
    assert set(result["modes"]) == {"single", "mean", "ensemble"}
    for mode in result["modes"].values():
      assert mode["accuracy"] > 40.0, result  # chance: 20%; measured 52 (standard protocol)
  with open(tmp_path / "eval_test.json") as f:
    assert json.load(f) == {evaluate.result_key(standard): standard, evaluate.result_key(reference): reference}
