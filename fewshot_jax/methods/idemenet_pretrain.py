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

import functools

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
from fewshot_jax.models import deformation


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


def patch_mix(key, image: jax.Array, partner: jax.Array, grid: int = 3, prob: float = 2 / 3) -> jax.Array:
  """The "softRandom" augmentation of one square [H, W, C] image.

  With probability `prob`, each of the grid x grid patches (deformation.patch_borders,
  row-major) becomes w * image + (1 - w) * partner with its own w ~ U[0, 1], the
  partner being another image of the same class; otherwise the image is returned.
  Uses the deformation module's map and fusion so stage 1 and stage 2 cut patches
  identically.
  """
  if image.shape[0] != image.shape[1]:
    raise ValueError(f"patch_mix needs square images, got {image.shape[:2]}")
  mix_key, weight_key = jax.random.split(key)
  do = jax.random.bernoulli(mix_key, prob)
  weights = jax.random.uniform(weight_key, (grid * grid,))
  mixed = deformation.fuse(image, partner, deformation.weight_map(weights, image.shape[0], grid))
  return jnp.where(do, mixed, image)


def pretrain_augment(key, images: jax.Array, partners: jax.Array, *, mean, std, size: int,
                     flip_prob: float = 0.5, mix_prob: float = 2 / 3, grid: int = 3,
                     scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """Stage 1's batch augmentation: [B, H, W, C] images + same-class partners -> [B, size, size, C].

  Image and partner each get their own RandomResizedCrop and flip, then both are
  normalised and patch-mixed. Mixing after normalising equals mixing raw pixels
  and normalising (normalisation is affine, patch weights sum to 1), and matches
  the reference, which fuses normalised tensors.
  """
  b = images.shape[0]
  crop_i, crop_p, flip_i, flip_p, mix = jax.random.split(key, 5)
  crop = jax.vmap(functools.partial(augment.random_resized_crop, size=size, scale=scale, ratio=ratio))
  images = crop(jax.random.split(crop_i, b), images)
  partners = crop(jax.random.split(crop_p, b), partners)
  if flip_prob > 0:
    images = augment.flip(flip_i, images, flip_prob)
    partners = augment.flip(flip_p, partners, flip_prob)
  images = augment.normalise(images, mean, std)
  partners = augment.normalise(partners, mean, std)
  mix_fn = jax.vmap(functools.partial(patch_mix, grid=grid, prob=mix_prob))
  return mix_fn(jax.random.split(mix, b), images, partners)


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
    out = pretrain_augment(aug_key, images, partners, mean=config.data.mean, std=config.data.std,
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
