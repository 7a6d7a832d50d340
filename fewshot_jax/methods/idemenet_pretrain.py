"""IDeMe-Net stage 1 ("softRandom"): supervised 64-way pretraining of the embedding E.

Each step draws `batch_size` images uniformly from the first `images_per_class`
images of every base class (the reference's list) and, for each, a partner
image of the same class; both get RandomResizedCrop + flip on the device, then
with probability `mix_prob` the image is mixed patch-wise (G x G grid, one
U[0, 1] weight per patch) with its partner. Loss: cross-entropy of E's fc.
BatchNorm trains normally here (it is frozen only in stage 2).

Validation and `predict` score E as a prototype classifier on few-shot
episodes (squared Euclidean distance of its 512-d features), so the stage-1
checkpoint that stage 2 loads is selected on validation classes.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fewshot_jax.data import augment
from fewshot_jax.data import episodes
from fewshot_jax.errors import ConfigError
from fewshot_jax.methods import common
from fewshot_jax.methods import idemenet


@flax.struct.dataclass
class Batch:
  images: jax.Array  # [B, H, W, C] float, augmented; the batch axis is sharded like a task axis
  labels: jax.Array  # [B] int32 base class


BACKBONES = ("resnet18",)  # model.backbone: the one network it trains
KEYS = ("batch_size", "images_per_class", "mix_prob", "grid", "flip_prob", "crop_scale", "num_classes")


def check_config(config: ml_collections.ConfigDict) -> None:
  mc = config.method
  for key in ("batch_size", "images_per_class", "num_classes"):
    if not isinstance(mc[key], int) or mc[key] < 1:
      raise ConfigError(f"method.{key}={mc[key]!r} must be a positive integer")
  if not 0.0 <= mc.mix_prob <= 1.0:
    raise ConfigError(f"method.mix_prob={mc.mix_prob} must lie in [0, 1]")
  idemenet.check_rgb(config)


def build(config: ml_collections.ConfigDict) -> common.Method:
  mc = config.method
  size = idemenet.input_size(config)
  model = idemenet.embedding_model(config)
  batch, per_class = mc.batch_size, mc.images_per_class

  def train_batch(key, dataset):
    class_key, image_key, partner_key, aug_key = jax.random.split(key, 4)
    if dataset.num_classes != mc.num_classes:
      raise ConfigError(f"method.num_classes={mc.num_classes} but the train split has {dataset.num_classes} "
                        "classes")
    limit = jnp.minimum(dataset.class_counts, per_class)
    classes = jax.random.randint(class_key, (batch,), 0, dataset.num_classes)
    first = (jax.random.uniform(image_key, (batch,)) * limit[classes]).astype(jnp.int32)
    # Partner: another of the class's first `limit` images (never the image itself).
    shift = 1 + (jax.random.uniform(partner_key, (batch,)) * (limit[classes] - 1)).astype(jnp.int32)
    second = (first + shift) % limit[classes]
    images = episodes.take_images(dataset, dataset.class_index[classes, first])
    partners = episodes.take_images(dataset, dataset.class_index[classes, second])
    out = augment.pretrain_augment(aug_key, images, partners, mean=config.data.mean, std=config.data.std,
                                   size=size, flip_prob=mc.flip_prob, mix_prob=mc.mix_prob, grid=mc.grid,
                                   scale=tuple(mc.crop_scale))
    return Batch(images=out, labels=dataset.class_ids[classes].astype(jnp.int32))

  def train_example():
    return Batch(images=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                 labels=jax.ShapeDtypeStruct((batch,), jnp.int32))

  def init(key, example):
    return model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False)

  def loss(params, state, batch_, key):
    del key
    (_, logits), new_state = model.apply({"params": params, **state}, batch_.images, train=True,
                                         mutable=["batch_stats"])
    labels = batch_.labels
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return value, ({"loss": value, "accuracy": accuracy}, new_state)

  def predict(params, state, episode, key):
    del key
    ways = episode.classes.shape[1]
    images, split = common.flatten_images(episode)
    support, query = split(model.apply({"params": params, **state}, images, train=False)[0])
    logits = lambda s, y, q: -common.squared_distances(q, common.prototypes(s, y, ways))
    return jax.vmap(logits)(support, episode.support_labels, query)

  def embed(params, state, images):
    return model.apply({"params": params, **state}, images, train=False)[0]

  return common.Method("idemenet_pretrain", init, loss, predict, train_batch=train_batch,
                       train_example=train_example, embed=embed)
