"""Parity of the PyTorch LGM-Net reference (fewshot_jax.torch_reference.lgmnet) with the Flax method.

Full-width model (64 channels, z of 32) on small images (20-22 px: pools on odd
sizes 11 -> 6, 5 -> 3, 3 -> 2), 3 tasks, 5-way 1- and 2-shot, 2 queries per
class, fixed noise; float32 on both sides, log-probabilities within 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fewshot_jax import methods
from fewshot_jax import state_dicts
from fewshot_jax.data import episodes
from fewshot_jax.errors import CheckpointError
from fewshot_jax.models import layers
from fewshot_jax.models import lgmnet as lgm
from fewshot_jax.torch_reference import lgmnet as tlgm
from tests.conftest import load_config

CHANNELS, TASKS, WAYS, QUERIES = 3, 3, 5, 2


def _config(conv_impl="xla"):
  c = load_config("lgmnet", "synthetic")
  c.model.conv_impl = conv_impl
  return c


def _episode(shots, size, seed=0):
  """Random images; task t's pixels scaled by (1 + t) so per-task and intertask statistics differ."""
  rng = np.random.default_rng(seed)
  labels = lambda n: np.tile(np.repeat(np.arange(WAYS), n), (TASKS, 1)).astype(np.int32)
  scale = (1.0 + np.arange(TASKS))[:, None, None, None, None]
  images = lambda n: jnp.asarray(scale * rng.random((TASKS, WAYS * n, size, size, CHANNELS)), jnp.float32)
  return episodes.Episode(support=images(shots), support_labels=jnp.asarray(labels(shots)),
                          query=images(QUERIES), query_labels=jnp.asarray(labels(QUERIES)),
                          classes=jnp.asarray(np.tile(np.arange(WAYS), (TASKS, 1)), jnp.int32))


def _random_variables(shapes, seed, running_stats=False):
  """Random values for a variable tree of jax.ShapeDtypeStructs (from jax.eval_shape of init,
  which skips compiling init): glorot-uniform kernels as the modules initialise them, and
  non-trivial BatchNorm scale / bias, generator biases and (optionally) running mean / var,
  which initialise to 1 / 0, so the parity checks see every term."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      receptive = int(np.prod(leaf.shape[:-2]))
      limit = np.sqrt(6.0 / (receptive * (leaf.shape[-2] + leaf.shape[-1])))
      value = rng.uniform(-limit, limit, leaf.shape)
    elif name == "scale":
      value = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.05 * rng.standard_normal(leaf.shape)
    elif name == "mean":
      value = 0.3 * rng.standard_normal(leaf.shape) if running_stats else np.zeros(leaf.shape)
    else:  # var
      value = rng.uniform(0.5, 2.0, leaf.shape) if running_stats else np.ones(leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _method_variables(method, ep, seed, running_stats=False):
  return _random_variables(jax.eval_shape(method.init, jax.random.key(0), ep), seed, running_stats)


def _torch_images(x):
  return torch.tensor(np.asarray(x)).permute(0, 1, 4, 2, 3).contiguous()  # NHWC -> NCHW


def _torch_model(config, variables):
  """The method's own bridge (methods/lgmnet_torch.py), as --mode=compare / export use it."""
  bridge = methods.torch_bridge(config, variables, "compare")
  return bridge.to_torch(variables["params"], {"batch_stats": variables["batch_stats"]})


def _load_flax_named(module, variables):
  """Flax variables into a torch_reference module whose attribute names are the Flax names."""
  spec = state_dicts.Spec().flax_names(variables)
  convert = lambda sd: {c: tree for c, tree in spec.convert(sd, "index", "test").items() if c in variables}
  return state_dicts.load_into_torch(module, variables, convert, what="test")


def _torch_log_probs(model, ep, noise):
  return model(_torch_images(ep.support), torch.tensor(np.asarray(ep.support_labels)),
               _torch_images(ep.query), WAYS, torch.tensor(np.asarray(noise)))


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("shape", [(2, 3, 11, 11), (1, 2, 3, 4), (2, 1, 5, 7), (1, 2, 1, 1)])
def test_max_pool_same_equals_flax(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  ours = tlgm.max_pool_2x2_same(torch.from_numpy(x)).numpy()
  ref = np.asarray(layers.max_pool_2x2_same(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
  assert ours.shape[2:] == (-(-shape[2] // 2), -(-shape[3] // 2))  # 11 -> 6
  np.testing.assert_array_equal(ours, ref)


def test_weight_generator_equals_flax():
  """Kernels read as (N, C_in, kh, kw) = Flax's (kh, kw, C_in, N) transposed; unit-norm filters."""
  flax_shapes = ((3, 2, 5, 6), (3, 3, 6, 4))  # (kh, kw, C_in, N): every axis distinct
  z = 4
  gen = lgm.WeightGenerator(layer_shapes=flax_shapes)
  rng = np.random.default_rng(1)
  mu, log_var = (rng.standard_normal((TASKS, z)).astype(np.float32) for _ in range(2))
  noise = rng.standard_normal((TASKS, 2, z)).astype(np.float32)
  params = _random_variables(jax.eval_shape(gen.init, jax.random.key(0), mu, log_var, noise), 2)["params"]
  kernels, biases = jax.jit(gen.apply)({"params": params}, mu, log_var, noise)
  tgen = tlgm.WeightGenerator(z, [(n, cin, kh, kw) for kh, kw, cin, n in flax_shapes])
  _load_flax_named(tgen, {"params": params})
  with torch.no_grad():
    tk, tb = tgen(*(torch.from_numpy(a) for a in (mu, log_var, noise)))
  for l, (kh, kw, cin, n) in enumerate(flax_shapes):
    # The read-out itself, from the raw Dense output: (N, C_in, kh, kw), each filter normalised.
    zl = mu + np.exp(log_var / 2) * noise[:, l]
    out = zl @ params[f"layer{l + 1}"]["kernel"] + params[f"layer{l + 1}"]["bias"]
    w = out[:, :n * cin * kh * kw].reshape(TASKS, n, cin, kh, kw)
    w = w / np.linalg.norm(w.reshape(TASKS, n, -1), axis=-1)[..., None, None, None]
    np.testing.assert_allclose(tk[l].numpy(), w, rtol=1e-5, atol=1e-6)
    diff = _max_diff(tk[l], np.asarray(kernels[l]).transpose(0, 4, 3, 1, 2))
    assert diff < 1e-6, diff
    assert _max_diff(tb[l], biases[l]) < 1e-6
    np.testing.assert_allclose(torch.linalg.vector_norm(tk[l], dim=(2, 3, 4)).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("shots,size,conv_impl", [(1, 22, "xla"), (2, 20, "matmul_wgrad")])
def test_train_mode_parity(shots, size, conv_impl):
  """Training-mode (intertask BatchNorm) log-probs, loss and updated running statistics."""
  config = _config(conv_impl)
  method = methods.build(config)
  ep = _episode(shots, size)
  variables = _method_variables(method, ep, 3)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  key = jax.random.key(4)
  noise = jax.random.normal(jax.random.split(key)[0], method.noise_shape(TASKS), jnp.float32)  # loss's draw
  flax = jax.jit(lambda p, s, e, n, k: (method.train_log_probs(p, s, e, n), method.loss(p, s, e, k)[0]))
  (log_p, new_state), flax_loss = flax(params, state, ep, noise, key)
  flax_loss = float(flax_loss)

  model = _torch_model(config, variables).train()
  got = _torch_log_probs(model, ep, noise)
  assert got.shape == log_p.shape == (TASKS, WAYS * QUERIES, WAYS)
  diff = _max_diff(got.detach(), log_p)
  print(f"train-mode log-probs ({shots}-shot, {conv_impl}): max abs diff {diff:.2e}")
  assert diff < 1e-4, diff
  assert np.abs(np.asarray(log_p)).max() > 1e-2  # a non-degenerate comparison
  model.load_state_dict(_torch_model(config, variables).state_dict())  # back to the old statistics
  t_loss = tlgm.loss(model, _torch_images(ep.support), torch.tensor(np.asarray(ep.support_labels)),
                     _torch_images(ep.query), torch.tensor(np.asarray(ep.query_labels)), WAYS,
                     torch.tensor(np.asarray(noise)))
  assert abs(t_loss.item() - flax_loss) < 1e-4, (t_loss.item(), flax_loss)
  t_loss.backward()
  assert all(p.grad is not None for p in model.parameters())

  stats_diff = 0.0
  for module in ("extractor", "context_encoder"):
    for name, bn in new_state["batch_stats"][module].items():
      tbn = getattr(getattr(model, module), name)
      for leaf, buffer in (("mean", tbn.running_mean), ("var", tbn.running_var)):
        d = _max_diff(buffer, bn[leaf])
        assert d < 1e-5, (module, name, leaf, d)
        assert _max_diff(bn[leaf], variables["batch_stats"][module][name][leaf]) > 1e-6  # updated
        stats_diff = max(stats_diff, d)
  print(f"running statistics: max abs diff {stats_diff:.2e}")


def test_eval_mode_parity_and_generated_weights():
  """Evaluation-mode (moving-average BatchNorm, random non-trivial statistics) log-probs for two
  noise draws, and the generated TargetNet weights of the whole method."""
  config = _config("xla")
  method = methods.build(config)
  ep = _episode(1, 22, seed=5)
  variables = _method_variables(method, ep, 6, running_stats=True)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  noise = jax.random.normal(jax.random.key(7), (2,) + method.noise_shape(TASKS), jnp.float32)
  flax = jax.jit(lambda p, s, e, n: (method.log_probs(p, s, e, n), method.generated_weights(p, s, e, n[0])))
  log_p, (kernels, biases) = flax(params, state, ep, noise)
  model = _torch_model(config, variables).eval()
  with torch.no_grad():
    for d in range(2):
      diff = _max_diff(_torch_log_probs(model, ep, noise[d]), log_p[d])
      print(f"eval-mode log-probs (draw {d}): max abs diff {diff:.2e}")
      assert diff < 1e-4, diff
    context = model.embed(_torch_images(ep.support), _torch_images(ep.query))[2]
    tk, tb = model.generate(context, torch.tensor(np.asarray(noise[0])))
  for l in range(2):
    kd = _max_diff(tk[l], np.asarray(kernels[l]).transpose(0, 4, 3, 1, 2))
    bd = _max_diff(tb[l], biases[l])
    print(f"generated layer {l + 1}: kernel max abs diff {kd:.2e}, bias {bd:.2e}")
    assert kd < 1e-5 and bd < 1e-5, (kd, bd)
  for module in ("extractor", "context_encoder"):  # eval mode leaves the statistics alone
    for name, bn in variables["batch_stats"][module].items():
      assert _max_diff(getattr(getattr(model, module), name).running_var, bn["var"]) == 0


def _small():
  config = _config()
  config.model.features = 8
  config.method.update(context_features=8, z_dim=4, target_features=(8, 8))
  return config, _method_variables(methods.build(config), _episode(1, 12), 0)


def test_bridge_to_torch_is_strict():
  """The bridge's to_torch sets every torch tensor from the right Flax leaf, and a variable tree
  of the wrong shape, with a leaf missing or with a leaf too many is one CheckpointError naming it."""
  config, variables = _small()
  model = _torch_model(config, variables)
  np.testing.assert_array_equal(model.extractor.conv2.weight.detach().numpy(),
                                variables["params"]["extractor"]["conv2"]["kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(model.weight_generator.layer1.weight.detach().numpy(),
                                variables["params"]["weight_generator"]["layer1"]["kernel"].T)
  np.testing.assert_array_equal(model.context_encoder.bn1.running_var.numpy(),
                                variables["batch_stats"]["context_encoder"]["bn1"]["var"])
  to_torch = methods.torch_bridge(config, variables, "export").to_torch
  stats = lambda v: {"batch_stats": v["batch_stats"]}

  bad = jax.tree.map(lambda a: a, variables)
  bad["params"]["extractor"]["conv2"]["kernel"] = np.zeros((3, 3, 8, 7), np.float32)
  with pytest.raises(CheckpointError, match=r"params/extractor/conv2/kernel has shape \(3, 3, 8, 7\)"):
    to_torch(bad["params"], stats(bad))
  missing = jax.tree.map(lambda a: a, variables)
  del missing["batch_stats"]["context_encoder"]["bn1"]["var"]
  with pytest.raises(CheckpointError, match=r"missing \['batch_stats/context_encoder/bn1/var'\]"):
    to_torch(missing["params"], stats(missing))
  extra = jax.tree.map(lambda a: a, variables)
  extra["params"]["extractor"]["conv5"] = extra["params"]["extractor"]["conv4"]
  with pytest.raises(CheckpointError, match=r"unexpected \['params/extractor/conv5/bias'"):
    to_torch(extra["params"], stats(extra))
