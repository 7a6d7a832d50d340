"""miniImageNet (Ravi & Larochelle split) as a TFDS builder with global class ids.

manual_dir must hold `train.csv`, `val.csv`, `test.csv` (`filename,label`) and the
images, either as an `images/` folder or as `images.tar` with members
`images/<filename>`. The tar is streamed (never extracted): only the compressed
JPEG bytes are held in memory, and decoding runs in a small thread pool (Pillow
releases the GIL while decoding).

Labels: the 64 train classes are 0..63 in order of first appearance in train.csv,
then the 16 val classes, then the 20 test classes, so splits never share a label.
Label names are the WordNet ids. Images are uint8 [84, 84, 3] RGB, read by the record's
`read_image` (data/image_files.py; Lanczos where a file is not 84x84).
"""

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import io
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fewshot_jax.data import common, image_files
from fewshot_jax.errors import DataError

SPLITS = ('train', 'val', 'test')
IMAGE_SIZE = 84
NUM_CLASSES = 64 + 16 + 20


@dataclasses.dataclass(eq=False)
class MiniImagenetConfig(tfds.core.BuilderConfig):
  scheme: str = 'ravi'
  image_size: int = IMAGE_SIZE


def read_split_csv(path: epath.Path) -> list[tuple[str, str]]:
  """(filename, wnid) rows of one split file."""
  if not path.is_file():
    raise DataError(f'miniImageNet split file {path} is missing; manual_dir needs '
                    f'{", ".join(s + ".csv" for s in SPLITS)}')
  rows = list(csv.DictReader(io.StringIO(path.read_text())))
  if not rows or 'filename' not in rows[0] or 'label' not in rows[0]:
    raise DataError(f'{path}: expected a non-empty CSV with header "filename,label"')
  return [(row['filename'], row['label']) for row in rows]


def read_splits(manual_dir: epath.Path) -> dict[str, list[tuple[str, str]]]:
  return {split: read_split_csv(manual_dir / f'{split}.csv') for split in SPLITS}


def class_names(splits: dict[str, list[tuple[str, str]]], where: epath.Path) -> list[str]:
  """Global label order: classes of train, val, test by first appearance."""
  names, owner = [], {}
  for split in SPLITS:
    for _, wnid in splits[split]:
      if wnid not in owner:
        owner[wnid] = split
        names.append(wnid)
      elif owner[wnid] != split:
        raise DataError(f'miniImageNet class {wnid} appears in both {owner[wnid]}.csv and '
                        f'{split}.csv in {where}; splits must have disjoint classes')
  return names


def _read_tar(tar_path: epath.Path, wanted: set[str]) -> dict[str, bytes]:
  """Compressed bytes of the wanted `images/<filename>` members, in one streaming pass."""
  found = {}
  try:
    with tar_path.open('rb') as f, tarfile.open(fileobj=f, mode='r|*') as archive:
      for member in archive:
        name = posixpath.normpath(member.name)
        if member.isfile() and posixpath.dirname(name) == 'images':
          filename = posixpath.basename(name)
          if filename in wanted:
            found[filename] = archive.extractfile(member).read()
  except (OSError, tarfile.TarError, EOFError) as e:
    raise DataError(f'cannot read miniImageNet archive {tar_path}: {e}') from None
  return found


def image_reader(manual_dir: epath.Path, filenames: list[str]) -> tuple[Callable[[str], bytes], Callable[[str], str]]:
  """(read bytes, describe location) for the images of manual_dir; checks all exist first."""
  folder, tar_path = manual_dir / 'images', manual_dir / 'images.tar'
  if folder.is_dir():
    missing = [f for f in filenames if not (folder / f).is_file()]
    if missing:
      raise DataError(f'miniImageNet image {folder / missing[0]} (listed in the split CSVs) is '
                      f'missing ({len(missing)} missing in all)')
    return (lambda f: (folder / f).read_bytes()), (lambda f: str(folder / f))
  if tar_path.is_file():
    data = _read_tar(tar_path, set(filenames))
    missing = [f for f in filenames if f not in data]
    if missing:
      raise DataError(f'miniImageNet image images/{missing[0]} (listed in the split CSVs) is '
                      f'missing from {tar_path} ({len(missing)} missing in all)')
    return data.__getitem__, (lambda f: f'{tar_path}:images/{f}')
  raise DataError(f'miniImageNet manual_dir {manual_dir} has no images: expected an images/ '
                  'folder or images.tar')


def decode_image(data: bytes, where: str, size: int = IMAGE_SIZE) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 [size, size, 3] RGB: the record's reading (Lanczos where resized)."""
  return DATASET.read_image(data, f'miniImageNet image {where}', size, 3)


class FewshotMiniImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """miniImageNet, Ravi & Larochelle split, from a manual_dir (it is not downloadable)."""

  name = 'fewshot_mini_imagenet'
  # TFDS's own code_path probes the optional `importlib_resources` backport.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [MiniImagenetConfig(name=f'ravi-{IMAGE_SIZE}', description='Ravi & Larochelle split')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put train.csv, val.csv, test.csv (Ravi & Larochelle split) and the images '
      '(an images/ folder or images.tar) in manual_dir.')

  def __init__(self, *, manual_dir=None, file_format='array_record', **kwargs):
    # Set before super().__init__, which calls _info (label names come from the CSVs).
    self.manual_dir = epath.Path(manual_dir) if manual_dir else None
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Without the CSVs (e.g. reading an already-prepared dataset) the names are
    # restored from the prepared directory instead.
    if self.manual_dir is not None and all((self.manual_dir / f'{s}.csv').is_file() for s in SPLITS):
      label = tfds.features.ClassLabel(names=class_names(read_splits(self.manual_dir), self.manual_dir))
    else:
      label = tfds.features.ClassLabel(num_classes=NUM_CLASSES)
    return tfds.core.DatasetInfo(
        builder=self,
        description='miniImageNet (Vinyals et al.), Ravi & Larochelle class split.',
        features=tfds.features.FeaturesDict({
            # Raw bytes: JPEG-derived pixels barely compress, and bytes decode fastest.
            'image': tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                          encoding='bytes'),
            'label': label,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/twitter/meta-learning-lstm',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloadable.
    if self.manual_dir is None or not self.manual_dir.is_dir():
      where = f'manual_dir {self.manual_dir} does not exist' if self.manual_dir else 'no manual_dir was given'
      raise DataError(f'miniImageNet cannot be downloaded and {where}; it must be a folder holding '
                      'train.csv, val.csv, test.csv and an images/ folder or images.tar')
    splits = read_splits(self.manual_dir)
    names = class_names(splits, self.manual_dir)
    if len(names) != self.info.features['label'].num_classes:
      raise DataError(f'miniImageNet CSVs in {self.manual_dir} name {len(names)} classes; '
                      f'expected {self.info.features["label"].num_classes}')
    label_of = {wnid: i for i, wnid in enumerate(names)}
    read, where = image_reader(self.manual_dir, [f for rows in splits.values() for f, _ in rows])
    return {
        split: self._generate_examples([(f, label_of[w]) for f, w in rows], read, where)
        for split, rows in splits.items()
    }

  def _generate_examples(self, rows: list[tuple[str, int]], read: Callable[[str], bytes],
                         where: Callable[[str], str]) -> Iterator[tuple[int, dict]]:
    decode = lambda f: decode_image(read(f), where(f))
    for i, ((_, label), image) in enumerate(zip(rows, _ordered_map(decode, [f for f, _ in rows]))):
      yield i, {'image': image, 'label': label}


def _ordered_map(fn: Callable, items: list, window: int = 256) -> Iterator:
  """fn over items in a small thread pool, in order, at most `window` results ahead
  (bounded memory; decoding overlaps TFDS serialization in the calling thread)."""
  pool = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1))
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


DATASET = common.Dataset(
    name='mini_imagenet', schemes=('ravi',), folder='miniimagenet',
    raw_files=FewshotMiniImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS, image_size=IMAGE_SIZE, channels=3,
    # The per-channel statistics of the train split commonly used with this copy.
    mean=(120.39, 115.59, 104.54), std=(70.68, 68.42, 72.50), preset='mini', base_classes=64,
    builder=common.fixed_builder(FewshotMiniImagenet),
    # Every file of the shared copy is an 84x84 RGB JPEG without EXIF orientation: stored as decoded.
    read_image=functools.partial(image_files.read, resample=Image.Resampling.LANCZOS))
