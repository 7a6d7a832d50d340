"""LGM-Net (Li et al., ICML 2019): learning to generate matching networks.

The Extractor runs once on every image of every task (supports and queries of
the meta-batch flattened to one batch), so in training its BatchNorm statistics
are those of the whole meta-batch (intertask normalisation); the task context
encoder likewise runs on the supports of all tasks at once. Each task's
context c (mean over its supports) gives mu = c[:z], log_var = c[z:]; the
weight generator turns z = mu + exp(log_var / 2) * noise into the TargetNet's
kernels and biases (one noise draw per task and layer); the TargetNet embeds
the task's supports and queries with those weights, and a matching classifier
(softmax over the supports of cosine similarities, weighted one-hot labels)
gives log p(class | query). Loss: mean cross-entropy on those log-probabilities.

Prediction (`method.eval_mode`): 'single' (one noise draw from the task's
key), 'mean' (noise = 0, z = mu, deterministic), 'ensemble'
(`method.ensemble_draws` draws, majority vote of their argmax predictions).
Each task's noise comes from its own key, so a task is predicted alike in any
batch. `predict_all_modes` returns
all three from one run of the extractor and context encoder.

Evaluation protocols: beside the standard one, 'reference' (PROTOCOLS), the test
of the authors' TF code: one-query tasks with the training augmentation on.

build() assembles the Method record from the module-level functions below, each
taking (config, nets, ...) first: `networks(config)` makes the Flax modules once.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import ConfigError
from fewshot_jax.methods import common
from fewshot_jax.methods.matchingnet import cosine_matching
from fewshot_jax.models import backbones
from fewshot_jax.models import layers
from fewshot_jax.models import lgmnet as lgm

EVAL_MODES = ("single", "mean", "ensemble")


@dataclasses.dataclass(frozen=True)
class LGMNetMethod(common.Method):
  """common.Method plus LGM-Net's extra entry points.

  log_probs(params, state, episode, noise [D, T, L, Z]) -> [D, T, N*Q, N]:
    evaluation-mode log p(class | query) for D given noise draws.
  noise_shape(tasks) -> (tasks, L, Z), one draw's noise for a meta-batch.
  generated_weights(params, state, episode, noise [T, L, Z]) -> (kernels, biases):
    the TargetNet weights of every task (evaluation-mode BatchNorm), for analysis.
  train_log_probs(params, state, episode, noise [T, L, Z], key=None) -> (log_probs [T, N*Q, N], state):
    the training-mode log p(class | query) that `loss` scores (intertask BatchNorm,
    updated statistics returned) for given noise; for parity tests against other
    implementations.
  """

  log_probs: Callable[..., Any] | None = None
  noise_shape: Callable[..., Any] | None = None
  generated_weights: Callable[..., Any] | None = None
  train_log_probs: Callable[..., Any] | None = None


def vote(log_probs):
  """Majority vote of D predictions: log_probs [D, ..., N] -> scores [..., N].

  The score is each class's number of votes plus half the softmax of the mean
  log-probability over draws (a value in [0, 1/2]), so the argmax is the vote
  winner and ties between equally voted classes go to the higher mean log-prob.
  """
  ways = log_probs.shape[-1]
  counts = jax.nn.one_hot(jnp.argmax(log_probs, -1), ways, dtype=jnp.float32).sum(0)
  return counts + 0.5 * jax.nn.softmax(jnp.mean(log_probs, 0), axis=-1)


def draw_noise(key, mode: str, shape, ensemble_draws: int):
  """Noise [D, *shape] of an evaluation mode: zeros for 'mean', one draw for 'single', the
  ensemble's draws (the first equal to 'single''s) for 'ensemble'."""
  if mode == "mean":
    return jnp.zeros((1,) + tuple(shape), jnp.float32)
  n = 1 if mode == "single" else ensemble_draws
  return jax.random.normal(key, (n,) + tuple(shape), jnp.float32)


def task_noise(keys, mode: str, task_shape, ensemble_draws: int):
  """Noise [T, D, L, Z] of an evaluation mode, task t's drawn from keys[t] ([T] keys; task_shape
  = (L, Z)): a task's noise does not depend on the batch it is predicted in."""
  return jax.vmap(lambda k: draw_noise(k, mode, task_shape, ensemble_draws))(keys)


def reference_sampling(config: ml_collections.ConfigDict) -> dict:
  """sample_tasks' settings of the 'reference' protocol, the test of the authors' TF code: tasks of
  ONE query, its class drawn uniformly from the task's, with the training augmentation (per-class
  rotation) on."""
  return input_pipeline.episode_sampling(config, training=True, queries=1, query_sampling="per_task")


# Evaluation protocols beside the standard one (eval.protocol; Method.protocols): 'reference'
# scores eval.reference_tasks one-query tasks.
PROTOCOLS = {"reference": common.Protocol(sampling=reference_sampling,
                                          episodes=lambda config: config.eval.reference_tasks)}

BACKBONES = ("lgm_extractor",)  # model.backbone: the MetaNet's extractor, built here
KEYS = ("z_dim", "context_features", "target_features", "target_kernel", "l2_eps", "bn_momentum",
         "bn_epsilon", "dropout_rate", "task_conv", "eval_mode", "ensemble_draws", "cosine_scale", "eps", "kernel_layout")


def check_config(config: ml_collections.ConfigDict) -> None:
  mc = config.method
  if mc.task_conv not in lgm.TASK_CONVS:
    raise ConfigError(f"method.task_conv={mc.task_conv!r} is unknown; valid: {list(lgm.TASK_CONVS)}")
  if mc.eval_mode not in EVAL_MODES:
    raise ConfigError(f"method.eval_mode={mc.eval_mode!r} is unknown; valid: {list(EVAL_MODES)}")
  if mc.kernel_layout not in lgm.KERNEL_LAYOUTS:
    raise ConfigError(f"method.kernel_layout={mc.kernel_layout!r} is unknown; valid: {list(lgm.KERNEL_LAYOUTS)}")
  for key in ("ensemble_draws", "z_dim", "context_features", "target_kernel"):
    if not isinstance(mc[key], int) or mc[key] < 1:
      raise ConfigError(f"method.{key}={mc[key]!r} must be a positive integer")
  if not mc.target_features or any(not isinstance(f, int) or f < 1 for f in mc.target_features):
    raise ConfigError(f"method.target_features={mc.target_features!r} must be a non-empty tuple of "
                      "positive integers (the TargetNet's output channels per layer)")
  if not 0.0 <= mc.dropout_rate < 1.0:
    raise ConfigError(f"method.dropout_rate={mc.dropout_rate} must lie in [0, 1)")


class Nets(NamedTuple):
  """The networks of one config (Flax modules: their description, no parameters) and the TargetNet's
  per-task (kernel-batched) convolution."""

  extractor: lgm.Extractor
  context_encoder: lgm.TaskContextEncoder
  generator: lgm.WeightGenerator
  task_conv: Callable[..., Any]


def target_shapes(config: ml_collections.ConfigDict) -> tuple:
  """(k, k, C_in, C_out) of every TargetNet layer."""
  mc = config.method
  k = mc.target_kernel
  widths = (config.model.features,) + tuple(mc.target_features)
  return tuple((k, k, cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))


def networks(config: ml_collections.ConfigDict) -> Nets:
  mc = config.method
  impl = config.model.conv_impl
  conv = layers.conv_function(impl)
  dtype = backbones.dtype_from_config(config)
  bn = dict(bn_momentum=mc.bn_momentum, bn_epsilon=mc.bn_epsilon, remat=backbones.remat_from_config(config))
  extractor = lgm.Extractor(features=config.model.features, dropout_rate=mc.dropout_rate, dtype=dtype,
                            conv_general_dilated=conv, **bn)
  context_encoder = lgm.TaskContextEncoder(features=mc.context_features, context_dim=2 * mc.z_dim,
                                           dtype=dtype, conv_general_dilated=conv, **bn)
  generator = lgm.WeightGenerator(layer_shapes=target_shapes(config), l2_eps=mc.l2_eps,
                                  kernel_layout=mc.kernel_layout)
  return Nets(extractor, context_encoder, generator, layers.task_conv_function(impl))


def noise_shape(config: ml_collections.ConfigDict, tasks: int) -> tuple:
  """(tasks, L, Z): one draw's noise for a meta-batch."""
  return (tasks, len(config.method.target_features), config.method.z_dim)


def embed(nets: Nets, params, state, episode, train: bool, key=None):
  """Extractor on all images, context encoder on all supports -> per-task pieces."""
  images, split = common.flatten_images(episode)
  t, s = episode.support.shape[:2]
  stats = state["batch_stats"]
  ext_vars = {"params": params["extractor"], "batch_stats": stats["extractor"]}
  ctx_vars = {"params": params["context_encoder"], "batch_stats": stats["context_encoder"]}
  if train:
    rngs = {"dropout": key} if key is not None else {}
    feats, ext_new = nets.extractor.apply(ext_vars, images, train=True, mutable=["batch_stats"], rngs=rngs)
  else:
    feats = nets.extractor.apply(ext_vars, images, train=False)
  support, query = split(feats)
  support_flat = support.reshape((t * s,) + support.shape[2:])
  if train:
    ctx, ctx_new = nets.context_encoder.apply(ctx_vars, support_flat, train=True, mutable=["batch_stats"])
    new_state = {"batch_stats": {"extractor": ext_new["batch_stats"],
                                 "context_encoder": ctx_new["batch_stats"]}}
  else:
    ctx = nets.context_encoder.apply(ctx_vars, support_flat, train=False)
    new_state = state
  context = ctx.reshape(t, s, -1).mean(1)  # [T, 2Z]
  return support, query, context, new_state


def generate(config: ml_collections.ConfigDict, nets: Nets, params, context, noise):
  """Kernels [T, kh, kw, C, N] and biases [T, N] of every TargetNet layer."""
  z_dim = config.method.z_dim
  return nets.generator.apply({"params": params["weight_generator"]}, context[:, :z_dim], context[:, z_dim:],
                              noise)


def head(config: ml_collections.ConfigDict, nets: Nets, params, support, query, context, support_labels,
         ways: int, noise):
  """log p(class | query) [T, Q, N] for one noise draw [T, L, Z]."""
  mc = config.method
  kernels, biases = generate(config, nets, params, context, noise)
  s = support.shape[1]
  emb = lgm.target_net(jnp.concatenate([support, query], axis=1), kernels, biases, mc.task_conv, nets.task_conv)
  match = lambda se, labels, qe: cosine_matching(qe, se, labels, ways, mc.cosine_scale, mc.eps)
  return jax.vmap(match)(emb[:, :s], support_labels, emb[:, s:])


def init(config: ml_collections.ConfigDict, nets: Nets, key, episode) -> dict:
  ext_key, ctx_key, gen_key = jax.random.split(key, 3)
  images, _ = common.flatten_images(episode)
  t, s = episode.support.shape[:2]
  ext = nets.extractor.init(ext_key, images, train=False)
  feat = jax.eval_shape(lambda v, x: nets.extractor.apply(v, x, train=False), ext, images)
  ctx = nets.context_encoder.init(ctx_key, jnp.zeros((t * s,) + feat.shape[1:], feat.dtype), train=False)
  zeros = jnp.zeros((t, config.method.z_dim), jnp.float32)
  gen = nets.generator.init(gen_key, zeros, zeros, jnp.zeros(noise_shape(config, t), jnp.float32))
  return {"params": {"extractor": ext["params"], "context_encoder": ctx["params"],
                     "weight_generator": gen["params"]},
          "batch_stats": {"extractor": ext["batch_stats"], "context_encoder": ctx["batch_stats"]}}


def train_log_probs(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, noise, key=None):
  support, query, context, new_state = embed(nets, params, state, episode, True, key)
  ways = episode.classes.shape[1]
  return head(config, nets, params, support, query, context, episode.support_labels, ways, noise), new_state


def loss(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, key):
  noise_key, dropout_key = jax.random.split(key)
  noise = jax.random.normal(noise_key, noise_shape(config, episode.support.shape[0]), jnp.float32)
  log_p, new_state = train_log_probs(config, nets, params, state, episode, noise, dropout_key)
  # log_p are log-probabilities; softmax cross-entropy on them equals -log p up to eps.
  value, metrics = common.classification_metrics(log_p, episode.query_labels)
  return value, (metrics, new_state)


def eval_log_probs(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, noise):
  """Evaluation-mode log p(class | query) [D, T, N*Q, N] for D noise draws [D, T, L, Z]."""
  ways = episode.classes.shape[1]
  support, query, context, _ = embed(nets, params, state, episode, False)
  one = lambda n: head(config, nets, params, support, query, context, episode.support_labels, ways, n)
  return jax.vmap(one)(noise)


def mode_noise(config: ml_collections.ConfigDict, keys, mode: str):
  """An evaluation mode's noise [D, T, L, Z], as eval_log_probs takes it (task t's from keys[t])."""
  return jnp.swapaxes(task_noise(keys, mode, noise_shape(config, 1)[1:], config.method.ensemble_draws), 0, 1)


def mode_scores(mode: str, log_p):
  """Scores [T, Q, N] of an evaluation mode from its draws' log-probabilities [D, T, Q, N]."""
  return vote(log_p) if mode == "ensemble" else log_p[0]


def predict(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys):
  mode = config.method.eval_mode
  log_p = eval_log_probs(config, nets, params, state, episode, mode_noise(config, keys, mode))
  return mode_scores(mode, log_p)


def predict_all_modes(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys) -> dict:
  """Every mode's scores from one run of the extractor and context encoder (all modes' draws at once)."""
  noise = jnp.concatenate([mode_noise(config, keys, m) for m in EVAL_MODES])
  log_p = eval_log_probs(config, nets, params, state, episode, noise)
  out, start = {}, 0
  for m in EVAL_MODES:
    n = 1 if m != "ensemble" else config.method.ensemble_draws
    out[m] = mode_scores(m, log_p[start:start + n])
    start += n
  return out


def generated_weights(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, noise):
  return generate(config, nets, params, embed(nets, params, state, episode, False)[2], noise)


def extractor_features(config, nets: Nets, params, state, images):
  """Method.embed: the Extractor's feature maps [B, h, w, C], the only task-independent network (the
  TargetNet's embeddings depend on each task's generated weights)."""
  del config
  variables = {"params": params["extractor"], "batch_stats": state["batch_stats"]["extractor"]}
  return nets.extractor.apply(variables, images, train=False)


def probabilities(config, mode, scores):
  """'single' / 'mean': the matching classifier's p(class | query) (softmax of its log-probabilities);
  'ensemble': each class's share of the draws' votes (its scores are vote counts plus a tie-break below 1)."""
  if mode == "ensemble":
    return jnp.floor(scores) / config.method.ensemble_draws
  return jax.nn.softmax(scores, axis=-1)


def build(config: ml_collections.ConfigDict) -> LGMNetMethod:
  nets = networks(config)
  bind = lambda fn: functools.partial(fn, config, nets)
  return LGMNetMethod("lgmnet", bind(init), bind(loss), bind(predict), predict_all_modes=bind(predict_all_modes),
                      eval_mode=lambda c: c.method.eval_mode, protocols=PROTOCOLS,
                      log_probs=bind(eval_log_probs), noise_shape=functools.partial(noise_shape, config),
                      generated_weights=bind(generated_weights), train_log_probs=bind(train_log_probs),
                      embed=bind(extractor_features), probabilities=functools.partial(probabilities, config))
