"""tieredImageNet (Ren et al. 2018) as a TFDS builder: 608 classes, 351 / 97 / 160, 84x84x3.

The split is by category (34 ILSVRC-12 high-level categories, 20 / 6 / 8): the
packaged `splits/tiered_imagenet/{train,val,test}.csv` (`wnid,category wnid`).

manual_dir holds one of:
  1. The widely used distribution of the authors: `{train,val,test}_images_png.pkl`
     (a pickled list of PNG-encoded 84x84 images, each a uint8 array as
     cv2.imencode returns it) + `{split}_labels.pkl` (a dict with
     `label_specific`, `label_general`, `label_specific_str`,
     `label_general_str`). The image pickle is read as a stream
     (`sources.iter_pickled_list`): at most one pickled batch of 1,000 PNGs and a
     window of decoded images are held, never the split.
  2. An ImageNet-style folder `train/<wnid>/*.JPEG` (the ILSVRC-12 train set)
     holding the 608 class folders of the lists: each image is resized, whole,
     to 84x84 (bicubic; Ren et al. resize with cv2 INTER_CUBIC, no crop).
Every image, either way, is read by the record's `read_image` (data/image_files.py).
The `{split}_images.npz` files some copies hold (the authors' code decompresses
the pickles into them, in OpenCV's BGR order) are not read: an error says so.

Labels are global: train 0..350, val 351..447, test 448..607. From the pickles a
label is the split offset + `label_specific`; from a folder, the split offset +
the class's row in the packaged list. Preparation streams both sources and
writes through `sources.StreamingWriteMixin`, so host memory does not grow
with the dataset (benchmarks/prepare_tiered.py measures it).
"""

import os
import pickle
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fewshot_jax.data import common, mini_imagenet, sources
from fewshot_jax.errors import DataError

IMAGE_SIZE = 84
SPLIT_CLASSES = {'train': 351, 'val': 97, 'test': 160}
SPLIT_CATEGORIES = {'train': 20, 'val': 6, 'test': 8}
NUM_CLASSES = sum(SPLIT_CLASSES.values())
LABEL_KEYS = ('label_specific', 'label_general', 'label_specific_str', 'label_general_str')
_WNID = re.compile(r'^n\d{8}$')
_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def class_lists() -> dict[str, list[tuple[str, str]]]:
  """(class wnid, category wnid) rows of each split, checked for counts and disjointness."""
  lists, owner = {}, {}
  for split in sources.SPLITS:
    rows = [tuple(row) for row in sources.class_list('tiered_imagenet', split)]
    where = f'packaged splits/tiered_imagenet/{split}.csv'
    bad = [r for r in rows if len(r) != 2 or not all(_WNID.match(v) for v in r)]
    if bad or len(rows) != SPLIT_CLASSES[split] or len({c for _, c in rows}) != SPLIT_CATEGORIES[split]:
      raise DataError(f'{where}: expected {SPLIT_CLASSES[split]} rows "class wnid,category wnid" in '
                      f'{SPLIT_CATEGORIES[split]} categories')
    for wnid, _ in rows:
      if wnid in owner:
        raise DataError(f'{where}: {wnid} is also in {owner[wnid]}; splits must be disjoint')
      owner[wnid] = split
    lists[split] = rows
  return lists


def pickle_paths(manual_dir: epath.Path, split: str) -> tuple[epath.Path, epath.Path]:
  return manual_dir / f'{split}_images_png.pkl', manual_dir / f'{split}_labels.pkl'


def read_labels(path: epath.Path, split: str) -> tuple[np.ndarray, list[str]]:
  """(label_specific [N], label_specific_str) of one `{split}_labels.pkl`, checked against the lists."""
  try:
    with open(path, 'rb') as f:
      content = pickle.load(f, encoding='latin1')
  except FileNotFoundError:
    raise DataError(f'tieredImageNet labels {path} is missing; the pickle distribution needs '
                    f'{split}_images_png.pkl and {split}_labels.pkl for train, val and test') from None
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
    raise DataError(f'cannot read tieredImageNet labels {path}: {type(e).__name__}: {e}') from None
  if isinstance(content, dict):
    content = {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in content.items()}
  if not isinstance(content, dict) or any(k not in content for k in LABEL_KEYS):
    raise DataError(f'tieredImageNet labels {path}: expected a dict with keys {", ".join(LABEL_KEYS)}')
  specific = np.asarray(content['label_specific']).astype(np.int64)
  names = [n.decode('latin1') if isinstance(n, bytes) else str(n) for n in content['label_specific_str']]
  classes, categories = len(np.unique(specific)), len(content['label_general_str'])
  expected = SPLIT_CLASSES[split]
  if specific.ndim != 1 or classes != expected or len(names) != expected or \
      specific.min(initial=0) < 0 or specific.max(initial=0) >= expected or categories != SPLIT_CATEGORIES[split]:
    raise DataError(f'tieredImageNet labels {path} hold {classes} classes ({len(names)} names) in {categories} '
                    f'categories; the {split} class list has {expected} classes in {SPLIT_CATEGORIES[split]}')
  listed = {w for w, _ in class_lists()[split]}
  if all(_WNID.match(n) for n in names) and set(names) != listed:
    raise DataError(f'tieredImageNet labels {path}: label_specific_str does not match the packaged '
                    f'{split} class list ({len(set(names) - listed)} wnids not in it)')
  return specific, names


class FewshotTieredImagenet(sources.ImageBuilder, skip_registration=True):
  """tieredImageNet from the authors' pickles or an ImageNet-style folder (not downloadable)."""

  name = 'fewshot_tiered_imagenet'
  code_path = epath.Path(__file__)
  DESCRIPTION = 'tieredImageNet (Ren et al. 2018), split by category.'
  HOMEPAGE = 'https://github.com/renmengye/few-shot-ssl-public'
  IMAGE_SIZE = IMAGE_SIZE
  BUILDER_CONFIGS = [sources.ImageConfig(name=f'ren-{IMAGE_SIZE}', scheme='ren', image_size=IMAGE_SIZE,
                                         description='Ren et al. category split')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put {train,val,test}_images_png.pkl and {train,val,test}_labels.pkl (the authors\' distribution), '
      'or the ILSVRC-12 train folder as train/<wnid>/*.JPEG, in manual_dir.')

  def _label_feature(self):
    return tfds.features.ClassLabel(num_classes=NUM_CLASSES)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloadable.
    manual = self.manual_dir
    expected = ('{train,val,test}_images_png.pkl + {train,val,test}_labels.pkl, or an ImageNet-style '
                'train/<wnid>/ folder')
    if manual is None or not manual.is_dir():
      where = f'manual_dir {manual} does not exist' if manual else 'no manual_dir was given'
      raise DataError(f'tieredImageNet cannot be downloaded and {where}; it must hold {expected}')
    lists = class_lists()
    offsets = dict(zip(sources.SPLITS, np.cumsum([0] + [SPLIT_CLASSES[s] for s in sources.SPLITS])))
    if any(p.exists() for s in sources.SPLITS for p in pickle_paths(manual, s)):
      for split in sources.SPLITS:
        for path in pickle_paths(manual, split):
          if not path.is_file():
            raise DataError(f'tieredImageNet file {path} is missing; the pickle distribution needs '
                            f'{split}_images_png.pkl and {split}_labels.pkl for train, val and test')
      labels = {split: read_labels(pickle_paths(manual, split)[1], split)[0] for split in sources.SPLITS}
      return {split: self._generate_examples(
                  self._from_pickle(pickle_paths(manual, split)[0], labels[split], int(offsets[split])))
              for split in sources.SPLITS}
    if (manual / 'train').is_dir():
      files = {split: self._list_folder(manual / 'train', lists[split]) for split in sources.SPLITS}
      return {split: self._generate_examples(self._from_folder(files[split], int(offsets[split])))
              for split in sources.SPLITS}
    if any((manual / f'{split}_images.npz').exists() for split in sources.SPLITS):
      raise DataError(f'tieredImageNet manual_dir {manual} holds {{split}}_images.npz, the decompressed cache '
                      f"of the authors' code (BGR, not read here); expected {expected}")
    raise DataError(f'tieredImageNet manual_dir {manual} holds neither layout; expected {expected}')

  def _from_pickle(self, path: epath.Path, specific: np.ndarray, offset: int):
    def decode(indexed):
      i, item = indexed
      where = f'image {i} of {path}'
      return DATASET.read_image(sources.as_bytes(item, where), where, IMAGE_SIZE, 3)
    count = 0
    for count, image in enumerate(mini_imagenet._ordered_map(  # pylint: disable=protected-access
        decode, enumerate(sources.iter_pickled_list(path, 'tieredImageNet images'))), start=1):
      if count > len(specific):
        break
      yield count - 1, {'image': image, 'label': offset + int(specific[count - 1])}
    if count != len(specific):
      raise DataError(f'tieredImageNet images {path} hold {"more than " if count > len(specific) else ""}'
                      f'{count} images but its labels file has {len(specific)} (truncated or mismatched files?)')

  def _list_folder(self, root: epath.Path, rows: list[tuple[str, str]]) -> list[tuple[str, int]]:
    files = []
    for row, (wnid, _) in enumerate(rows):
      folder = root / wnid
      if not folder.is_dir():
        raise DataError(f'tieredImageNet class folder {folder} (from the packaged class list) is missing')
      names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_EXTENSIONS))
      if not names:
        raise DataError(f'tieredImageNet class folder {folder} holds no images')
      files.extend((os.path.join(folder, n), row) for n in names)
    return files

  def _from_folder(self, files: list[tuple[str, int]], offset: int):
    def decode(item):
      with open(item[0], 'rb') as f:
        return DATASET.read_image(f.read(), f'image {item[0]}', IMAGE_SIZE, 3)
    for i, ((_, row), image) in enumerate(zip(files, mini_imagenet._ordered_map(decode, files))):  # pylint: disable=protected-access
      yield i, {'image': image, 'label': offset + row}


DATASET = common.Dataset(
    name='tiered_imagenet', schemes=('ren',), folder='tieredimagenet',
    raw_files=FewshotTieredImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS, image_size=IMAGE_SIZE, channels=3,
    mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, preset='tiered', base_classes=SPLIT_CLASSES['train'],
    builder=common.fixed_builder(FewshotTieredImagenet),
    placement='sharded')  # the train split (~9.5 GB): 1/D of it on each of D devices
