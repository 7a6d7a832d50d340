"""Dataset registry: data.name -> its Dataset record (data/common.py).

A dataset is its own file, data/<name>.py, declaring a module-level Dataset record
(cifar.py declares two), one line in DATASETS and a fixture test (docs/datasets.md).
The order of DATASETS is the order error messages list the valid names in.
"""

from fewshot_jax.data import cifar, cub, image_folder, mini_imagenet, omniglot, synthetic, tiered_imagenet
from fewshot_jax.data.common import Dataset
from fewshot_jax.errors import ConfigError

DATASETS = (
    omniglot.DATASET,
    mini_imagenet.DATASET,
    synthetic.DATASET,
    cifar.CIFAR_FS,
    cifar.FC100,
    tiered_imagenet.DATASET,
    cub.DATASET,
    image_folder.DATASET,
)
NAMES = tuple(d.name for d in DATASETS)
# The dataset base_config starts from: generated, so a config runs with no files.
DEFAULT = synthetic.DATASET


def get(name: str) -> Dataset:
  """The record of data.name `name`."""
  for dataset in DATASETS:
    if dataset.name == name:
      return dataset
  raise ConfigError(f'dataset {name!r} is unknown; valid: {list(NAMES)}')


def by_preset(prefix: str) -> Dataset:
  """The record of a configs preset prefix ('mini' of mini-5w1s)."""
  for dataset in DATASETS:
    if dataset.preset == prefix:
      return dataset
  raise ConfigError(f'preset prefix {prefix!r} names no dataset; valid: {[d.preset for d in DATASETS]}')
