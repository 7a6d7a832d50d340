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

from fewshot_jax.config import DATASET_TABLE, DATASETS
from fewshot_jax.data import cifar, cub, mini_imagenet, omniglot, synthetic, tiered_imagenet
from fewshot_jax.errors import ConfigError, DataError, FewshotError

# Datasets of one scheme and one stored size: the builder class (built with manual_dir).
_FIXED = {'mini_imagenet': mini_imagenet.FewshotMiniImagenet, 'cifar_fs': cifar.FewshotCifarFS,
          'fc100': cifar.FewshotFC100, 'tiered_imagenet': tiered_imagenet.FewshotTieredImagenet,
          'cub': cub.FewshotCub}


def make_builder(name: str, *, scheme: str, image_size: int, data_dir,
                 manual_dir=None) -> tfds.core.DatasetBuilder:
  """Validated builder; nothing is read or written until `prepare`.

  manual_dir holds the raw files (see each dataset module); synthetic ignores it.
  Datasets: omniglot, mini_imagenet, synthetic, cifar_fs and fc100 (cifar.py),
  tiered_imagenet, cub.
  """
  if name == 'omniglot':
    config = omniglot.omniglot_config(scheme, image_size)
    return omniglot.FewshotOmniglot(config=config, data_dir=data_dir, manual_dir=manual_dir)
  if name in _FIXED or name == 'synthetic':
    _check(name, 'scheme', scheme, DATASET_TABLE[name]['schemes'])
    _check(name, 'image_size', image_size, (DATASET_TABLE[name]['image_size'],))
    if name == 'synthetic':
      return synthetic.FewshotSynthetic(config=synthetic.synthetic_config(), data_dir=data_dir)
    return _FIXED[name](data_dir=data_dir, manual_dir=manual_dir)
  raise ConfigError(f'unknown dataset {name!r}; valid datasets: {", ".join(DATASETS)}')


def _check(dataset: str, field: str, value, valid: tuple) -> None:
  if isinstance(value, bool) or value not in valid:
    raise ConfigError(f'{dataset} {field} {value!r} is invalid; valid: {", ".join(map(str, valid))}')


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
