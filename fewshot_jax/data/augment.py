"""On-device augmentation: normalise, resize, flip, rotate, resized crop, patch mixing.

Everything is a pure function of a key so it runs inside the jitted step,
vmapped over tasks. Pixel statistics are in 0..255 units, as papers state them.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fewshot_jax.errors import ConfigError
from fewshot_jax.models import deformation


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


_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params tries 10 boxes before falling back


def random_crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params, traceable: int32 (top, left, box_h, box_w).

  The 10 attempts are drawn at once and the first box that fits wins, so there is
  no data-dependent Python loop; if none fits, the central crop with the image's
  aspect ratio clamped into `ratio` is used, as torchvision does.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = float(height * width)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  target = area * jax.random.uniform(area_key, (_CROP_ATTEMPTS,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (_CROP_ATTEMPTS,), minval=log_lo, maxval=log_hi))
  ws = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(fits)  # index of the first fitting attempt (0 when none fits)
  # Central-crop fallback (static: depends on shapes and ratio only).
  in_ratio = width / height
  if in_ratio < min(ratio):
    fb_w, fb_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fb_h, fb_w = height, int(round(height * max(ratio)))
  else:
    fb_w, fb_h = width, height
  ok = fits[first]
  box_h = jnp.where(ok, hs[first], fb_h)
  box_w = jnp.where(ok, ws[first], fb_w)
  top = jnp.where(ok, jax.random.randint(top_key, (), 0, height - box_h + 1), (height - fb_h) // 2)
  left = jnp.where(ok, jax.random.randint(left_key, (), 0, width - box_w + 1), (width - fb_w) // 2)
  return top, left, box_h, box_w


def crop_and_resize(image: jax.Array, top, left, box_h, box_w, size: int) -> jax.Array:
  """Bilinear (antialiased when shrinking) resize of box [top:top+h, left:left+w] of one [H, W, C] image.

  scale_and_translate takes the box as traced scale/offset, so boxes may differ per
  image under vmap. Unlike crop-then-resize, the filter may read pixels just outside
  the box (still inside the image) at its edges; the sampling grid is the same.
  """
  sy = size / box_h.astype(jnp.float32)
  sx = size / box_w.astype(jnp.float32)
  return jax.image.scale_and_translate(
      image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1),
      jnp.stack([sy, sx]), jnp.stack([-top * sy, -left * sx]), method="linear", antialias=True)


def random_resized_crop(key, image: jax.Array, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """torchvision RandomResizedCrop of one [H, W, C] image -> [size, size, C] float32 (vmap for a batch)."""
  box = random_crop_box(key, image.shape[0], image.shape[1], scale, ratio)
  return crop_and_resize(image, *box, size)


def patch_mix(key, image: jax.Array, partner: jax.Array, grid: int = 3, prob: float = 2 / 3) -> jax.Array:
  """IDeMe-Net's "softRandom" stage-1 augmentation of one square [H, W, C] image.

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
  """IDeMe-Net stage-1 batch augmentation: [B, H, W, C] images + same-class partners -> [B, size, size, C].

  Image and partner each get their own RandomResizedCrop and flip, then both are
  normalised and patch-mixed. Mixing after normalising equals mixing raw pixels
  and normalising (normalisation is affine, patch weights sum to 1), and matches
  the reference, which fuses normalised tensors.
  """
  b = images.shape[0]
  crop_i, crop_p, flip_i, flip_p, mix = jax.random.split(key, 5)
  crop = jax.vmap(functools.partial(random_resized_crop, size=size, scale=scale, ratio=ratio))
  images = crop(jax.random.split(crop_i, b), images)
  partners = crop(jax.random.split(crop_p, b), partners)
  if flip_prob > 0:
    images = flip(flip_i, images, flip_prob)
    partners = flip(flip_p, partners, flip_prob)
  images = normalise(images, mean, std)
  partners = normalise(partners, mean, std)
  mix_fn = jax.vmap(functools.partial(patch_mix, grid=grid, prob=mix_prob))
  return mix_fn(jax.random.split(mix, b), images, partners)
