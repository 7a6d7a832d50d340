"""One entry point from (dataset, scheme, image_size) to a prepared TFDS builder.

Usage:
  builder = prepare(make_builder('omniglot', scheme='vinyals', image_size=28,
                                 data_dir=data_dir, manual_dir=manual_dir))
  source = builder.as_data_source()['train']  # random access: source[i] -> dict

All builders write ArrayRecord (random access, no TensorFlow needed) and store
examples in class order with global labels (train, then val, then test).
"""

import tarfile
import zipfile

import tensorflow_datasets as tfds
from PIL import Image

from fewshot_jax.data import registry
from fewshot_jax.errors import DataError, FewshotError


def make_builder(name: str, *, scheme: str, image_size: int, data_dir,
                 manual_dir=None, **options) -> tfds.core.DatasetBuilder:
  """Validated builder of a registered dataset; nothing is written until `prepare`.

  manual_dir holds the raw files (the record's raw_files; each dataset module says more);
  a generated dataset ignores it. `options`: the record's own data.* keys (Dataset.options).
  """
  return registry.get(name).make_builder(scheme=scheme, image_size=image_size, data_dir=data_dir,
                                         manual_dir=manual_dir, **options)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Writes the dataset unless already prepared (then it is a cheap no-op).

  Errors from reading the raw files surface as one DataError naming the
  manual_dir, instead of a traceback from deep inside TFDS.
  """
  if builder.is_prepared():
    return builder
  manual_dir = getattr(builder, 'manual_dir', None)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except FewshotError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, tarfile.TarError,
          Image.DecompressionBombError) as e:
    raise DataError(f'preparing {builder.info.full_name} from manual_dir '
                    f'{manual_dir} failed: {type(e).__name__}: {e}') from e
  return builder
