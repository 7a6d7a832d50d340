"""On-device augmentation of one task's images: normalise, resize, flip, rotate.

Everything is a pure function of a key so it runs inside the jitted step,
vmapped over tasks. Pixel statistics are in 0..255 units, as papers state them.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fewshot_jax.errors import ConfigError


def normalise(images: jax.Array, mean, std) -> jax.Array:
  """uint8 (or float in 0..255) -> (x - mean) / std, per channel or scalar."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def resize(images: jax.Array, size: int) -> jax.Array:
  """Bilinear (antialiased when shrinking) resize of [..., H, W, C] to size x size."""
  if images.shape[-3:-1] == (size, size):
    return images
  shape = images.shape[:-3] + (size, size, images.shape[-1])
  return jax.image.resize(images, shape, method="linear", antialias=True)


def rotate(image: jax.Array, degrees: jax.Array, fill: float = 0.0) -> jax.Array:
  """Rotates one [H, W, C] image counterclockwise about its centre (bilinear, constant fill)."""
  h, w = image.shape[:2]
  theta = jnp.deg2rad(degrees)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  # Inverse map: output pixel -> source pixel (rotate back by theta).
  dy, dx = yy - cy, xx - cx
  src_y = cy + jnp.cos(theta) * dy + jnp.sin(theta) * dx
  src_x = cx - jnp.sin(theta) * dy + jnp.cos(theta) * dx
  channels = [
      jax.scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode="constant", cval=fill)
      for c in range(image.shape[-1])
  ]
  return jnp.stack(channels, axis=-1)


def flip(key, images: jax.Array, prob: float) -> jax.Array:
  """Flips each image of [B, H, W, C] horizontally with probability `prob`."""
  do = jax.random.bernoulli(key, prob, (images.shape[0], 1, 1, 1))
  return jnp.where(do, images[:, :, ::-1, :], images)


def task_augment(key, support, support_labels, query, query_labels, *, mean, std, size: int,
                 flip_prob: float = 0.0, class_rotations: Sequence[float] = (), ways: int | None = None):
  """Augments one task. Per-class rotations are drawn once per class and shared by its images."""
  rot_key, flip_s, flip_q = jax.random.split(key, 3)
  support = support.astype(jnp.float32)
  query = query.astype(jnp.float32)
  if class_rotations:  # rotate raw pixels so the fill is black whatever the normalisation
    angles = jnp.asarray(class_rotations, jnp.float32)
    per_class = angles[jax.random.randint(rot_key, (ways,), 0, len(class_rotations))]
    rot = jax.vmap(rotate)
    support = rot(support, per_class[support_labels])
    query = rot(query, per_class[query_labels])
  support = resize(normalise(support, mean, std), size)
  query = resize(normalise(query, mean, std), size)
  if flip_prob > 0:
    support = flip(flip_s, support, flip_prob)
    query = flip(flip_q, query, flip_prob)
  return support, query


def from_config(config: ml_collections.ConfigDict, ways: int, training: bool = True):
  """Builds the task augmentation of `config.data` / `config.augment`.

  training=False is the standard evaluation protocol: normalise and resize only.
  Per-class rotation must not reach standard evaluation: the angle (and the
  black corners it leaves) is shared by a class's supports and queries, so a
  model can match on it instead of on content (measured on LGM-Net, README).
  The `reference` protocol of evaluate.py passes training=True, as the LGM-Net
  code does. `ways` is the episode's way count (one angle per class).
  """
  aug = config.augment
  if aug.flip_prob < 0 or aug.flip_prob > 1:
    raise ConfigError(f"augment.flip_prob={aug.flip_prob} must lie in [0, 1]")
  size = config.data.get("input_size") or config.data.image_size
  return functools.partial(
      task_augment, mean=config.data.mean, std=config.data.std, size=size,
      flip_prob=aug.flip_prob if training else 0.0,
      class_rotations=tuple(aug.class_rotations) if training else (), ways=ways)
