"""Image files: the one listing of a class folder and the one reading of a file.

Training (a builder storing a file) and prediction (api.Model.read_images, --mode=predict) both go
through here, so a model predicts on the very array its builder stored for the same file
(docs/datasets.md, "How a file is read").

Reading (`read`): Pillow decodes the file (a JPEG at a reduced DCT scale when it is at least twice
the stored size: the JPEG decoder's own draft), the EXIF orientation is applied (as a viewer shows
it), then `to_mode`, the one channel rule:
  * 16-bit grey ('I;16*', 'I') -> 8 bits as round(v / 257) (25700 -> 100);
  * palette and any image with transparency (an alpha band, a palette's or a tRNS transparent
    colour) -> composited over opaque BACKGROUND (white: what a viewer shows on a page);
  * CMYK, YCbCr, bilevel, grey, RGB -> Pillow's conversion to the stored mode: 'L' (ITU-R 601 luma)
    for 1 channel, 'RGB' (grey repeated) for 3. Any mode converts: a grey file among colour ones is
    made RGB by the builder and by prediction alike; floating-point pixels (mode 'F'), whose 0..255
    range is unknown, are an error.
Then the whole image (no crop) is resized to the stored size with the record's resampling, only when
its size differs. Errors are one DataError naming the file: `cannot decode <where>: <reason>`.

Listing (`list_classes`): a folder's class subfolders (hidden entries and `__MACOSX` skipped), sorted;
in each, the visible files whose extension is in EXTENSIONS (any case), sorted; every other entry is
skipped and reported. An image beside the class folders, an empty class folder or no class folder at
all is one DataError.
"""

import io
import os

import numpy as np
from PIL import Image, ImageOps

from fewshot_jax.errors import DataError

EXTENSIONS = ('.bmp', '.gif', '.jpe', '.jpeg', '.jfif', '.jpg', '.pbm', '.pgm', '.png', '.pnm', '.ppm',
              '.tga', '.tif', '.tiff', '.webp')
BACKGROUND = (255, 255, 255)  # transparency is composited over opaque white
MODES = {1: 'L', 3: 'RGB'}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_ALPHA = ('RGBA', 'LA', 'RGBa', 'La', 'PA')


# ---------------------------------------------------------------- reading


def to_mode(im: Image.Image, channels: int, where: str) -> Image.Image:
  """A decoded, oriented image as 8-bit grey (channels=1) or RGB (3): the one channel rule."""
  if im.mode in _SIXTEEN_BIT:  # 16-bit grey (and 32-bit 'I', as Pillow opened 16-bit PNGs before 10.0)
    values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    im = Image.fromarray(((values + 128) // 257).astype(np.uint8), 'L')
  elif im.mode == 'F':
    raise DataError(f'{where} holds floating-point pixels, whose 0..255 range is unknown; save it as 8- or '
                    '16-bit')
  if im.mode in _ALPHA or im.mode == 'P' or 'transparency' in im.info:
    rgba = im.convert('RGBA')  # a palette's or tRNS transparent colour becomes alpha
    im = Image.alpha_composite(Image.new('RGBA', rgba.size, BACKGROUND + (255,)), rgba)
  return im.convert(MODES[channels])


def read(source, where: str, size: int | None, channels: int,
         resample=Image.Resampling.BICUBIC) -> np.ndarray:
  """An image (a path, encoded bytes or an opened PIL image) -> uint8 [size, size, channels] (see the module
  docstring); size None keeps the image's own size. One DataError naming `where` if it cannot be read."""
  try:
    if isinstance(source, Image.Image):
      im = to_mode(ImageOps.exif_transpose(source), channels, where)
    else:
      with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as opened:
        if size:
          opened.draft(None, (size, size))  # JPEG: decode a big image at a reduced scale
        opened.load()
        im = to_mode(ImageOps.exif_transpose(opened), channels, where)
    if size and im.size != (size, size):
      im = im.resize((size, size), resample)
  except DataError:
    raise
  except DECODE_ERRORS as e:
    raise DataError(f'cannot decode {where}: {e}') from None
  pixels = np.asarray(im, np.uint8)
  return pixels[..., None] if channels == 1 else pixels


# ---------------------------------------------------------------- listing


def visible(name: str) -> bool:
  """Not a hidden entry (.DS_Store, ._x) nor macOS's archive residue."""
  return not name.startswith('.') and name != '__MACOSX'


def is_image(name: str) -> bool:
  return visible(name) and name.lower().endswith(EXTENSIONS)


def class_images(folder: str, skipped: list, relative_to: str) -> list[str]:
  """Sorted paths of the images of one class folder; other entries are added to `skipped` (relative)."""
  images = []
  for item in sorted(os.scandir(folder), key=lambda e: e.name):
    if item.is_file() and is_image(item.name):
      images.append(item.path)
    else:
      skipped.append(os.path.relpath(item.path, relative_to))
  if not images:
    raise DataError(f'class folder {folder} holds no image (extensions: {" ".join(EXTENSIONS)})')
  return images


def list_classes(folder: str, what: str, expected: str, relative_to: str | None = None,
                 ) -> tuple[list[tuple[str, list[str]]], list[str]]:
  """([(class, sorted image paths)] of the class subfolders of `folder`, skipped entries relative to
  `relative_to` (default `folder`)). `what` names the folder in errors, `expected` the layout."""
  relative_to = relative_to or folder
  classes, skipped, loose = [], [], []
  for entry in sorted(os.scandir(folder), key=lambda e: e.name):
    if entry.is_dir() and visible(entry.name):
      classes.append(entry)
    elif entry.is_file() and is_image(entry.name):
      loose.append(entry.path)
    else:
      skipped.append(os.path.relpath(entry.path, relative_to))
  if loose:
    raise DataError(f'{what} holds image {loose[0]} outside a class folder ({len(loose)} in all); expected '
                    f'{expected}')
  if not classes:
    raise DataError(f'{what} holds no class folder; expected {expected}')
  return [(e.name, class_images(e.path, skipped, relative_to)) for e in classes], skipped
