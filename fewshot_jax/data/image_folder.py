"""Your own images as a few-shot dataset: a folder of class subfolders, `<root>/<class>/<image>`.

manual_dir (data.manual_dir) is the root. Two layouts (scheme `auto` tells them apart):
  * split: the root holds exactly `train/`, `val/` and `test/`, each holding class folders. A class
    name may appear in one split only (few-shot splits have disjoint classes).
  * flat: the root holds the class folders. The sorted classes are permuted by data.split_seed and
    cut into train / val / test by data.split_fractions (default 0.64 / 0.16 / 0.20, each split at
    least one class; train takes the rounding remainder).
Either way the class lists of the three splits are written next to the prepared data
(`<data_dir>/fewshot_image_folder/<config>/1.0.0/{train,val,test}_classes.txt`) and logged.

Images: the files directly in a class folder whose extension is in image_files.EXTENSIONS (any
case), in sorted order; other entries (`.DS_Store`, `Thumbs.db`, notes, hidden files, `__MACOSX`,
subfolders) are skipped and counted in one log line (image_files.list_classes: --mode=predict lists a
support folder the same way). A file with an image extension that Pillow cannot read (a corrupt JPEG,
a truncated PNG) is an error naming it. Each image is read by the record's `read_image`,
image_files.read, which prediction reads a user's file with too: EXIF orientation applied, 16-bit grey
scaled to 8 bits as round(v / 257), transparency composited over white, any mode (CMYK, grey,
palette, bilevel) converted to grey ('L', ITU-R 601 luma) for data.channels=1 or RGB for 3, and the
whole image (no crop) resized to data.image_size, bicubic. Stored as uint8 [S, S, C].

Labels are global in the order train, val, test, classes sorted by name within a split.

Statistics: the per-channel mean and std (0..255 units) of the stored train images are computed
while the train split is written and kept in the prepared dataset's metadata (`metadata.json`);
the folder presets leave data.mean / data.std empty, and input_pipeline.with_statistics fills them
from there.

Identity: making the builder lists the folder (no image is opened; a folder that cannot be a dataset
is a DataError here) and hashes every image's path, size and modification time (and, for the flat
layout, the fractions and the seed) into the TFDS config name `<rgb|grey>-<size>-<hash>`: a changed
folder is prepared again, never read from a stale copy. Earlier copies stay in data_dir until deleted.
"""

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from fewshot_jax.data import common, image_files, mini_imagenet, sources
from fewshot_jax.errors import ConfigError, DataError

SCHEME = 'auto'
IMAGE_SIZE = 84
SIZE_RANGE = (8, 512)
# The data.* keys this dataset adds to a config (config.apply_dataset) and its builder reads.
OPTIONS = {'channels': 3, 'split_fractions': (0.64, 0.16, 0.20), 'split_seed': 0}
_EXPECTED = '<root>/<class>/<image> (or <root>/{train,val,test}/<class>/<image>)'
MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Give data.manual_dir = a folder of class subfolders (<root>/<class>/<image>), or one holding train/, val/ '
    'and test/, each of class subfolders (docs/datasets.md, "Your own images").')


# ---------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class Listing:
  """What a folder holds, before any image is opened. classes: split -> [(class, [image paths])]."""
  root: str
  layout: str  # 'split' or 'flat'
  classes: dict
  skipped: tuple[str, ...]  # entries that are not images, relative to root
  digest: str

  def names(self, split: str) -> list[str]:
    return [name for name, _ in self.classes[split]]


def list_folder(root, fractions=OPTIONS['split_fractions'], seed=OPTIONS['split_seed']) -> Listing:
  """The classes of each split of `root` and the hash of its images (path, size, mtime)."""
  root = os.fspath(root)
  if not os.path.exists(root):
    raise DataError(f'image folder {root} (data.manual_dir) does not exist')
  if not os.path.isdir(root):
    raise DataError(f'image folder {root} (data.manual_dir) is not a folder')
  subfolders = {e.name for e in os.scandir(root) if e.is_dir() and image_files.visible(e.name)}
  skipped: list[str] = []
  if subfolders & set(sources.SPLITS):
    if subfolders != set(sources.SPLITS):
      missing = sorted(set(sources.SPLITS) - subfolders)
      extra = sorted(subfolders - set(sources.SPLITS))
      raise DataError(f'image folder {root} mixes split folders and class folders: '
                      + (f'no {", ".join(m + "/" for m in missing)}' if missing else '')
                      + ('; ' if missing and extra else '')
                      + (f'also {", ".join(e + "/" for e in extra[:3])}' if extra else '')
                      + '; expected exactly train/, val/, test/ (each of class folders) or only class folders')
    layout = 'split'
    classes = {}
    for split in sources.SPLITS:
      folder = os.path.join(root, split)
      classes[split], skipped_here = image_files.list_classes(folder, f'split folder {folder}', _EXPECTED, root)
      skipped += skipped_here
    owner = {}
    for split in sources.SPLITS:
      for name, _ in classes[split]:
        if name in owner:
          raise DataError(f'class {name!r} is in both {owner[name]}/ and {split}/ of {root}; '
                          'few-shot splits need disjoint classes')
        owner[name] = split
  else:
    layout = 'flat'
    found, skipped = image_files.list_classes(root, f'image folder {root}', _EXPECTED)
    classes = split_classes(found, fractions, seed, root)
  manifest = hashlib.sha256(f'{layout}\n'.encode())
  if layout == 'flat':
    manifest.update(f'{tuple(float(f) for f in fractions)} {seed}\n'.encode())
  for split in sources.SPLITS:
    for _, images in classes[split]:
      for path in images:
        stat = os.stat(path)
        manifest.update(f'{split}\t{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
  return Listing(root=root, layout=layout, classes=classes, skipped=tuple(skipped),
                 digest=manifest.hexdigest()[:16])


def split_counts(num_classes: int, fractions) -> tuple[int, int, int]:
  """(train, val, test) class counts: val and test rounded (at least 1), train the rest."""
  val, test = (max(1, round(f * num_classes)) for f in fractions[1:])
  return num_classes - val - test, val, test


def split_classes(found: list, fractions, seed: int, root: str) -> dict:
  """The flat layout's seeded class split; each split's classes sorted by name."""
  counts = split_counts(len(found), fractions)
  if counts[0] < 1:
    raise DataError(f'image folder {root} holds {len(found)} class folder(s); a split by class into '
                    f'train / val / test needs at least 3 (data.split_fractions={tuple(fractions)})')
  order = np.random.default_rng(seed).permutation(len(found))
  shuffled = [found[i] for i in order]
  cuts = np.cumsum((0,) + counts)
  return {split: sorted(shuffled[cuts[i]:cuts[i + 1]]) for i, split in enumerate(sources.SPLITS)}


# ---------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """One folder's content (digest) read at one size and channel count."""
  channels: int = 3
  image_size: int = IMAGE_SIZE
  digest: str = ''


_CONFIGS: dict[str, FolderConfig] = {}


def folder_config(channels: int, image_size: int, digest: str) -> FolderConfig:
  """The config of a folder's content; one instance per name (TFDS requires it of the configs it knows)."""
  mode = {1: 'grey', 3: 'rgb'}[channels]
  name = f'{mode}-{image_size}-{digest}'
  if name not in _CONFIGS:
    _CONFIGS[name] = FolderConfig(name=name, channels=channels, image_size=image_size, digest=digest,
                                  description=f'an image folder ({digest}), {mode} {image_size}x{image_size}')
  return _CONFIGS[name]


class FewshotImageFolder(sources.ImageBuilder, skip_registration=True):
  """A folder of class subfolders (data.manual_dir)."""

  name = 'fewshot_image_folder'
  code_path = epath.Path(__file__)
  DESCRIPTION = 'Images from a folder of class subfolders.'
  BUILDER_CONFIGS = [folder_config(3, IMAGE_SIZE, 'unlisted')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  @classmethod
  def get_builder_config(cls, name, version=None):
    """Every config folder_config made is known: no 'custom data configuration' warning per builder."""
    return _CONFIGS.get(name) or super().get_builder_config(name, version)

  def __init__(self, *, channels: int, image_size: int, fractions, seed: int, manual_dir=None, **kwargs):
    # Listed before super().__init__, which calls _info (class names) and needs the config (its name).
    self.fractions, self.seed = tuple(fractions), seed
    self.listing = None
    if manual_dir:
      try:
        self.listing = list_folder(manual_dir, fractions, seed)
      except OSError as e:
        raise DataError(f'cannot list image folder {manual_dir}: {e.strerror or e}') from None
    digest = self.listing.digest if self.listing else 'unlisted'
    super().__init__(config=folder_config(channels, image_size, digest), manual_dir=manual_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    if self.listing:
      label = tfds.features.ClassLabel(names=[n for s in sources.SPLITS for n in self.listing.names(s)])
    else:
      label = tfds.features.ClassLabel(num_classes=1)
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, config.channels), dtype=np.uint8, encoding='bytes'),
            'label': label,
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    if self.listing is None:
      raise DataError(f'the image folder dataset needs data.manual_dir: {MANUAL_DOWNLOAD_INSTRUCTIONS}')
    listing = self.listing
    counts = {split: len(listing.classes[split]) for split in sources.SPLITS}
    for split in sources.SPLITS:  # beside the prepared data (self.data_dir is its temporary folder now)
      (epath.Path(self.data_dir) / f'{split}_classes.txt').write_text(
          ''.join(f'{name}\n' for name in listing.names(split)))
    self.info.metadata.update(root=listing.root, layout=listing.layout, digest=listing.digest,
                              classes={s: listing.names(s) for s in sources.SPLITS}, skipped=len(listing.skipped))
    how = ('from its train/ val/ test/ folders' if listing.layout == 'split' else
           f'by class ({"/".join(f"{f:g}" for f in self.fractions)}, seed {self.seed})')
    logging.info('Image folder %s: %d / %d / %d classes (train / val / test) %s; class lists in %s', listing.root,
                 counts['train'], counts['val'], counts['test'], how,
                 os.path.join(self.data_path.parent.parent, self.builder_config.name, str(self.version)))
    if listing.skipped:
      logging.info('Image folder %s: %d entries that are not images skipped (e.g. %s)', listing.root,
                   len(listing.skipped), ', '.join(listing.skipped[:3]))
    generators, offset = {}, 0
    for split in sources.SPLITS:
      rows = [(path, offset + i) for i, (_, paths) in enumerate(listing.classes[split]) for path in paths]
      generators[split] = self._generate_examples(self._examples(rows, statistics=split == 'train'))
      offset += counts[split]
    return generators

  def _examples(self, rows, statistics: bool):
    config = self.builder_config
    channels = config.channels
    total, total_sq, count = np.zeros(channels, np.int64), np.zeros(channels, np.int64), 0
    images = mini_imagenet._ordered_map(  # pylint: disable=protected-access
        lambda row: DATASET.read_image(row[0], f'image {row[0]}', config.image_size, channels), rows)
    for i, ((_, label), image) in enumerate(zip(rows, images)):
      if statistics:
        pixels = image.reshape(-1, channels).astype(np.int64)
        total, total_sq, count = total + pixels.sum(0), total_sq + (pixels * pixels).sum(0), count + len(pixels)
      yield i, {'image': image, 'label': label}
    if statistics:
      mean = total / count
      std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
      self.info.metadata.update(mean=[float(m) for m in mean], std=[float(s) for s in std], train_images=len(rows))



def _builder(*, scheme, image_size, data_dir, manual_dir, channels=OPTIONS['channels'],
             split_fractions=OPTIONS['split_fractions'], split_seed=OPTIONS['split_seed']):
  """The builder of data.* (options checked first, each as one ConfigError naming the key)."""
  del scheme  # one scheme, checked by Dataset.make_builder
  if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
      SIZE_RANGE[0] <= image_size <= SIZE_RANGE[1]):
    raise ConfigError(f'data.image_size={image_size!r} is invalid for an image folder; expected an integer in '
                      f'[{SIZE_RANGE[0]}, {SIZE_RANGE[1]}]')
  if channels not in image_files.MODES or isinstance(channels, bool):
    raise ConfigError(f'data.channels={channels!r} is invalid; valid: 1 (grey), 3 (RGB)')
  fractions = tuple(split_fractions) if isinstance(split_fractions, (tuple, list)) else ()
  if (len(fractions) != 3 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0
                                     for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6):
    raise ConfigError(f'data.split_fractions={split_fractions!r} is invalid; expected three fractions > 0 '
                      '(train, val, test) summing to 1, e.g. (0.64, 0.16, 0.2)')
  if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
    raise ConfigError(f'data.split_seed={split_seed!r} is invalid; expected an integer >= 0')
  return FewshotImageFolder(channels=channels, image_size=image_size, fractions=fractions, seed=split_seed,
                            manual_dir=manual_dir, data_dir=data_dir)


DATASET = common.Dataset(
    name='image_folder', schemes=(SCHEME,), folder=None, raw_files=MANUAL_DOWNLOAD_INSTRUCTIONS,
    image_size=IMAGE_SIZE, channels=OPTIONS['channels'],
    mean=(), std=(),  # the prepared train split's (input_pipeline.with_statistics)
    preset='folder', base_classes=0,  # known once the folder is listed
    builder=_builder, resizable=True, options=OPTIONS,
    read_image=image_files.read)  # the default, named: prediction reads a user's file exactly so
