"""deformation_grid writes a readable PNG whose cells show the real inputs."""

import glob
import os

import numpy as np
import pytest
from PIL import Image

from fewshot_jax.methods import idemenet_figures as figures
from fewshot_jax.models.deformation import patch_borders

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
R, H, W, G = 3, 84, 84, 3


def _inputs(seed=0):
  """Normalised images built from known uint8 pixels, so un-normalising is exact after rounding."""
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (3, R, H, W, 3)).astype(np.float32)
  probe, gallery, deformed = (raw - np.float32(MEAN)) / np.float32(STD)
  weights = rng.uniform(-0.3, 1.3, (R, G * G)).astype(np.float32)
  return probe, gallery, weights, deformed, raw[0].astype(np.uint8)


def _grid(tmp_path, probe, gallery, weights, deformed, **kwargs):
  path = os.path.join(tmp_path, "sub", "grid.png")
  return figures.deformation_grid(path, probe, gallery, weights, deformed, mean=MEAN, std=STD,
                                  grid=G, **kwargs)


@pytest.mark.parametrize("title", [None, "epoch 3"])
def test_png_size_and_probe_pixels(tmp_path, title):
  probe, gallery, weights, deformed, raw_probe = _inputs()
  path = _grid(tmp_path, probe, gallery, weights, deformed, title=title)
  assert os.path.exists(path) and not glob.glob(os.path.join(os.path.dirname(path), ".*.tmp"))
  with Image.open(path) as img:
    assert img.format == "PNG"
    fig = np.asarray(img.convert("RGB"))
  s = figures.upscale_factor(H, W)
  assert s == 2  # 84 px -> 168 px cells (>= 96)
  assert (fig.shape[1], fig.shape[0]) == figures.figure_size(R, H, W, title is not None)
  for row in range(R):
    x, y = figures.cell_origin(row, 0, H, W, title is not None)
    for i, j in [(10, 20), (41, 41), (70, 5)]:  # well inside the cell, nearest upscaling
      np.testing.assert_array_equal(fig[y + i * s + 1, x + j * s + 1], raw_probe[row, i, j])


def test_max_rows_truncates(tmp_path):
  probe, gallery, weights, deformed, _ = _inputs()
  path = _grid(tmp_path, probe, gallery, weights, deformed, max_rows=2)
  with Image.open(path) as img:
    assert img.size == figures.figure_size(2, H, W)


def test_weight_map_colours(tmp_path):
  probe, gallery, _, deformed, _ = _inputs()
  weights = np.zeros((R, G * G), np.float32)
  weights[:, 0] = 1.0
  path = _grid(tmp_path, probe, gallery, weights, deformed)
  fig = np.asarray(Image.open(path).convert("RGB"))
  s = figures.upscale_factor(H, W)
  x, y = figures.cell_origin(0, 2, H, W)
  b = patch_borders(W, G)
  first = fig[y + 2, x + 2]                  # patch 0 corner, away from its printed value
  second = fig[y + 2, x + b[1] * s + 2]      # patch 1 (row-major: same row, next column)
  np.testing.assert_array_equal(first, figures.HIGH.astype(np.uint8))
  np.testing.assert_array_equal(second, figures.LOW.astype(np.uint8))
  assert first[0] > first[2] and second[2] > second[0]  # red vs blue


def test_weight_colour_scale():
  c = figures.weight_colours(np.array([-1.0, 0.5, 2.0, np.nan]), lo=-1.0, hi=2.0)
  np.testing.assert_array_equal(c, [figures.LOW, figures.MID, figures.HIGH, figures.NAN])


@pytest.mark.parametrize("name", ["gallery", "deformed", "weights"])
def test_mismatched_inputs_raise(tmp_path, name):
  args = dict(zip(["probe", "gallery", "weights", "deformed"], _inputs()[:4]))
  args[name] = args[name][:2]  # wrong R
  with pytest.raises(ValueError, match=name):
    _grid(tmp_path, **args)


def test_wrong_weights_width_raises(tmp_path):
  probe, gallery, weights, deformed, _ = _inputs()
  with pytest.raises(ValueError, match=r"weights has shape \(3, 4\)"):
    _grid(tmp_path, probe, gallery, weights[:, :4], deformed)
  with pytest.raises(ValueError, match="probe"):
    _grid(tmp_path, probe[..., :2], gallery, weights, deformed)
