"""CUB-200-2011 with the few-shot split of Chen et al. 2019 ("A Closer Look at Few-shot
Classification") as a TFDS builder: 100 / 50 / 50 classes, images resized to 84x84.

The split: the packaged `splits/cub/{train,val,test}.txt` (class folder names). It
is the rule of the authors' write_CUB_filelist.py over the 200 sorted class
folders, index i from 0: base (train) i % 2 == 0, val i % 4 == 1, novel (test)
i % 4 == 3. Like that script, every image of a class is used (CUB's own
train_test_split.txt is ignored): 11,788 images.

manual_dir holds the official `CUB_200_2011.tgz`, or its extracted
`CUB_200_2011/` folder (or that folder's content): `classes.txt`, `images.txt`,
`image_class_labels.txt` and `images/<class>/<file>.jpg`. classes.txt must name
exactly the packaged classes. The tgz is streamed, once for the metadata and
once per split, holding only that split's compressed JPEGs one at a time.

Each image is read by the record's `read_image` (data/image_files.py: orientation, transparency,
channels) and resized whole (no crop) to 84x84, bicubic; labels are global in list
order (train 0..99, val 100..149, test 150..199).
"""

import posixpath
import tarfile

import tensorflow_datasets as tfds
from etils import epath

from fewshot_jax.data import common, mini_imagenet, sources
from fewshot_jax.errors import DataError

IMAGE_SIZE = 84
ARCHIVE = 'CUB_200_2011.tgz'
FOLDER = 'CUB_200_2011'
META_FILES = ('classes.txt', 'images.txt', 'image_class_labels.txt')
SPLIT_CLASSES = {'train': 100, 'val': 50, 'test': 50}


def class_names() -> list[str]:
  return [row[0] for split in sources.SPLITS for row in sources.class_list('cub', split)]


def _parse_pairs(text: str, where: str) -> list[tuple[int, str]]:
  pairs = []
  for n, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      fields = line.split()
      if len(fields) != 2 or not fields[0].isdigit():
        raise DataError(f'{where} line {n}: {line!r} is not "<id> <value>"')
      pairs.append((int(fields[0]), fields[1]))
  return pairs


def read_metadata(texts: dict[str, str], where: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
  """Per split, (relative image path, global label) from CUB's three text files, checked
  against the packaged class lists."""
  classes = dict(_parse_pairs(texts['classes.txt'], where['classes.txt']))
  expected = sorted(class_names())
  if sorted(classes.values()) != expected:
    unknown = sorted(set(classes.values()) - set(expected))[:3]
    raise DataError(f'{where["classes.txt"]} names {len(classes)} classes that do not match the packaged '
                    f'200-class list of the Chen et al. split (e.g. {unknown}; missing '
                    f'{sorted(set(expected) - set(classes.values()))[:3]})')
  images = dict(_parse_pairs(texts['images.txt'], where['images.txt']))
  labels = {i: int(c) for i, c in _parse_pairs(texts['image_class_labels.txt'], where['image_class_labels.txt'])}
  if set(images) != set(labels):
    raise DataError(f'{where["images.txt"]} and {where["image_class_labels.txt"]} list different image ids '
                    f'({len(images)} vs {len(labels)})')
  label_of, split_of = {}, {}
  offset = 0
  for split in sources.SPLITS:
    for i, row in enumerate(sources.class_list('cub', split)):
      label_of[row[0]], split_of[row[0]] = offset + i, split
    offset += len(sources.class_list('cub', split))
  per_split = {split: [] for split in sources.SPLITS}
  for image_id in sorted(images):
    name = classes.get(labels[image_id])
    path = images[image_id]
    if name is None or path.split('/')[0] != name:
      raise DataError(f'{where["image_class_labels.txt"]}: image {image_id} ({path}) has class '
                      f'{labels[image_id]} ({name}), which does not match its folder')
    per_split[split_of[name]].append((path, label_of[name]))
  return per_split


class FewshotCub(sources.ImageBuilder, skip_registration=True):
  """CUB-200-2011, Chen et al. split, from a manual_dir."""

  name = 'fewshot_cub'
  code_path = epath.Path(__file__)
  DESCRIPTION = 'CUB-200-2011 birds, few-shot split of Chen et al. 2019.'
  HOMEPAGE = 'https://www.vision.caltech.edu/datasets/cub_200_2011/'
  IMAGE_SIZE = IMAGE_SIZE
  BUILDER_CONFIGS = [sources.ImageConfig(name=f'chen-{IMAGE_SIZE}', scheme='chen', image_size=IMAGE_SIZE,
                                         description='Chen et al. 2019 class split')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put {ARCHIVE} (or its extracted {FOLDER}/ folder) in manual_dir.'

  def _label_feature(self):
    return tfds.features.ClassLabel(names=class_names())

  def _split_generators(self, dl_manager):
    del dl_manager  # The official host needs a browser; use a manual_dir.
    manual = self.manual_dir
    expected = f'{ARCHIVE} or the extracted {FOLDER}/ folder ({", ".join(META_FILES)} and images/)'
    if manual is None or not manual.is_dir():
      where = f'manual_dir {manual} does not exist' if manual else 'no manual_dir was given'
      raise DataError(f'CUB: {where}; it must hold {expected}')
    folder = next((d for d in (manual / FOLDER, manual) if (d / 'images.txt').is_file()), None)
    if folder is not None:
      texts, where = {}, {}
      for name in META_FILES:
        if not (folder / name).is_file():
          raise DataError(f'CUB file {folder / name} is missing; expected {", ".join(META_FILES)}')
        texts[name], where[name] = (folder / name).read_text(), str(folder / name)
      splits = read_metadata(texts, where)
      return {split: self._generate_examples(self._from_folder(folder, rows)) for split, rows in splits.items()}
    if (manual / ARCHIVE).is_file():
      archive = manual / ARCHIVE
      texts = {name: data.decode('utf-8') for name, data in self._read_tar(archive, set(META_FILES)).items()}
      missing = [n for n in META_FILES if n not in texts]
      if missing:
        raise DataError(f'CUB archive {archive} lacks {FOLDER}/{missing[0]} (truncated or not {ARCHIVE}?)')
      splits = read_metadata(texts, {n: f'{archive}:{FOLDER}/{n}' for n in META_FILES})
      return {split: self._generate_examples(self._from_tar(archive, rows)) for split, rows in splits.items()}
    raise DataError(f'CUB manual_dir {manual} holds neither layout; expected {expected}')

  @staticmethod
  def _read_tar(archive: epath.Path, wanted: set[str]):
    """{relative name: bytes} of wanted members (`<name>` or `images/<path>` below CUB_200_2011/),
    yielded lazily for images and collected for metadata."""
    found = {}
    for name, data in FewshotCub._tar_members(archive, wanted):
      found[name] = data
      if len(found) == len(wanted):
        break
    return found

  @staticmethod
  def _tar_members(archive: epath.Path, wanted: set[str]):
    try:
      with archive.open('rb') as f, tarfile.open(fileobj=f, mode='r|*') as tar:
        for member in tar:
          parts = posixpath.normpath(member.name).split('/')
          name = '/'.join(parts[1:] if parts[0] == FOLDER else parts)
          if member.isfile() and name in wanted:
            yield name, tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as e:
      raise DataError(f'cannot read CUB archive {archive}: {type(e).__name__}: {e}') from None

  def _from_folder(self, folder: epath.Path, rows: list[tuple[str, int]]):
    def decode(row):
      path = folder / 'images' / row[0]
      if not path.is_file():
        raise DataError(f'CUB image {path} (listed in images.txt) is missing')
      return DATASET.read_image(path.read_bytes(), f'image {path}', IMAGE_SIZE, 3)
    for i, ((_, label), image) in enumerate(zip(rows, mini_imagenet._ordered_map(decode, rows))):  # pylint: disable=protected-access
      yield i, {'image': image, 'label': label}

  def _from_tar(self, archive: epath.Path, rows: list[tuple[str, int]]):
    label_of = {f'images/{path}': label for path, label in rows}
    def decode(member):
      name, data = member
      return DATASET.read_image(data, f'image {archive}:{FOLDER}/{name}', IMAGE_SIZE, 3), label_of[name]
    seen = 0
    for i, (image, label) in enumerate(mini_imagenet._ordered_map(  # pylint: disable=protected-access
        decode, self._tar_members(archive, set(label_of)))):
      seen += 1
      yield i, {'image': image, 'label': label}
    if seen != len(rows):
      raise DataError(f'CUB archive {archive} holds {seen} of the {len(rows)} images images.txt lists for '
                      'this split (truncated archive?)')


DATASET = common.Dataset(
    name='cub', schemes=('chen',), folder='cub', raw_files=FewshotCub.MANUAL_DOWNLOAD_INSTRUCTIONS,
    image_size=IMAGE_SIZE, channels=3, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, preset='cub',
    base_classes=SPLIT_CLASSES['train'], builder=common.fixed_builder(FewshotCub))
