"""Omniglot as a TFDS builder with few-shot class splits and global class ids.

Schemes:
  * `vinyals`: the standard split of Vinyals et al. / Snell et al. — exactly the
    class lists `splits/vinyals/{train,val,test}.txt` (4112 / 688 / 1692 classes);
    each line `Alphabet/characterNN/rotDDD` is one class, the character's 20
    images resized and then rotated counterclockwise by DDD degrees.
  * `lake`: the alphabet split of Lake et al. — background alphabets are train,
    evaluation alphabets are test, no rotations. Validation is carved out of the
    background set: the LAST 5 background alphabets in `alphabets.csv` order
    (N_Ko, Ojibwe_(Canadian_Aboriginal_Syllabics), Sanskrit, Tagalog, Tifinagh)
    are `val`, so train has 25 alphabets and val has 5. A fixed, documented
    carve-out keeps val results comparable across runs.

Labels are global over a config (train classes first, then val, then test) so the
three splits never share a label. Images are uint8 [S, S, 1] with ink = 255 and
paper = 0, resized from 105x105 with Lanczos antialiasing. A scan file (the zips' PNGs, or a user's
image at prediction) is read by the record's `read_image`, read_scan: image_files.read to grey
(orientation, transparency over white paper, 16-bit), ink where grey < 128, then that resize.

Sources, tried in order:
  1. manual_dir with `images_background.npz` + `images_evaluation.npz` (the
     format of the shared data folder) or the official `images_background.zip` +
     `images_evaluation.zip`. `alphabets.csv` and `splits/vinyals/*.txt` are read
     from manual_dir when present there, else from the copies shipped in
     `fewshot_jax/data/omniglot_meta/`.
  2. The official zips downloaded from GitHub (only when manual_dir holds none of
     the image files).
"""

import csv
import dataclasses
import importlib.resources
import io
import re
import socket
import urllib.parse
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fewshot_jax.data import common, image_files
from fewshot_jax.errors import ConfigError, DataError

SCHEMES = ('vinyals', 'lake')
SETS = ('background', 'evaluation')
SPLITS = ('train', 'val', 'test')
NUM_DRAWERS = 20
ORIGINAL_SIZE = 105
LAKE_VAL_ALPHABETS = 5
URLS = {
    s: f'https://github.com/brendenlake/omniglot/raw/master/python/images_{s}.zip'
    for s in SETS
}
_ROTATIONS = (0, 90, 180, 270)
_VINYALS_LINE = re.compile(r'^([^/]+)/character(\d+)/rot(\d{3})$')
_ZIP_MEMBER = re.compile(r'(?:^|/)([^/]+)/character(\d+)/(\d+)_(\d+)\.png$')

# (alphabet, character number within the alphabet, 1-based) -> ink images.
CharKey = tuple[str, int]


@dataclasses.dataclass(eq=False)
class OmniglotConfig(tfds.core.BuilderConfig):
  """One split scheme at one image size; the name keys the on-disk cache."""
  scheme: str = 'vinyals'
  image_size: int = 28


@dataclasses.dataclass(frozen=True)
class Alphabet:
  set_name: str  # 'background' or 'evaluation'
  name: str
  first_id: int  # official character number (1..1623) of character01
  last_id: int

  @property
  def num_characters(self) -> int:
    return self.last_id - self.first_id + 1


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  name: str
  alphabet: str
  character: int
  rotation: int  # degrees counterclockwise


def _make_config(scheme: str, image_size: int) -> OmniglotConfig:
  return OmniglotConfig(
      name=f'{scheme}-{image_size}', scheme=scheme, image_size=image_size,
      description=f'{scheme} split, {image_size}x{image_size} images')


def omniglot_config(scheme: str = 'vinyals', image_size: int = 28) -> OmniglotConfig:
  """Validated config; returns the predefined instance when one matches (TFDS requires it)."""
  if scheme not in SCHEMES:
    raise ConfigError(f'omniglot scheme {scheme!r} is invalid; valid schemes: {", ".join(SCHEMES)}')
  if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= ORIGINAL_SIZE:
    raise ConfigError(
        f'omniglot image_size {image_size!r} is invalid; expected an int in [8, {ORIGINAL_SIZE}]')
  for config in FewshotOmniglot.BUILDER_CONFIGS:
    if config.scheme == scheme and config.image_size == image_size:
      return config
  return _make_config(scheme, image_size)


# ---------------------------------------------------------------- metadata


def _meta_text(manual_dir: epath.Path | None, relpath: str) -> tuple[str, str]:
  """Text of a metadata file: manual_dir's copy if present, else the packaged one."""
  if manual_dir is not None:
    path = manual_dir / relpath
    if path.is_file():
      return path.read_text(), str(path)
  resource = importlib.resources.files(__package__).joinpath('omniglot_meta', *relpath.split('/'))
  return resource.read_text(), f'packaged {relpath}'


def read_alphabets(manual_dir: epath.Path | None) -> list[Alphabet]:
  text, where = _meta_text(manual_dir, 'alphabets.csv')
  rows = list(csv.DictReader(io.StringIO(text)))
  fields = ('split', 'alphabet', 'first_character_id', 'last_character_id')
  if not rows or any(f not in rows[0] for f in fields):
    raise DataError(f'{where}: expected a CSV with columns {",".join(fields)}')
  alphabets = []
  for i, row in enumerate(rows, start=2):
    try:
      alphabet = Alphabet(row['split'], row['alphabet'], int(row['first_character_id']),
                          int(row['last_character_id']))
    except (TypeError, ValueError):
      raise DataError(f'{where} line {i}: cannot parse {row!r}; expected integer ids') from None
    if alphabet.set_name not in SETS or alphabet.num_characters < 1:
      raise DataError(f'{where} line {i}: invalid row {row!r}; expected split in {SETS} and '
                      'first_character_id <= last_character_id')
    alphabets.append(alphabet)
  return alphabets


def class_specs(scheme: str, manual_dir: epath.Path | None) -> dict[str, list[ClassSpec]]:
  """Ordered classes of each split; the concatenation train+val+test gives the global labels."""
  alphabets = read_alphabets(manual_dir)
  if scheme == 'lake':
    return _lake_classes(alphabets)
  by_name = {a.name: a for a in alphabets}
  specs = {}
  for split in SPLITS:
    relpath = f'splits/vinyals/{split}.txt'
    text, where = _meta_text(manual_dir, relpath)
    specs[split] = [_parse_vinyals_line(line, f'{where} line {i}', by_name)
                    for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
  return specs


def _parse_vinyals_line(line: str, where: str, by_name: dict[str, Alphabet]) -> ClassSpec:
  match = _VINYALS_LINE.match(line.strip())
  if not match:
    raise DataError(f'{where}: {line!r} is not of the form Alphabet/characterNN/rotDDD')
  alphabet, character, rotation = match[1], int(match[2]), int(match[3])
  if rotation not in _ROTATIONS:
    raise DataError(f'{where}: rotation {rotation} in {line!r} is invalid; valid: {_ROTATIONS}')
  if alphabet not in by_name:
    raise DataError(f'{where}: alphabet {alphabet!r} is not in alphabets.csv')
  if not 1 <= character <= by_name[alphabet].num_characters:
    raise DataError(f'{where}: {line!r} names character {character} but {alphabet} has '
                    f'{by_name[alphabet].num_characters} characters')
  return ClassSpec(line.strip(), alphabet, character, rotation)


def _lake_classes(alphabets: list[Alphabet]) -> dict[str, list[ClassSpec]]:
  background = [a for a in alphabets if a.set_name == 'background']
  evaluation = [a for a in alphabets if a.set_name == 'evaluation']
  groups = {
      'train': background[:-LAKE_VAL_ALPHABETS],
      'val': background[-LAKE_VAL_ALPHABETS:],
      'test': evaluation,
  }
  return {
      split: [ClassSpec(f'{a.name}/character{c:02d}', a.name, c, 0)
              for a in group for c in range(1, a.num_characters + 1)]
      for split, group in groups.items()
  }


# ---------------------------------------------------------------- image sources


def read_npz(path: epath.Path, set_name: str, alphabets: list[Alphabet]) -> dict[CharKey, np.ndarray]:
  """Ink masks bool [20, 105, 105] per character from the shared-data npz (True = paper there)."""
  try:
    with path.open('rb') as f, np.load(f) as data:
      images, labels = data['images'], data['labels']
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'cannot read Omniglot npz {path}: {e}; expected arrays "images" '
                    f'[N, {NUM_DRAWERS}, 105, 105] bool and "labels" [N, {NUM_DRAWERS}] int') from None
  shape = (NUM_DRAWERS, ORIGINAL_SIZE, ORIGINAL_SIZE)
  if images.ndim != 4 or images.shape[1:] != shape or labels.shape != images.shape[:2] \
      or not np.all(labels == labels[:, :1]):
    raise DataError(f'{path}: images {images.shape} / labels {labels.shape} do not match the expected '
                    f'[N, {", ".join(map(str, shape))}] / [N, {NUM_DRAWERS}] with one label per row')
  members = [a for a in alphabets if a.set_name == set_name]
  offset = min(a.first_id for a in members)  # labels count from the set's first character
  chars = {}
  for row, label in enumerate(labels[:, 0]):
    number = int(label) + offset
    owner = next((a for a in members if a.first_id <= number <= a.last_id), None)
    if owner is None:
      raise DataError(f'{path}: character number {number} (row {row}) is not in any {set_name} '
                      'alphabet of alphabets.csv')
    chars[(owner.name, number - owner.first_id + 1)] = ~images[row]
  return chars


def read_zip(path: epath.Path) -> dict[CharKey, np.ndarray]:
  """Ink masks bool [20, 105, 105] per character from an official Omniglot zip."""
  drawings: dict[CharKey, dict[int, np.ndarray]] = {}
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as archive:
      for member in archive.namelist():
        match = _ZIP_MEMBER.search(member)
        if not match:
          continue
        ink = scan_ink(archive.read(member), f'{path}:{member}')
        if ink.shape != (ORIGINAL_SIZE, ORIGINAL_SIZE):
          raise DataError(f'{path}: {member} is {ink.shape[1]}x{ink.shape[0]}; expected 105x105')
        drawings.setdefault((match[1], int(match[2])), {})[int(match[4])] = ink
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'cannot read Omniglot zip {path}: {e}') from None
  if not drawings:
    raise DataError(f'{path} holds no images of the form <Alphabet>/characterNN/<id>_<drawer>.png')
  chars = {}
  for (alphabet, character), by_drawer in drawings.items():
    if len(by_drawer) != NUM_DRAWERS:
      raise DataError(f'{path}: {alphabet}/character{character:02d} has {len(by_drawer)} images; '
                      f'expected {NUM_DRAWERS}')
    chars[(alphabet, character)] = np.stack([by_drawer[d] for d in sorted(by_drawer)])
  return chars


def find_manual_sources(manual_dir: epath.Path | None) -> dict[str, epath.Path] | None:
  """Per set, the npz (preferred) or zip in manual_dir; None when it holds neither."""
  if manual_dir is None or not manual_dir.is_dir():
    return None
  found, missing = {}, []
  for set_name in SETS:
    for ext in ('npz', 'zip'):
      if (manual_dir / f'images_{set_name}.{ext}').is_file():
        found[set_name] = manual_dir / f'images_{set_name}.{ext}'
        break
    else:
      missing.append(f'images_{set_name}.npz (or images_{set_name}.zip)')
  if not found:
    return None
  if missing:
    raise DataError(f'Omniglot manual_dir {manual_dir} is incomplete: missing {", ".join(missing)}; '
                    f'found {", ".join(p.name for p in found.values())}')
  return found


def _check_reachable(url: str, timeout: float = 10.0) -> None:
  """Fail in seconds instead of minutes of HTTP retries when there is no network."""
  host = urllib.parse.urlparse(url).hostname
  with socket.create_connection((host, 443), timeout=timeout):
    pass


def scan_ink(source, where: str) -> np.ndarray:
  """A character scan (a path, PNG bytes or an opened image; dark ink on light paper) -> bool ink mask
  [H, W]: grey (image_files.read: orientation, transparency over white paper, 16-bit) below 128."""
  return image_files.read(source, where, None, 1)[:, :, 0] < 128


def resize_ink(ink: np.ndarray, size: int) -> np.ndarray:
  """bool [N, H, W] ink masks -> uint8 [N, size, size], ink 255, Lanczos antialiased where resized."""
  images = ink.astype(np.uint8) * 255
  if images.shape[1:] == (size, size):
    return images
  return np.stack([
      np.asarray(Image.fromarray(im, 'L').resize((size, size), Image.Resampling.LANCZOS))
      for im in images])


def read_scan(source, where: str, size: int, channels: int = 1) -> np.ndarray:
  """The record's reading: a scan (the zips' PNGs, a user's character image of any mode and size) ->
  uint8 [size, size, 1], ink 255: scan_ink then resize_ink, as the builder stores the zips' scans (the
  shared copy's npz holds the same masks decoded)."""
  del channels  # always 1
  return resize_ink(scan_ink(source, where)[None], size)[0][:, :, None]


# ---------------------------------------------------------------- builder


def _image_encoding(size: int) -> str:
  """Raw bytes (fast to write and read); zlib for large sizes, where Omniglot
  compresses ~10x: it keeps the biggest split (82k images) well inside TFDS's 1 GB
  in-memory shuffle buffer, whose on-disk spill path would need TensorFlow."""
  return 'bytes' if size <= 64 else 'zlib'


class FewshotOmniglot(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Omniglot with few-shot class splits (vinyals or lake) and global labels."""

  name = 'fewshot_omniglot'
  # TFDS's own code_path probes the optional `importlib_resources` backport for
  # builders living in a package; a plain path avoids that import.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [_make_config('vinyals', 28), _make_config('lake', 28)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put images_background.npz and images_evaluation.npz (or the official '
      'images_background.zip and images_evaluation.zip) in manual_dir; optionally '
      'alphabets.csv and splits/vinyals/{train,val,test}.txt.')

  def __init__(self, *, manual_dir=None, file_format='array_record', **kwargs):
    # Set before super().__init__, which calls _info (label names may come from manual_dir).
    self.manual_dir = epath.Path(manual_dir) if manual_dir else None
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    specs = class_specs(config.scheme, self.manual_dir)
    names = [c.name for split in SPLITS for c in specs[split]]
    size = config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description='Omniglot handwritten characters with few-shot class splits.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                          encoding=_image_encoding(size)),
            'label': tfds.features.ClassLabel(names=names),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/brendenlake/omniglot',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    specs = class_specs(config.scheme, self.manual_dir)
    chars = self._load_characters(dl_manager)
    generators, offset = {}, 0
    for split in SPLITS:
      generators[split] = self._generate_examples(specs[split], chars, offset)
      offset += len(specs[split])
    return generators

  def _load_characters(self, dl_manager) -> dict[CharKey, np.ndarray]:
    alphabets = read_alphabets(self.manual_dir)
    sources = find_manual_sources(self.manual_dir)
    if sources is None:
      sources = self._download(dl_manager)
    chars = {}
    for set_name, path in sources.items():
      if path.name.endswith('.npz'):
        chars.update(read_npz(path, set_name, alphabets))
      else:
        chars.update(read_zip(path))
    return chars

  def _download(self, dl_manager) -> dict[str, epath.Path]:
    expected = ('images_background.npz and images_evaluation.npz, or '
                'images_background.zip and images_evaluation.zip')
    try:
      _check_reachable(URLS['background'])
      paths = dl_manager.download(URLS)
    except Exception as e:  # Any network/download failure ends in one clear message.
      where = (f'manual_dir {self.manual_dir} holds no images' if self.manual_dir
               else 'no manual_dir was given')
      raise DataError(
          f'Omniglot: {where} (expected {expected}) and downloading {URLS["background"]} failed '
          f'({type(e).__name__}: {e}). Put the files in a manual_dir or allow network access.'
      ) from None
    return {s: epath.Path(p) for s, p in paths.items()}

  def _generate_examples(self, specs: list[ClassSpec], chars: dict[CharKey, np.ndarray], offset: int):
    size = self.builder_config.image_size
    cached_key, cached = None, None
    for i, spec in enumerate(specs):
      key = (spec.alphabet, spec.character)
      if key != cached_key:  # Rotations of a character are consecutive: resize once.
        if key not in chars:
          raise DataError(f'Omniglot class {spec.name}: character {spec.alphabet}/character'
                          f'{spec.character:02d} is missing from the image files')
        cached_key, cached = key, resize_ink(chars[key], size)
      label = offset + i
      rotated = np.ascontiguousarray(np.rot90(cached, spec.rotation // 90, axes=(1, 2)))
      for drawer, image in enumerate(rotated[..., None]):
        yield label * NUM_DRAWERS + drawer, {'image': image, 'label': label}


def _builder(*, scheme, image_size, data_dir, manual_dir):
  return FewshotOmniglot(config=omniglot_config(scheme, image_size), data_dir=data_dir, manual_dir=manual_dir)


DATASET = common.Dataset(
    name='omniglot', schemes=SCHEMES, folder='omniglot',
    raw_files=FewshotOmniglot.MANUAL_DOWNLOAD_INSTRUCTIONS + ' Without them the official zips are downloaded.',
    image_size=28, channels=1, mean=common.GREY_MEAN, std=common.GREY_STD, preset='omniglot',
    base_classes=4112,  # splits/vinyals/train.txt
    builder=_builder, resizable=True, read_image=read_scan)
