"""Shared pieces of the image builders: packaged class lists, pickled images, streaming reads and writes.

* `class_list(dataset, split)`: rows of `splits/<dataset>/<split>.{txt,csv}` shipped
  with the package (lines starting with '#' name the source).
* `as_bytes`: an encoded image as the pickled distributions hold it (decoded by the record's
  `read_image`, data/image_files.py).
* `iter_pickled_list`: the items of a pickled Python list one APPENDS batch (<= 1000
  items) at a time, never the whole list: what lets tieredImageNet's multi-GB
  `*_images_png.pkl` be prepared in bounded memory.
* `ImageBuilder`: the builders' base class. TFDS keeps up to 1 GB of serialized examples of a split in
  memory and spills the rest through TensorFlow's file API (which we never
  import); these builders spool examples to one plain temporary file
  instead, so preparation holds a bounded number of examples whatever the size.
"""

import collections.abc
import contextlib
import dataclasses
import importlib.resources
import io
import os
import pickle
import struct
import uuid

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fewshot_jax.errors import DataError

SPLITS = ('train', 'val', 'test')


# ---------------------------------------------------------------- class lists


def class_list(dataset: str, split: str) -> list[list[str]]:
  """Rows (comma-separated fields) of the packaged class list of `dataset`/`split`."""
  folder = importlib.resources.files(__package__).joinpath('splits', dataset)
  for ext in ('txt', 'csv'):
    resource = folder.joinpath(f'{split}.{ext}')
    if resource.is_file():
      lines = resource.read_text().splitlines()
      return [line.strip().split(',') for line in lines if line.strip() and not line.startswith('#')]
  raise DataError(f'no packaged class list splits/{dataset}/{split}.txt (or .csv) in fewshot_jax.data')


# ---------------------------------------------------------------- images


def as_bytes(item, where: str) -> bytes:
  """An encoded image as pickled by the common distributions: bytes, or a uint8 numpy array
  (cv2.imencode's output, shape [n, 1])."""
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8:
    return item.tobytes()
  raise DataError(f'{where} is a {type(item).__name__}'
                  f'{" of " + str(item.dtype) if isinstance(item, np.ndarray) else ""}; expected the encoded '
                  'image as bytes or a uint8 array')


# ---------------------------------------------------------------- streaming pickle


_SMALL = 256  # bytes/str at most this long stay in the memo (as dtypes, globals and names do)


def _per_item(value) -> bool:
  """What the pickler memoizes for each image and never refers back to: the array (even
  empty: it is memoized before BUILD fills it), its bytes, and the argument / state /
  shape tuples that hold them."""
  return isinstance(value, (np.ndarray, tuple)) or (isinstance(value, (bytes, bytearray, str))
                                                     and len(value) > _SMALL)


class _ForgetfulMemo(dict):
  """The unpickler's memo without the per-image objects: the pickler memoizes every
  object, and keeping them would keep the whole list alive. Numbering goes on as if
  they were kept (protocol 4's MEMOIZE numbers entries by the memo's length)."""

  def __init__(self):
    super().__init__()
    self._next = 0

  def __len__(self):
    return self._next

  def __setitem__(self, key, value):
    self._next = max(self._next, key + 1)
    if not _per_item(value):
      super().__setitem__(key, value)

  def __getitem__(self, key):
    try:
      return super().__getitem__(key)
    except KeyError:
      raise pickle.UnpicklingError('the pickle refers back to an earlier image; expected a list of '
                                   'independent encoded images') from None


class _ListStream(pickle._Unpickler):  # pylint: disable=protected-access
  """Pure-Python unpickler whose top-level list hands its items out instead of keeping them."""

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, encoding='latin1')  # latin1: numpy arrays pickled by Python 2
    self.memo = _ForgetfulMemo()
    self.root = None
    self.pending = []

  def _load_empty_list(self):
    value = []
    if self.root is None and not self.stack and not self.metastack:
      self.root = value
    self.append(value)

  def _load_append(self):
    value = self.stack.pop()
    if self.stack[-1] is self.root:
      self.pending.append(value)
    else:
      self.stack[-1].append(value)

  def _load_appends(self):
    items = self.pop_mark()
    if self.stack[-1] is self.root:
      self.pending.extend(items)
    else:
      self.stack[-1].extend(items)

  dispatch[pickle.EMPTY_LIST[0]] = _load_empty_list
  dispatch[pickle.APPEND[0]] = _load_append
  dispatch[pickle.APPENDS[0]] = _load_appends

  def items(self) -> collections.abc.Iterator:
    """What pickle._Unpickler.load does, yielding the root list's items as they are read."""
    self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # pylint: disable=protected-access
    self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
    self.metastack, self.stack, self.proto = [], [], 0
    self.append = self.stack.append
    dispatch = self.dispatch
    try:
      while True:
        key = self.read(1)
        if not key:
          raise EOFError('the pickle ends before its STOP opcode (truncated file?)')
        dispatch[key[0]](self)
        if self.pending:
          yield from self.pending
          self.pending = []
    except pickle._Stop as stop:  # pylint: disable=protected-access
      if stop.value is not self.root:
        raise pickle.UnpicklingError(f'the pickle holds a {type(stop.value).__name__}, not a list') from None


def iter_pickled_list(path, what: str) -> collections.abc.Iterator:
  """Items of the list pickled in `path` (any protocol, Python 2 or 3), at most one APPENDS
  batch held at a time. Errors (a truncated or foreign file) name the file."""
  try:
    with open(path, 'rb') as f:
      yield from _ListStream(io.BufferedReader(f, 1 << 20)).items()
  except DataError:
    raise
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, struct.error, ImportError) as e:
    raise DataError(f'cannot read {what} {path}: {type(e).__name__}: {e}') from None


# ---------------------------------------------------------------- streaming TFDS writes


class _Spool:
  """Drop-in for tfds.core.shuffle.Shuffler with shuffling disabled: examples go to one
  temporary file, in the order the generator yields them (keys must increase)."""

  def __init__(self, dirpath, hash_salt, disable_shuffling=False, ignore_duplicates=False):
    del hash_salt, ignore_duplicates
    if not disable_shuffling:
      raise AssertionError('the streaming writer keeps the generator order; set disable_shuffling=True')
    os.makedirs(os.fspath(dirpath), exist_ok=True)
    self._path = os.path.join(os.fspath(dirpath), f'spool-{uuid.uuid4().hex}.tmp')
    self._file = open(self._path, 'wb')  # pylint: disable=consider-using-with
    self._last = None
    self.size = 0
    self.num_examples = 0

  @property
  def bucket_lengths(self):
    return [self.num_examples]

  def add(self, key, data: bytes) -> None:
    if not isinstance(key, int) or (self._last is not None and key <= self._last):
      raise AssertionError(f'example keys must be increasing integers; got {key!r} after {self._last!r}')
    self._last = key
    self._file.write(struct.pack('<qQ', key, len(data)))
    self._file.write(data)
    self.size += len(data)
    self.num_examples += 1

  def __iter__(self):
    self._file.close()
    try:
      with open(self._path, 'rb') as f:
        for _ in range(self.num_examples):
          key, length = struct.unpack('<qQ', f.read(16))
          yield key, f.read(length)
    finally:
      os.remove(self._path)


@contextlib.contextmanager
def _spooled_writes():
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  original = shuffle.Shuffler
  shuffle.Shuffler = _Spool
  try:
    yield
  finally:
    shuffle.Shuffler = original


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
  """The builders' one config: a split scheme at a stored size (the name keys the cache)."""
  scheme: str = 'default'
  image_size: int = 84


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the RGB few-shot builders: a manual_dir, ArrayRecord, uint8 [S, S, 3] images
  with global labels in generator order, and bounded-memory writing (`_Spool`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DESCRIPTION = ''
  HOMEPAGE = ''
  IMAGE_SIZE = 0

  def __init__(self, *, manual_dir=None, file_format='array_record', **kwargs):
    # Set before super().__init__, which calls _info.
    self.manual_dir = epath.Path(manual_dir) if manual_dir else None
    super().__init__(file_format=file_format, **kwargs)

  def _label_feature(self) -> tfds.features.ClassLabel:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            # Raw bytes: photo pixels barely compress, and bytes decode fastest.
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='bytes'),
            'label': self._label_feature(),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
    )

  def _generate_examples(self, examples):
    """One split's (key, example) pairs, made by the builder's readers in _split_generators."""
    yield from examples

  def _download_and_prepare(self, dl_manager, download_config=None):
    with _spooled_writes():
      return super()._download_and_prepare(dl_manager, download_config)


# ---------------------------------------------------------------- statistics


def channel_stats(builder, split: str = 'train', chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel pixel mean and std (0..255 units) of a prepared split, in one streaming
  pass (float64 sums; one chunk of images in memory): the numbers for data.mean / data.std.

    python -c "from fewshot_jax.data import builders, sources; print(sources.channel_stats(
        builders.make_builder('cub', scheme='chen', image_size=84, data_dir=DIR)))"
  """
  source = builder.as_data_source()[split]
  total, total_sq, count = 0.0, 0.0, 0
  for start in range(0, len(source), chunk):
    batch = source.__getitems__(list(range(start, min(len(source), start + chunk))))
    pixels = np.stack([e['image'] for e in batch]).astype(np.float64)
    pixels = pixels.reshape(-1, pixels.shape[-1])
    total, total_sq, count = total + pixels.sum(0), total_sq + (pixels ** 2).sum(0), count + len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return tuple(round(float(m), 2) for m in mean), tuple(round(float(s), 2) for s in std)
