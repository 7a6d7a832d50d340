"""Prototypical Networks (Snell et al. 2017): squared Euclidean distance to class-mean prototypes."""

import jax
import ml_collections

from fewshot_jax.methods import common
from fewshot_jax.models import backbones


def build(config: ml_collections.ConfigDict) -> common.Method:
  model = backbones.from_config(config)

  def logits_fn(params, state, episode, train):
    ways = episode.classes.shape[1]
    images, split = common.flatten_images(episode)
    features, new_state = common.apply_backbone(model, params, state, images, train)
    support, query = split(features)

    def task(s, labels, q):
      return -common.squared_distances(q, common.prototypes(s, labels, ways))

    return jax.vmap(task)(support, episode.support_labels, query), new_state

  def init(key, episode):
    images, _ = common.flatten_images(episode)
    return model.init(key, images, train=False)

  def loss(params, state, episode, key):
    del key
    logits, new_state = logits_fn(params, state, episode, True)
    value, metrics = common.classification_metrics(logits, episode.query_labels)
    return value, (metrics, new_state)

  def predict(params, state, episode, key):
    del key
    return logits_fn(params, state, episode, False)[0]

  return common.Method("protonet", init, loss, predict)
