"""Matching Networks (Vinyals et al. 2016) without full context embeddings.

Each query attends over the supports with a softmax of cosine similarities; the
prediction is the attention-weighted sum of the supports' one-hot labels and
the loss is the cross-entropy on its log (plus eps, since it is a probability,
not a logit).
"""

import jax
import jax.numpy as jnp
import ml_collections

from fewshot_jax.methods import common
from fewshot_jax.models import backbones


def cosine_matching(query, support, support_labels, ways: int, scale: float, eps: float):
  """log p(class | query) for one task: softmax over supports of scale * cosine, summed per class."""
  qn = query / jnp.maximum(jnp.linalg.norm(query, axis=-1, keepdims=True), eps)
  sn = support / jnp.maximum(jnp.linalg.norm(support, axis=-1, keepdims=True), eps)
  attention = jax.nn.softmax(scale * qn @ sn.T, axis=-1)  # [Q, S]
  probs = attention @ jax.nn.one_hot(support_labels, ways, dtype=attention.dtype)
  return jnp.log(probs + eps)


def build(config: ml_collections.ConfigDict) -> common.Method:
  model = backbones.from_config(config)
  scale = config.method.cosine_scale
  eps = config.method.eps

  def logits_fn(params, state, episode, train):
    ways = episode.classes.shape[1]
    images, split = common.flatten_images(episode)
    features, new_state = common.apply_backbone(model, params, state, images, train)
    support, query = split(features)
    task = lambda s, labels, q: cosine_matching(q, s, labels, ways, scale, eps)
    return jax.vmap(task)(support, episode.support_labels, query), new_state

  def init(key, episode):
    images, _ = common.flatten_images(episode)
    return model.init(key, images, train=False)

  def loss(params, state, episode, key):
    del key
    log_probs, new_state = logits_fn(params, state, episode, True)
    # log_probs are log-probabilities already; softmax CE on them equals -log p up to eps.
    value, metrics = common.classification_metrics(log_probs, episode.query_labels)
    return value, (metrics, new_state)

  def predict(params, state, episode, key):
    del key
    return logits_fn(params, state, episode, False)[0]

  return common.Method("matchingnet", init, loss, predict)
