"""Stage-1 (IDeMe-Net softRandom) augmentation: RandomResizedCrop, patch mixing, batch pipeline."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax.data import augment
from fewshot_jax.methods import idemenet_pretrain
from fewshot_jax.models import deformation

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _coord_image(h, w):
  """[H, W, 2] float: channel 0 = column index, channel 1 = row index, so a crop reveals its box."""
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
  return jnp.asarray(np.stack([xx, yy], axis=-1))


@pytest.mark.parametrize("size", [20, 8])
def test_full_box_is_plain_resize(size):
  """scale=(1,1), ratio=(1,1) on a square image must be the whole image, resized like augment.resize."""
  image = jax.random.uniform(jax.random.PRNGKey(0), (12, 12, 3)) * 255
  crop = jax.jit(functools.partial(augment.random_resized_crop, size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
  out = crop(jax.random.PRNGKey(1), image)
  assert out.shape == (size, size, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, augment.resize(image, size), atol=1e-3)


def test_boxes_fit_span_scale_and_keep_ratio():
  """Many draws: boxes inside the image, area fractions spread over `scale`, aspect within `ratio` up to rounding."""
  h = w = 84
  keys = jax.random.split(jax.random.PRNGKey(2), 4000)
  box = jax.jit(jax.vmap(lambda k: augment.random_crop_box(k, h, w, (0.08, 1.0), (3 / 4, 4 / 3))))
  top, left, bh, bw = (np.asarray(a) for a in box(keys))
  assert (top >= 0).all() and (left >= 0).all() and (bh > 0).all() and (bw > 0).all()
  assert (top + bh <= h).all() and (left + bw <= w).all()
  frac = bh * bw / (h * w)
  # U(0.08, 1) has mean 0.54; rejected large boxes with extreme ratios pull it down a little.
  assert 0.45 < frac.mean() < 0.58, frac.mean()
  assert frac.min() < 0.12 and frac.max() > 0.95
  # w = round(sqrt(A r)), h = round(sqrt(A / r)): each is off by at most 1/2 pixel.
  assert ((bw + 0.5) / (bh - 0.5) >= 3 / 4 - 1e-6).all()
  assert ((bw - 0.5) / (bh + 0.5) <= 4 / 3 + 1e-6).all()
  assert len(set(zip(top, left, bh, bw))) > 3000  # not stuck on a few boxes


def test_fallback_is_central_crop_with_clamped_ratio():
  """No attempt fits (area fraction 2): torchvision's central crop, ratio clamped to 4/3 for a 20x60 image."""
  box = jax.jit(lambda k: augment.random_crop_box(k, 20, 60, (2.0, 2.0), (3 / 4, 4 / 3)))
  top, left, bh, bw = box(jax.random.PRNGKey(3))
  assert (int(top), int(left), int(bh), int(bw)) == (0, 16, 20, 27)


def test_crops_sample_their_box():
  """Crops read only their box (up to the filter's 1/2-pixel edge) and, away from the box edges, equal
  torchvision's crop-then-resize; vmapped keys give different crops and the batch matches single calls."""
  h, w, size = 40, 48, 16
  # channels: column index, row index (a crop reveals its box), random pixels (compared with resize)
  image = jnp.concatenate([_coord_image(h, w), jax.random.uniform(jax.random.PRNGKey(13), (h, w, 1)) * 255], -1)
  keys = jax.random.split(jax.random.PRNGKey(4), 64)

  @jax.jit
  @jax.vmap
  def crop_and_box(k):
    return augment.random_resized_crop(k, image, size), augment.random_crop_box(k, h, w)

  crops, boxes = crop_and_box(keys)
  crops, boxes = np.asarray(crops), np.stack([np.asarray(b) for b in boxes], -1)
  for i, (crop, (top, left, bh, bw)) in enumerate(zip(crops, boxes)):
    x, y = crop[..., 0], crop[..., 1]
    assert x.min() >= left - 0.5 - 1e-3 and x.max() <= left + bw - 0.5 + 1e-3
    assert y.min() >= top - 0.5 - 1e-3 and y.max() <= top + bh - 0.5 + 1e-3
    assert x.max() - x.min() > 0.5 * bw and y.max() - y.min() > 0.5 * bh  # covers the box, not a corner
    if i < 4:  # the filter reaches outside the box only within 2 output pixels of its edge
      ref = augment.resize(image[top:top + bh, left:left + bw, 2:], size)
      np.testing.assert_allclose(crop[2:-2, 2:-2, 2:], ref[2:-2, 2:-2], atol=1e-3)
  assert len({tuple(b) for b in boxes}) == len(boxes)  # different keys, different crops
  single = jax.jit(functools.partial(augment.random_resized_crop, size=size))(keys[5], image)
  np.testing.assert_allclose(crops[5], single, atol=1e-4)


@pytest.mark.parametrize("size,grid", [(84, 3), (22, 5)])
def test_patch_mix_one_weight_per_patch(size, grid):
  """prob=1: inside each patch, out = w * image + (1 - w) * partner with one w in [0, 1]."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  image = 1 + jax.random.uniform(k1, (size, size, 3))
  partner = -1 - jax.random.uniform(k2, (size, size, 3))  # differs from image everywhere
  mix = jax.jit(jax.vmap(functools.partial(idemenet_pretrain.patch_mix, grid=grid, prob=1.0), in_axes=(0, None, None)))
  outs = mix(jax.random.split(jax.random.PRNGKey(8), 4), image, partner)
  borders = deformation.patch_borders(size, grid)
  for out in np.asarray(outs):
    w = (out - np.asarray(partner)) / np.asarray(image - partner)
    ws = []
    for r in range(grid):
      for c in range(grid):
        cell = w[borders[r]:borders[r + 1], borders[c]:borders[c + 1]]
        assert cell.max() - cell.min() < 1e-5
        ws.append(cell.mean())
    ws = np.asarray(ws)
    assert (ws >= -1e-6).all() and (ws <= 1 + 1e-6).all()
    assert len(np.unique(ws)) == grid * grid  # independent weight per patch


def test_patch_mix_rate():
  """Over 3000 draws: prob=0 returns the image exactly, prob=1 always mixes, prob=2/3 mixes 2/3 +- 0.03."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(9))
  image = 2 + jax.random.uniform(k1, (6, 6, 1))
  partner = jax.random.uniform(k2, (6, 6, 1))  # below image everywhere: any mixed patch changes
  keys = jax.random.split(jax.random.PRNGKey(11), 3000)
  mix = jax.jit(jax.vmap(lambda k, prob: idemenet_pretrain.patch_mix(k, image, partner, prob=prob), in_axes=(0, None)))
  for prob in (0.0, 1.0, 2 / 3):
    outs = np.asarray(mix(keys, prob))
    if prob == 0.0:
      np.testing.assert_array_equal(outs, np.broadcast_to(image, outs.shape))
    else:
      mixed = (outs != np.asarray(image)).any(axis=(1, 2, 3))
      assert abs(mixed.mean() - prob) < 0.03, (prob, mixed.mean())


def test_pretrain_augment_shape_and_affine_commute():
  """Mixing normalised images == normalising mixed raw images (same key: same crops, flips, weights)."""
  k1, k2, key = jax.random.split(jax.random.PRNGKey(12), 3)
  images = jax.random.randint(k1, (6, 20, 20, 3), 0, 256).astype(jnp.uint8)
  partners = jax.random.randint(k2, (6, 20, 20, 3), 0, 256).astype(jnp.uint8)
  # mean / std traced, so both calls share one compilation; mix_prob=1 so every image is mixed
  aug = jax.jit(lambda mean, std: idemenet_pretrain.pretrain_augment(
      key, images, partners, mean=mean, std=std, size=16, mix_prob=1.0))
  out = aug(jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD))
  assert out.shape == (6, 16, 16, 3) and out.dtype == jnp.float32
  raw = aug(jnp.zeros(3), jnp.ones(3))
  expected = (raw - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  np.testing.assert_allclose(out, expected, atol=1e-4)
  assert np.isfinite(np.asarray(out)).all() and abs(float(out.mean())) < 2.0
