"""IDeMe-Net's evaluation figure: probe | gallery | weights | deformed of the first supports.

`figures(config, deform)` is the method's common.Figures: `deform` (the method's own)
runs on the device, `write` draws the PNG on process 0 and reports D's mean patch weight.

Pillow + numpy only (no matplotlib), so a figure can be written from a training
or evaluation loop on a headless host without a plotting stack.

Weight colours: the figure uses one scale across all rows so rows can be
compared. It is piecewise linear and runs blue -> white -> red over
[lo, 0.5, hi], with lo = min(0, w.min()) and hi = max(1, w.max()). White is
pinned at 0.5 (an equal probe/gallery mix): red cells lean on the probe, blue
ones on the gallery. Because D's weights are not clamped, values outside
[0, 1] widen the scale, and the number printed in each patch gives the exact
value. Non-finite weights are drawn grey.
"""

import functools
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fewshot_jax import files
from fewshot_jax import multihost
from fewshot_jax.methods import common
from fewshot_jax.models.deformation import patch_borders

COLUMNS = ("probe", "gallery", "weights", "deformed")
MARGIN = 4        # px between cells and around the figure
LABEL_H = 16      # px of the header row of column labels
TITLE_H = 16      # px of the optional title line
MIN_CELL = 96     # cells are upscaled by an integer factor to at least this many px

LOW = np.array([49, 54, 149], np.float64)    # blue: lo end of the scale (gallery)
MID = np.array([255, 255, 255], np.float64)  # white: 0.5
HIGH = np.array([165, 0, 38], np.float64)    # red: hi end of the scale (probe)
NAN = np.array([128, 128, 128], np.float64)
BACKGROUND = (255, 255, 255)


def upscale_factor(height: int, width: int) -> int:
  """Smallest integer factor making both sides >= MIN_CELL, so 84 px images stay readable."""
  return max(1, -(-MIN_CELL // min(height, width)))


def figure_size(rows: int, height: int, width: int, title: bool = False) -> tuple[int, int]:
  """(width, height) in px of a figure with `rows` rows of height x width images."""
  s = upscale_factor(height, width)
  top = MARGIN + (TITLE_H if title else 0) + LABEL_H
  return (MARGIN + len(COLUMNS) * (width * s + MARGIN), top + rows * (height * s + MARGIN))


def cell_origin(row: int, col: int, height: int, width: int, title: bool = False) -> tuple[int, int]:
  """(x, y) of the top-left pixel of a cell; the layout in one place for the writer and tests."""
  s = upscale_factor(height, width)
  top = MARGIN + (TITLE_H if title else 0) + LABEL_H
  return MARGIN + col * (width * s + MARGIN), top + row * (height * s + MARGIN)


def unnormalise(images, mean, std) -> np.ndarray:
  """(x * std + mean), rounded and clipped to uint8; mean/std per channel in 0..255 units."""
  x = np.asarray(images, np.float64) * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def weight_colours(weights, lo: float, hi: float) -> np.ndarray:
  """[..., 3] uint8 colours of the documented blue-white-red scale (white at 0.5)."""
  w = np.asarray(weights, np.float64)
  below = np.clip((0.5 - w) / max(0.5 - lo, 1e-12), 0.0, 1.0)[..., None]
  above = np.clip((w - 0.5) / max(hi - 0.5, 1e-12), 0.0, 1.0)[..., None]
  rgb = np.where(w[..., None] < 0.5, MID + below * (LOW - MID), MID + above * (HIGH - MID))
  rgb = np.where(np.isfinite(w)[..., None], rgb, NAN)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _text(draw, xy, text, font, anchor="mm", **kwargs) -> None:
  """Text centred ("mm") or left-middle ("lm") on xy, via textbbox so bitmap fonts work too."""
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=kwargs.get("stroke_width", 0))
  x = xy[0] - (x0 + x1) / 2 if anchor == "mm" else xy[0] - x0
  draw.text((round(x), round(xy[1] - (y0 + y1) / 2)), text, font=font, **kwargs)


def _weight_cell(weights, lo, hi, height, width, grid, scale, font) -> Image.Image:
  """One patch-weight heat map at the cell size, with each patch's value written in it."""
  rows = np.asarray(patch_borders(height, grid)) * scale
  cols = np.asarray(patch_borders(width, grid)) * scale
  colours = weight_colours(weights, lo, hi)
  cell = np.empty((height * scale, width * scale, 3), np.uint8)
  for k, w in enumerate(weights):  # row-major patch order, as deformation.weight_map
    r, c = divmod(k, grid)
    cell[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = colours[k]
  img = Image.fromarray(cell)
  draw = ImageDraw.Draw(img)
  for k, w in enumerate(weights):
    r, c = divmod(k, grid)
    cx, cy = (cols[c] + cols[c + 1]) / 2, (rows[r] + rows[r + 1]) / 2
    for fmt in ("{:.2f}", "{:.1f}", "{:.0f}"):  # shorter text when patches are narrow
      text = fmt.format(w)
      x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
      if x1 - x0 <= cols[c + 1] - cols[c] - 2:
        break
    dark = colours[k] @ np.array([0.299, 0.587, 0.114]) < 128  # light text on dark patches
    ink, halo = ((255, 255, 255), (0, 0, 0)) if dark else ((0, 0, 0), (255, 255, 255))
    _text(draw, (cx, cy), text, font, fill=ink, stroke_width=1, stroke_fill=halo)
  return img


def _check(name: str, array: np.ndarray, want: Sequence, what: str) -> None:
  """ValueError naming the argument and both shapes; None in `want` matches any size."""
  if array.ndim != len(want) or any(w is not None and a != w for a, w in zip(array.shape, want)):
    shown = tuple("*" if w is None else w for w in want)
    raise ValueError(f"{name} has shape {array.shape}, expected {shown} ({what})")


def deformation_grid(path, probe, gallery, weights, deformed, *, mean, std, grid: int,
                     max_rows: int = 16, title: str | None = None) -> str:
  """Write a PNG of probe | gallery | weight map | deformed, one row per example.

  probe, gallery, deformed: [R, H, W, 3] normalised images ((x - mean) / std,
  mean and std per channel in 0..255 units). weights: [R, grid*grid] raw patch
  weights in row-major patch order. Only the first max_rows rows are drawn.
  The write is atomic (a unique temporary file, then a rename) so a reader polling the
  file during training never sees a half-written PNG. Returns path.
  """
  probe, gallery, deformed = (np.asarray(a) for a in (probe, gallery, deformed))
  weights = np.asarray(weights)
  if grid < 1:
    raise ValueError(f"grid must be >= 1, got {grid}")
  if max_rows < 1:
    raise ValueError(f"max_rows must be >= 1, got {max_rows}")
  _check("probe", probe, (None, None, None, 3), "R, H, W, 3")
  r, h, w, _ = probe.shape
  if r == 0:
    raise ValueError(f"probe has shape {probe.shape}: no rows to draw")
  if grid > min(h, w):
    raise ValueError(f"grid {grid} is larger than the probe's {h}x{w} images")
  _check("gallery", gallery, probe.shape, f"as probe {probe.shape}")
  _check("deformed", deformed, probe.shape, f"as probe {probe.shape}")
  _check("weights", weights, (r, grid * grid), f"R={r} rows of grid*grid={grid * grid}")
  for name, value in (("mean", mean), ("std", std)):
    if np.asarray(value).shape not in ((), (1,), (3,)):
      raise ValueError(f"{name} has shape {np.asarray(value).shape}, expected () or (3,)")

  n = min(r, max_rows)
  weights = weights[:n].astype(np.float64)
  finite = weights[np.isfinite(weights)]
  lo = min(0.0, float(finite.min())) if finite.size else 0.0
  hi = max(1.0, float(finite.max())) if finite.size else 1.0
  s = upscale_factor(h, w)
  font = ImageFont.load_default()
  images = [unnormalise(a[:n], mean, std) for a in (probe, gallery, deformed)]

  fig = Image.new("RGB", figure_size(n, h, w, title is not None), BACKGROUND)
  draw = ImageDraw.Draw(fig)
  if title is not None:
    _text(draw, (MARGIN, MARGIN + TITLE_H / 2), title, font, anchor="lm", fill=(0, 0, 0))
  label_y = MARGIN + (TITLE_H if title is not None else 0) + LABEL_H / 2
  for c, label in enumerate(COLUMNS):
    x, _ = cell_origin(0, c, h, w, title is not None)
    _text(draw, (x + w * s / 2, label_y), label, font, fill=(0, 0, 0))
  for i in range(n):
    cells = [Image.fromarray(images[0][i]), Image.fromarray(images[1][i]), None,
             Image.fromarray(images[2][i])]
    for c, cell in enumerate(cells):
      if cell is None:
        cell = _weight_cell(weights[i], lo, hi, h, w, grid, s, font)
      else:
        cell = cell.resize((w * s, h * s), Image.Resampling.NEAREST)
      fig.paste(cell, cell_origin(i, c, h, w, title is not None))

  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with files.atomic_path(path) as tmp:
    fig.save(tmp, format="PNG")
  return path


def write(config, data, workdir, split, title, rows: int = 12) -> dict:
  """PNG of (probe, gallery, patch weights, deformed) of the first supports, and the mean patch
  weight of D over all the deformed copies of the episodes (eval.tasks x supports x augnum)."""
  probe, gallery, weights, deformed = data
  take = lambda x: x[:, :, 0].reshape((-1,) + x.shape[3:])[:rows]  # first copy of each support
  path = os.path.join(workdir, f"deformations_{split}.png")
  if multihost.is_main():  # every process computed the figure's episodes; process 0 draws it
    deformation_grid(path, take(probe), take(gallery), take(weights), take(deformed),
                     mean=config.data.mean, std=config.data.std, grid=config.method.grid, max_rows=rows,
                     title=title)
  return {"figure": path, "patch_weight_mean": float(np.mean(weights))}


def figures(config, deform) -> common.Figures:
  """The evaluation figure of IDeMe-Net: deform(params, state, episode, keys) -> (probe, gallery,
  weights, deformed) on the device, `write` on the host."""
  return common.Figures(compute=deform, write=functools.partial(write, config))
