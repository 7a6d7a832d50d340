"""A tiny Omniglot-like few-shot dataset generated from a seed: no files needed.

Each class is a random glyph of 2-4 strokes (straight lines or quadratic Bezier
curves through random control points on a 28x28 canvas). Each example redraws the
class glyph with jitter: Gaussian noise on the control points, a small random
affine (rotation, scale, shift) and a random stroke width of 1-3 px. Strokes are
drawn at 4x resolution and downsampled for antialiasing; ink = 255 on 0.

The jitter is tuned so the data is a genuine few-shot problem: nearest neighbour on
raw pixels scores about 60% on 5-way 1-shot test episodes (chance 20%), so
tests and smoke benchmarks can tell learning from chance and from saturation.

Splits: train 200, val 50, test 100 classes, 20 images each; labels are global
(train 0..199, val 200..249, test 250..349). Everything derives from the config
seed, with one independent random stream per class and per example, so the data
is identical across runs and platforms.
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw

from fewshot_jax.data import common, image_files

SPLIT_CLASSES = {'train': 200, 'val': 50, 'test': 100}
IMAGES_PER_CLASS = 20
IMAGE_SIZE = 28
_SUPERSAMPLE = 4
_CURVE_POINTS = 16
# Jitter, tuned for ~60% 5-way 1-shot nearest-neighbour accuracy on raw pixels.
_POINT_NOISE = 1.0  # px (at 28x28), std of control-point noise
_MAX_ROTATION = np.deg2rad(10.0)
_MAX_SCALE = 0.10  # scale in [1 - s, 1 + s]
_MAX_SHIFT = 1.5  # px


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  scheme: str = 'default'
  image_size: int = IMAGE_SIZE
  seed: int = 0


def synthetic_config(seed: int = 0) -> SyntheticConfig:
  """Config for a seed; returns the predefined instance for seed 0 (TFDS requires it)."""
  for config in FewshotSynthetic.BUILDER_CONFIGS:
    if config.seed == seed:
      return config
  return _make_config(seed)


def _make_config(seed: int) -> SyntheticConfig:
  return SyntheticConfig(name=f'default-{IMAGE_SIZE}-seed{seed}', seed=seed,
                         description=f'random stroke glyphs, seed {seed}')


def random_glyph(rng: np.random.Generator) -> list[np.ndarray]:
  """Control points [2 or 3, 2] of each stroke: a line or a quadratic curve."""
  strokes = []
  for _ in range(rng.integers(2, 5)):
    num_points = rng.choice([2, 3])
    strokes.append(rng.uniform(5.0, IMAGE_SIZE - 5.0, size=(num_points, 2)))
  return strokes


def _stroke_path(points: np.ndarray) -> np.ndarray:
  """Polyline [K, 2] through the stroke: the segment, or the quadratic Bezier curve."""
  if len(points) == 2:
    return points
  t = np.linspace(0.0, 1.0, _CURVE_POINTS)[:, None]
  return (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t ** 2 * points[2]


def draw_glyph(strokes: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
  """One jittered rendering of a glyph: uint8 [28, 28], ink 255 on 0."""
  angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
  scale = rng.uniform(1 - _MAX_SCALE, 1 + _MAX_SCALE)
  rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  center = np.full(2, IMAGE_SIZE / 2)
  shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2)
  width = int(rng.integers(1, 4))
  big = IMAGE_SIZE * _SUPERSAMPLE
  canvas = Image.new('L', (big, big), 0)
  pen = ImageDraw.Draw(canvas)
  for points in strokes:
    noisy = points + rng.normal(0.0, _POINT_NOISE, size=points.shape)
    path = (_stroke_path(noisy) - center) @ rotation.T + center + shift
    pen.line([tuple(p) for p in path * _SUPERSAMPLE], fill=255, width=width * _SUPERSAMPLE,
             joint='curve')
  small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
  return np.asarray(small)


def class_images(seed: int, label: int) -> np.ndarray:
  """uint8 [20, 28, 28] images of one global class; independent of other classes."""
  strokes = random_glyph(np.random.default_rng([seed, label]))
  return np.stack([draw_glyph(strokes, np.random.default_rng([seed, label, 1 + i]))
                   for i in range(IMAGES_PER_CLASS)])


class FewshotSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Seeded random stroke glyphs: a fast, file-free few-shot dataset for tests."""

  name = 'fewshot_synthetic'
  # TFDS's own code_path probes the optional `importlib_resources` backport.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [_make_config(0)]

  def __init__(self, *, file_format='array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    num_classes = sum(SPLIT_CLASSES.values())
    return tfds.core.DatasetInfo(
        builder=self,
        description='Random stroke glyphs (Omniglot-like), generated from a seed.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8,
                                          encoding='bytes'),
            'label': tfds.features.ClassLabel(names=[f'glyph{i:03d}' for i in range(num_classes)]),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    generators, offset = {}, 0
    for split, count in SPLIT_CLASSES.items():
      generators[split] = self._generate_examples(range(offset, offset + count))
      offset += count
    return generators

  def _generate_examples(self, labels: range):
    seed = self.builder_config.seed
    for label in labels:
      for i, image in enumerate(class_images(seed, label)):
        yield label * IMAGES_PER_CLASS + i, {'image': image[:, :, None], 'label': label}


def _builder(*, scheme, image_size, data_dir, manual_dir):
  del scheme, image_size, manual_dir  # one scheme at one size (checked by Dataset.make_builder); no files
  return FewshotSynthetic(config=synthetic_config(), data_dir=data_dir)


DATASET = common.Dataset(
    name='synthetic', schemes=('default',), folder=None, raw_files='', image_size=IMAGE_SIZE, channels=1,
    mean=common.GREY_MEAN, std=common.GREY_STD, preset='synthetic', base_classes=SPLIT_CLASSES['train'],
    builder=_builder,
    # Generated, no file is read: a user's file (predicted with a synthetic model) is read the one way
    # (image_files.read), grey, ink bright as stored, resized as draw_glyph downsamples its 4x canvas.
    read_image=functools.partial(image_files.read, resample=Image.Resampling.BOX))
