"""CIFAR-FS and FC100: few-shot class splits of CIFAR-100 as TFDS builders.

* `cifar_fs` (Bertinetto et al. 2019): 64 / 16 / 20 classes, `splits/cifar_fs/*.txt`.
* `fc100` (Oreshkin et al. 2018, TADAM): split by superclass, 12 / 4 / 4 superclasses =
  60 / 20 / 20 classes, `splits/fc100/*.txt`.

Both use all 600 images of a class (the 500 of CIFAR-100's train file, then the 100
of its test file), uint8 [32, 32, 3] RGB. Labels are global in list order (train
classes first, then val, then test); label names are the CIFAR-100 fine names.

Source, the official `cifar-100-python.tar.gz` (pickles `train`, `test`, `meta`):
  1. manual_dir holding `cifar-100-python.tar.gz`, or the extracted
     `cifar-100-python/` folder, or those three files directly;
  2. else downloaded from the CIFAR page by the TFDS download manager.
Each class list line `superclass,class` is checked against the meta file: a name
it lacks, or a class under another superclass, is one DataError naming both files.
"""

import io
import pickle
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fewshot_jax.data import common, image_files, omniglot, sources
from fewshot_jax.errors import DataError

URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
ARCHIVE = 'cifar-100-python.tar.gz'
FOLDER = 'cifar-100-python'
FILES = ('train', 'test', 'meta')
IMAGE_SIZE = 32
IMAGES_PER_CLASS = 600
SPLIT_CLASSES = {'cifar_fs': (64, 16, 20), 'fc100': (60, 20, 20)}
# CIFAR-100's train statistics (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762) x 255, adopted for
# both splits (their train splits are subsets of it) pending a real copy's own (sources.channel_stats).
MEAN, STD = (129.31, 124.06, 112.43), (68.16, 65.38, 70.43)


def _normalise(obj):
  """Python 2 pickles read with encoding='bytes' have bytes keys and names."""
  if isinstance(obj, dict):
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}
  return obj


def _unpickle(data: bytes, where: str, keys: tuple[str, ...]) -> dict:
  try:
    content = _normalise(pickle.load(io.BytesIO(data), encoding='latin1'))
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
    raise DataError(f'cannot read CIFAR-100 file {where}: {type(e).__name__}: {e}') from None
  if not isinstance(content, dict) or any(k not in content for k in keys):
    raise DataError(f'CIFAR-100 file {where} is not the official pickle: expected a dict with keys '
                    f'{", ".join(keys)}')
  return content


def read_cifar100(manual_dir: epath.Path | None, archive: epath.Path | None = None) -> dict[str, dict]:
  """{'train', 'test', 'meta'} dicts of the official pickles, from the tar.gz or an extracted folder."""
  raw, where = {}, {}
  folder = None
  if archive is None and manual_dir is not None:
    if (manual_dir / ARCHIVE).is_file():
      archive = manual_dir / ARCHIVE
    else:
      folder = next((d for d in (manual_dir / FOLDER, manual_dir) if (d / 'meta').is_file()), None)
  if archive is not None:
    try:
      with archive.open('rb') as f, tarfile.open(fileobj=f, mode='r|gz') as tar:
        for member in tar:
          name = member.name.rsplit('/', 1)[-1]
          if member.isfile() and name in FILES:
            raw[name], where[name] = tar.extractfile(member).read(), f'{archive}:{member.name}'
    except (OSError, EOFError, tarfile.TarError) as e:
      raise DataError(f'cannot read CIFAR-100 archive {archive}: {type(e).__name__}: {e}') from None
    missing = [f'{FOLDER}/{n}' for n in FILES if n not in raw]
    if missing:
      raise DataError(f'CIFAR-100 archive {archive} lacks {", ".join(missing)} (truncated or not '
                      f'{ARCHIVE}?)')
  elif folder is not None:
    for name in FILES:
      if not (folder / name).is_file():
        raise DataError(f'CIFAR-100 folder {folder} lacks {name}; expected train, test and meta')
      raw[name], where[name] = (folder / name).read_bytes(), str(folder / name)
  else:
    return None
  meta = _unpickle(raw['meta'], where['meta'], ('fine_label_names', 'coarse_label_names'))
  out = {'meta': meta, 'where': where}
  for name in ('train', 'test'):
    part = _unpickle(raw[name], where[name], ('data', 'fine_labels', 'coarse_labels'))
    data = np.asarray(part['data'])
    fine, coarse = np.asarray(part['fine_labels']), np.asarray(part['coarse_labels'])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE ** 2 \
        or len(fine) != len(data) or len(coarse) != len(data):
      raise DataError(f'CIFAR-100 file {where[name]}: data {data.dtype}{list(data.shape)} with '
                      f'{len(fine)} fine / {len(coarse)} coarse labels; expected uint8 [N, 3072] and N of each')
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)  # channel planes -> HWC
    out[name] = {'images': images, 'fine': fine, 'coarse': coarse}
  return out


def _check_lists(dataset, fine_names, coarse_names, where, coarse_of) -> dict[str, list[int]]:
  """Fine label ids of each split, checked against the meta file's names and the superclasses."""
  ids, seen = {}, {}
  for split, expected in zip(sources.SPLITS, SPLIT_CLASSES[dataset]):
    rows = sources.class_list(dataset, split)
    listed = f'packaged splits/{dataset}/{split}.txt'
    if len(rows) != expected:
      raise DataError(f'{listed} has {len(rows)} classes; expected {expected}')
    ids[split] = []
    for row in rows:
      if len(row) != 2 or row[1] not in fine_names or row[0] not in coarse_names:
        raise DataError(f'{listed}: class {",".join(row)!r} does not match the CIFAR-100 meta file {where} '
                        '(expected superclass,class with names from its coarse_label_names / fine_label_names)')
      fine = fine_names.index(row[1])
      if coarse_of.get(fine, coarse_names.index(row[0])) != coarse_names.index(row[0]):
        raise DataError(f'{listed}: {row[1]} is not in superclass {row[0]} in {where}')
      if fine in seen:
        raise DataError(f'{listed}: class {row[1]} is also in {seen[fine]}; splits must be disjoint')
      seen[fine] = split
      ids[split].append(fine)
  return ids


class _FewshotCifar(sources.ImageBuilder, skip_registration=True):
  """CIFAR-100 few-shot split `DATASET` (set by subclasses)."""

  DATASET = ''
  code_path = epath.Path(__file__)
  HOMEPAGE = 'https://www.cs.toronto.edu/~kriz/cifar.html'
  IMAGE_SIZE = IMAGE_SIZE
  BUILDER_CONFIGS = [sources.ImageConfig(name=f'default-{IMAGE_SIZE}', scheme='default', image_size=IMAGE_SIZE,
                                         description='32x32 RGB')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f'Put {ARCHIVE} (or its extracted {FOLDER}/ folder) in manual_dir, or '
                                  'allow network access to download it.')

  def _label_feature(self):
    return tfds.features.ClassLabel(
        names=[row[1] for split in sources.SPLITS for row in sources.class_list(self.DATASET, split)])

  def _split_generators(self, dl_manager):
    data = read_cifar100(self.manual_dir)
    if data is None:
      data = read_cifar100(None, self._download(dl_manager))
    coarse_of = {}  # fine id -> coarse id, as the train file labels them
    for f, c in zip(data['train']['fine'].tolist(), data['train']['coarse'].tolist()):
      coarse_of.setdefault(f, c)
    meta = data['meta']
    ids = _check_lists(self.DATASET, [str(n) for n in meta['fine_label_names']],
                       [str(n) for n in meta['coarse_label_names']], data['where']['meta'], coarse_of)
    generators, offset = {}, 0
    for split in sources.SPLITS:
      generators[split] = self._generate_examples(self._examples(data, ids[split], offset))
      offset += len(ids[split])
    return generators

  def _download(self, dl_manager) -> epath.Path:
    try:
      omniglot._check_reachable(URL)  # pylint: disable=protected-access
      return epath.Path(dl_manager.download(URL))
    except Exception as e:  # Any network/download failure ends in one clear message.
      where = (f'manual_dir {self.manual_dir} holds neither {ARCHIVE} nor {FOLDER}/' if self.manual_dir
               else 'no manual_dir was given')
      raise DataError(f'{self.DATASET}: {where}, and downloading {URL} failed ({type(e).__name__}: {e}). '
                      'Put the file in a manual_dir or allow network access.') from None

  def _examples(self, data: dict, fine_ids: list[int], offset: int):
    key = 0
    for label, fine in enumerate(fine_ids, start=offset):
      start = key
      for part in ('train', 'test'):
        for image in data[part]['images'][data[part]['fine'] == fine]:
          yield key, {'image': np.ascontiguousarray(image), 'label': label}
          key += 1
      if key == start:
        raise DataError(f'{self.DATASET}: class {data["meta"]["fine_label_names"][fine]} has no images in '
                        f'{data["where"]["train"]} or {data["where"]["test"]}')


class FewshotCifarFS(_FewshotCifar, skip_registration=True):
  """CIFAR-FS (Bertinetto et al.)."""
  name = 'fewshot_cifar_fs'
  DATASET = 'cifar_fs'
  DESCRIPTION = 'CIFAR-FS: the few-shot class split of CIFAR-100 of Bertinetto et al. 2019.'


class FewshotFC100(_FewshotCifar, skip_registration=True):
  """FC100 (Oreshkin et al.)."""
  name = 'fewshot_fc100'
  DATASET = 'fc100'
  DESCRIPTION = 'FC100: CIFAR-100 split by superclass (Oreshkin et al. 2018).'


def _record(builder_class, preset: str) -> common.Dataset:
  return common.Dataset(
      name=builder_class.DATASET, schemes=('default',), folder='cifar100',
      raw_files=builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS, image_size=IMAGE_SIZE, channels=3, mean=MEAN,
      std=STD, preset=preset, base_classes=SPLIT_CLASSES[builder_class.DATASET][0],
      builder=common.fixed_builder(builder_class),
      # The builder stores pickled pixel arrays and decodes no file: a user's file is read the one way
      # (image_files.read, RGB, resized whole to 32x32 bicubic); a 32x32 PNG of a stored image reads back
      # as that image.
      read_image=image_files.read)


CIFAR_FS = _record(FewshotCifarFS, 'cifarfs')
FC100 = _record(FewshotFC100, 'fc100')
