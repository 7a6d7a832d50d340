"""Prototypical Networks (Snell et al. 2017): squared Euclidean distance to class-mean prototypes."""

import ml_collections

from fewshot_jax.methods import common
from fewshot_jax.models import backbones


KEYS = ()  # no keys of its own under method.*
BACKBONES = backbones.BACKBONES  # model.backbone: built by backbones.from_config


def head(support, support_labels, query, ways):
  """Logits of one task: minus the squared distance of each query to each class prototype."""
  return -common.squared_distances(query, common.prototypes(support, support_labels, ways))


def build(config: ml_collections.ConfigDict) -> common.Method:
  return common.metric_method("protonet", backbones.from_config(config), head)
