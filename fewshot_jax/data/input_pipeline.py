"""From config to device-resident splits: prepare the TFDS builder once, load a split."""

import ml_collections

from fewshot_jax.data import builders
from fewshot_jax.data import episodes

_CHANNELS = {"omniglot": 1, "synthetic": 1, "mini_imagenet": 3}


def builder_from_config(config: ml_collections.ConfigDict):
  """The prepared TFDS builder of config.data (prepared on first use, then cached on disk)."""
  d = config.data
  builder = builders.make_builder(d.name, scheme=d.split, image_size=d.image_size, data_dir=d.data_dir,
                                  manual_dir=d.manual_dir)
  return builders.prepare(builder)


def load(config: ml_collections.ConfigDict, split: str, sharding=None) -> episodes.DeviceDataset:
  """The split on the device (replicated over the mesh when `sharding` is given)."""
  return episodes.load_split(builder_from_config(config), split, sharding)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Shape of one image as the model sees it (after on-device resizing)."""
  size = config.data.get("input_size") or config.data.image_size
  return (size, size, _CHANNELS[config.data.name])
