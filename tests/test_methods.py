"""ProtoNet / MatchingNet losses against NumPy references; the CPU conv's gradients against XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax import methods
from fewshot_jax.data import episodes
from fewshot_jax.models import backbones
from fewshot_jax.models import layers


def _episode(tasks=3, ways=4, shots=2, queries=3, size=28, seed=0):
  rng = np.random.default_rng(seed)
  labels = lambda n: np.tile(np.repeat(np.arange(ways), n), (tasks, 1)).astype(np.int32)
  return episodes.Episode(
      support=jnp.asarray(rng.random((tasks, ways * shots, size, size, 1)), jnp.float32),
      support_labels=jnp.asarray(labels(shots)),
      query=jnp.asarray(rng.random((tasks, ways * queries, size, size, 1)), jnp.float32),
      query_labels=jnp.asarray(labels(queries)),
      classes=jnp.asarray(np.tile(np.arange(ways), (tasks, 1)), jnp.int32))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _embeddings(config, variables, ep):
  """Train-mode embeddings of support and query, computed like the method: one flattened batch."""
  model = backbones.from_config(config)
  t, s = ep.support.shape[:2]
  images = jnp.concatenate([ep.support.reshape((-1,) + ep.support.shape[2:]),
                            ep.query.reshape((-1,) + ep.query.shape[2:])])
  feats, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  feats = np.asarray(feats, np.float64)
  return feats[:t * s].reshape(t, s, -1), feats[t * s:].reshape(t, -1, feats.shape[-1])


@pytest.mark.parametrize("method_name", ["protonet", "matchingnet"])
def test_loss_matches_numpy_reference(make_config, method_name):
  config = make_config(method_name, "synthetic")
  method = methods.build(config)
  ep = _episode()
  variables = method.init(jax.random.key(0), ep)
  state = {"batch_stats": variables["batch_stats"]}
  loss, (metrics, new_state) = method.loss(variables["params"], state, ep, jax.random.key(1))
  support, query = _embeddings(config, variables, ep)
  ways = 4
  losses, correct = [], []
  for t in range(support.shape[0]):
    onehot = np.eye(ways)[np.asarray(ep.support_labels[t])]
    if method_name == "protonet":
      protos = onehot.T @ support[t] / onehot.sum(0)[:, None]
      logits = -((query[t][:, None, :] - protos[None]) ** 2).sum(-1)
      logp = _log_softmax(logits)
    else:
      qn = query[t] / np.linalg.norm(query[t], axis=1, keepdims=True)
      sn = support[t] / np.linalg.norm(support[t], axis=1, keepdims=True)
      att = np.exp(_log_softmax(qn @ sn.T))
      logp = np.log(att @ onehot + 1e-8)
    y = np.asarray(ep.query_labels[t])
    losses.append(-logp[np.arange(len(y)), y])
    correct.append(logp.argmax(-1) == y)
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=2e-4)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(correct), atol=1e-6)
  # Training updates the BatchNorm statistics.
  assert not np.allclose(jax.tree.leaves(new_state)[0], jax.tree.leaves(state)[0])


def test_predict_uses_running_statistics_and_is_per_task():
  """predict on T tasks equals predict on each task alone (eval-mode BN, vmapped heads)."""
  from tests.conftest import load_config
  config = load_config("protonet", "synthetic")
  method = methods.build(config)
  ep = _episode(tasks=3)
  variables = method.init(jax.random.key(0), ep)
  state = {"batch_stats": variables["batch_stats"]}
  both = method.predict(variables["params"], state, ep, None)
  for t in range(3):
    one = jax.tree.map(lambda x: x[t:t + 1], ep)
    np.testing.assert_allclose(method.predict(variables["params"], state, one, None)[0], both[t],
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((5, 12, 12, 1), (3, 3, 1, 8), (1, 1), "SAME"),
    ((3, 11, 11, 4), (3, 3, 4, 6), (2, 2), "SAME"),
    ((2, 16, 16, 3), (7, 7, 3, 5), (2, 2), ((3, 3), (3, 3))),
    ((2, 9, 9, 4), (1, 1, 4, 6), (2, 2), "VALID"),
])
def test_matmul_wgrad_conv_equals_xla(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
  ours = lambda x, w: layers.matmul_wgrad_conv(x, w, strides, padding, dimension_numbers=dn)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_max_pool_2x2_equals_flax():
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 9, 3)), jnp.float32)
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2), "VALID"))
