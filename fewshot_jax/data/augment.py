"""On-device augmentation: normalise, resize, flip, rotate, resized crop.

Everything is a pure function of a key so it runs inside the jitted step,
vmapped over tasks. Pixel statistics are in 0..255 units, as papers state them.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def normalise(images: jax.Array, mean, std) -> jax.Array:
  """uint8 (or float in 0..255) -> (x - mean) / std, per channel or scalar."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def to_channels(images: jax.Array, channels: int) -> jax.Array:
  """uint8 [..., C] images with `channels` channels (1 or 3), integer-exact, unchanged when C == channels:
  grey -> RGB repeats the channel; RGB -> grey is the ITU-R 601-2 luma
  L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, PIL's convert('L') bit for bit: the one channel rule
  of image_files.to_mode, applied on the device (cross-domain evaluation)."""
  have = images.shape[-1]
  if have == channels:
    return images
  if (have, channels) == (1, 3):
    return jnp.repeat(images, 3, axis=-1)
  if (have, channels) == (3, 1):
    rgb = images.astype(jnp.uint32)
    luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return (luma >> 16).astype(jnp.uint8)[..., None]
  raise ValueError(f"cannot convert {have}-channel images to {channels} channels; valid: 1 (grey), 3 (RGB)")


def resize(images: jax.Array, size: int, center_crop: float = 1.0) -> jax.Array:
  """Bilinear (antialiased when shrinking) resize of square [..., H, W, C] images to size x size.

  center_crop < 1 keeps the central fraction of the image: torchvision's
  Resize(round(size / center_crop)) + CenterCrop(size) (0.875: Resize 256 +
  CenterCrop 224, a common PyTorch test transform), one resampling.
  """
  if center_crop == 1.0:
    if images.shape[-3:-1] == (size, size):
      return images
    shape = images.shape[:-3] + (size, size, images.shape[-1])
    return jax.image.resize(images, shape, method="linear", antialias=True)
  full = int(round(size / center_crop))
  scale = full / images.shape[-2]
  offset = -float(int(round((full - size) / 2.0)))  # torchvision CenterCrop's top / left
  lead = images.ndim - 3
  return jax.image.scale_and_translate(
      images.astype(jnp.float32), images.shape[:-3] + (size, size, images.shape[-1]),
      (lead, lead + 1), jnp.array([scale, scale]), jnp.array([offset, offset]), method="linear", antialias=True)


# (order, mode) of `rotate` (augment.rotation_order / rotation_mode, checked by config.validate):
# scipy's cubic spline with edge replication, bilinear with edge replication, bilinear with zero fill.
ROTATIONS = ((3, "nearest"), (1, "nearest"), (1, "constant"))
_SPLINE_PAD = 12  # scipy.ndimage pads by 12 samples before its spline prefilter for mode='nearest'


@functools.lru_cache(maxsize=None)
def _prefilter_matrix(n: int) -> np.ndarray:
  """[n, n] linear map from samples to cubic B-spline coefficients (mirror boundary).

  Interpolation by a cubic B-spline asks c[i-1] / 6 + 2 c[i] / 3 + c[i+1] / 6 = x[i];
  solving it is the recursive filter scipy.ndimage runs, written as a matrix so
  it is two small matmuls on the device. The boundary rule only reaches
  0.268^k samples in, and the signal it sees is edge-padded by _SPLINE_PAD.
  """
  a = np.zeros((n, n))
  idx = np.arange(n)
  a[idx, idx] = 4 / 6
  a[idx[1:], idx[:-1]] = 1 / 6
  a[idx[:-1], idx[1:]] = 1 / 6
  a[0, 1] = a[-1, -2] = 2 / 6  # mirror: c[-1] = c[1], c[n] = c[n-2]
  return np.linalg.inv(a).astype(np.float32)


def _cubic_weights(t):
  """Cubic B-spline weights of the four taps floor(x) - 1 .. floor(x) + 2, t = x - floor(x)."""
  return jnp.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                    (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6])


def _spline_nearest(image, src_y, src_x):
  """scipy.ndimage.map_coordinates(order=3, mode='nearest') of one [H, W, C] image.

  As scipy: the image is edge-padded by 12 samples, prefiltered, and coordinates
  are clamped to the padded grid, so points outside the image take edge values.
  """
  h, w = image.shape[:2]
  p = _SPLINE_PAD
  padded = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode="edge")
  hi = jax.lax.Precision.HIGHEST
  coef = jnp.einsum("ij,jkc->ikc", _prefilter_matrix(h + 2 * p), padded, precision=hi)
  coef = jnp.einsum("lk,ikc->ilc", _prefilter_matrix(w + 2 * p), coef, precision=hi)
  y = jnp.clip(src_y + p, 0, h + 2 * p - 1)
  x = jnp.clip(src_x + p, 0, w + 2 * p - 1)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = _cubic_weights(y - y0), _cubic_weights(x - x0)  # [4, H, W]
  out = jnp.zeros_like(image)
  for a in range(4):
    rows = jnp.clip(y0.astype(jnp.int32) + a - 1, 0, h + 2 * p - 1)
    for b in range(4):
      cols = jnp.clip(x0.astype(jnp.int32) + b - 1, 0, w + 2 * p - 1)
      out = out + (wy[a] * wx[b])[..., None] * coef[rows, cols]
  return out


def rotate(image: jax.Array, degrees: jax.Array, order: int = 3, mode: str = "nearest",
           fill: float = 0.0) -> jax.Array:
  """Rotates one [H, W, C] image counterclockwise about its centre, keeping its shape.

  order=3, mode='nearest' is scipy.ndimage.rotate(image, degrees, reshape=False,
  mode='nearest') (its defaults: cubic spline, prefiltered): edge pixels are
  replicated, so no corner is blank. order=1 is bilinear; mode='constant' fills
  outside the image with `fill` (blank corners that reveal the angle: README,
  "Faithful to the originals"; docs/faithful.md).
  """
  if (order, mode) not in ROTATIONS:
    raise ValueError(f"rotation order={order!r}, mode={mode!r} is not supported; valid: {list(ROTATIONS)}")
  h, w = image.shape[:2]
  theta = jnp.deg2rad(degrees)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  # Inverse map: output pixel -> source pixel (rotate back by theta).
  dy, dx = yy - cy, xx - cx
  src_y = cy + jnp.cos(theta) * dy + jnp.sin(theta) * dx
  src_x = cx - jnp.sin(theta) * dy + jnp.cos(theta) * dx
  image = image.astype(jnp.float32)
  if order == 3:
    return _spline_nearest(image, src_y, src_x)
  channels = [
      jax.scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode=mode, cval=fill)
      for c in range(image.shape[-1])
  ]
  return jnp.stack(channels, axis=-1)


def flip(key, images: jax.Array, prob: float) -> jax.Array:
  """Flips each image of [B, H, W, C] horizontally with probability `prob`."""
  do = jax.random.bernoulli(key, prob, (images.shape[0], 1, 1, 1))
  return jnp.where(do, images[:, :, ::-1, :], images)


def task_augment(key, support, support_labels, query, query_labels, *, mean, std, size: int,
                 flip_prob: float = 0.0, class_rotations: Sequence[float] = (), ways: int | None = None,
                 rotation_order: int = 3, rotation_mode: str = "nearest", center_crop: float = 1.0):
  """Augments one task. Per-class rotations are drawn once per class and shared by its images."""
  rot_key, flip_s, flip_q = jax.random.split(key, 3)
  support = support.astype(jnp.float32)
  query = query.astype(jnp.float32)
  if class_rotations:  # raw pixels, so a constant fill is black whatever the normalisation
    angles = jnp.asarray(class_rotations, jnp.float32)
    per_class = angles[jax.random.randint(rot_key, (ways,), 0, len(class_rotations))]
    rot = jax.vmap(functools.partial(rotate, order=rotation_order, mode=rotation_mode))
    support = rot(support, per_class[support_labels])
    query = rot(query, per_class[query_labels])
  support = resize(normalise(support, mean, std), size, center_crop)
  query = resize(normalise(query, mean, std), size, center_crop)
  if flip_prob > 0:
    support = flip(flip_s, support, flip_prob)
    query = flip(flip_q, query, flip_prob)
  return support, query


def from_config(config: ml_collections.ConfigDict, ways: int, training: bool = True):
  """Builds the task augmentation of `config.data` / `config.augment`.

  training=False is the standard evaluation protocol: normalise and resize only.
  Per-class rotation must not reach standard evaluation: the angle (and the
  black corners it leaves) is shared by a class's supports and queries, so a
  model can match on it instead of on content (measured, README). A method's own
  protocol may evaluate with training=True (common.Protocol), as an original does.
  `ways` is the episode's way count (one angle per class).
  """
  aug = config.augment
  return functools.partial(
      task_augment, mean=config.data.mean, std=config.data.std, size=input_size(config),
      flip_prob=aug.flip_prob if training else 0.0,
      class_rotations=tuple(aug.class_rotations) if training else (), ways=ways,
      rotation_order=aug.rotation_order, rotation_mode=aug.rotation_mode, center_crop=config.data.center_crop)


def input_size(config: ml_collections.ConfigDict) -> int:
  """The model's input side: data.input_size, or the stored image size when it is 0."""
  return config.data.get("input_size") or config.data.image_size


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
