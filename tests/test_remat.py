"""model.remat: every backbone recomputed in the backward pass gives the same loss, gradients and
parameter names, and every method passes the key on (ResNet-18's numbers:
test_idemenet_models.test_resnet_remat_same_outputs_and_grads)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fewshot_jax import methods
from fewshot_jax import state as state_lib
from fewshot_jax.errors import ConfigError
from fewshot_jax.methods import idemenet
from fewshot_jax.models import backbones
from fewshot_jax.models import lgmnet as lgm
from fewshot_jax.models.conv4 import Conv4
from fewshot_jax.models.deformation import DeformationNet
from tests.conftest import load_config

# Small widths and depths: the blocks are the code under test, not their size.
BACKBONES = {
    "conv4": (lambda r: Conv4(features=8, blocks=2, remat=r), (4, 8, 8, 1)),
    "lgm_extractor": (lambda r: lgm.Extractor(features=8, blocks=2, pooled_blocks=1, remat=r), (4, 8, 8, 1)),
    "lgm_context_encoder": (lambda r: lgm.TaskContextEncoder(features=8, context_dim=4, hidden_blocks=1, remat=r),
                            (4, 4, 4, 8)),
    "deformation": (lambda r: DeformationNet(grid=2, channels=(4,), remat=r), (4, 4, 4, 6)),
}


def _variables(shapes):
  """Variables of these shapes without compiling an init: weights N(0, 0.1^2), biases 3 (so
  no ReLU input is negative and no max-pool window holds tied maxima, whose gradient XLA may
  send to either position), BatchNorm statistics 0 / 1."""
  rng = np.random.default_rng(0)
  fill = {"bias": lambda s: np.full(s, 3.0, np.float32), "mean": lambda s: np.zeros(s, np.float32),
          "var": lambda s: np.ones(s, np.float32)}
  normal = lambda s: 0.1 * rng.standard_normal(s, dtype=np.float32)
  return jax.tree_util.tree_map_with_path(lambda p, x: fill.get(p[-1].key, normal)(x.shape), shapes)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_remat_same_loss_gradients_and_names(name):
  make, shape = BACKBONES[name]
  x = jax.random.normal(jax.random.key(0), shape)
  shapes = [jax.eval_shape(lambda k, m=make(r): m.init(k, x, train=False), jax.random.key(1)) for r in (False, True)]
  assert jax.tree.map(jnp.shape, shapes[0]) == jax.tree.map(jnp.shape, shapes[1])  # checkpoints interchangeable
  variables = _variables(shapes[0])

  def loss_and_grads(model):
    def loss(params):
      y, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), new
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (l0, s0), g0 = loss_and_grads(make(False))
  (l1, s1), g1 = loss_and_grads(make(True))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b)) + 1))


@pytest.mark.parametrize("method_name", ["protonet", "lgmnet"])
def test_methods_pass_model_remat_on(method_name):
  """The key reaches the backbones (a remat in the traced loss) and the parameters stay the same."""
  seen = {}
  for remat in (False, True):
    c = load_config(method_name, "synthetic")
    c.model.remat = remat
    method = methods.build(c)
    example = state_lib.train_example(method, c)
    variables = jax.eval_shape(method.init, jax.random.key(0), example)
    params = variables.pop("params")
    grad = jax.grad(lambda p, v, e: method.loss(p, v, e, jax.random.key(1))[0])
    seen[remat] = (str(jax.make_jaxpr(grad)(params, variables, example)).count("remat"),
                   jax.tree.map(jnp.shape, params))
  assert seen[False][0] == 0 and seen[True][0] > 0
  assert seen[False][1] == seen[True][1]


def test_idemenet_and_config_read_model_remat():
  c = load_config("idemenet", "mini-5w1s")
  assert c.model.remat is False  # the base config's default, one home for every method
  c.model.remat = True
  assert idemenet.embedding_model(c).remat
  c.model = ml_collections.ConfigDict(dict(c.model.to_dict(), remat="yes"))
  with pytest.raises(ConfigError, match="model.remat='yes' must be True or False"):
    backbones.remat_from_config(c)
