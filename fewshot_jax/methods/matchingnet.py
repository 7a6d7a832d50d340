"""Matching Networks (Vinyals et al. 2016) without full context embeddings.

Each query attends over the supports with a softmax of cosine similarities; the
prediction is the attention-weighted sum of the supports' one-hot labels, and
the loss is the cross-entropy on its log (plus eps: it is a probability, not a
logit; softmax cross-entropy of log-probabilities equals -log p up to eps).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from fewshot_jax.methods import common
from fewshot_jax.models import backbones


KEYS = ("cosine_scale", "eps")
BACKBONES = backbones.BACKBONES  # model.backbone: built by backbones.from_config


def cosine_matching(query, support, support_labels, ways: int, scale: float, eps: float):
  """log p(class | query) for one task: softmax over supports of scale * cosine, summed per class."""
  qn = query / jnp.maximum(jnp.linalg.norm(query, axis=-1, keepdims=True), eps)
  sn = support / jnp.maximum(jnp.linalg.norm(support, axis=-1, keepdims=True), eps)
  attention = jax.nn.softmax(scale * qn @ sn.T, axis=-1)  # [Q, S]
  probs = attention @ jax.nn.one_hot(support_labels, ways, dtype=attention.dtype)
  return jnp.log(probs + eps)


def head(support, support_labels, query, ways, *, scale, eps):
  return cosine_matching(query, support, support_labels, ways, scale, eps)


def build(config: ml_collections.ConfigDict) -> common.Method:
  scored = functools.partial(head, scale=config.method.cosine_scale, eps=config.method.eps)
  return common.metric_method("matchingnet", backbones.from_config(config), scored)
