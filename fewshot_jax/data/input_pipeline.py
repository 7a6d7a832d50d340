"""From config to device-resident splits (prepare the TFDS builder once, load a split) and to the
episode sampler's arguments."""

import os
import shutil
import time

from absl import logging
import ml_collections

from fewshot_jax import files
from fewshot_jax import multihost
from fewshot_jax.data import augment
from fewshot_jax.data import builders
from fewshot_jax.data import episodes
from fewshot_jax.data import registry
from fewshot_jax.data import sources



def builder_from_config(config: ml_collections.ConfigDict):
  """The prepared TFDS builder of config.data (prepared on first use, then cached on disk).

  Prepared once per data_dir: process 0 prepares while the others wait at a
  barrier, and a file lock in data_dir serialises preparation between
  processes that do not share the barrier's view (a data_dir local to each
  host: there each host's first process to take the lock prepares it).
  """
  d = config.data
  make = lambda: builders.make_builder(d.name, scheme=d.split, image_size=d.image_size, data_dir=d.data_dir,
                                       manual_dir=d.manual_dir, **options(config))
  builder = make()  # validates the config before any process waits
  if multihost.is_main() and not builder.is_prepared():
    builder = _prepare_locked(make, d)
  multihost.barrier(f"prepare {d.name}/{d.split}/{d.image_size}")
  if not multihost.is_main():
    builder = make()  # made after the barrier, so it sees what process 0 wrote
  return builder if builder.is_prepared() else _prepare_locked(make, d)


def _prepare_locked(make, d):
  lock = os.path.join(d.data_dir, f".prepare-{d.name}-{d.split}-{d.image_size}.lock")
  with files.file_lock(lock):
    builder = make()  # made under the lock, so it sees what another process finished
    if builder.is_prepared():
      return builder
    start = time.time()
    fresh = [p for p in (os.path.join(d.data_dir, builder.name), os.path.join(d.data_dir, "downloads"))
             if not os.path.exists(p)]
    try:
      builders.prepare(builder)
    except BaseException:
      _remove_new(fresh)
      raise
    log = logging.info if multihost.is_main() else logging.warning
    log("Prepared %s into %s in %.1f s%s", builder.info.full_name, d.data_dir, time.time() - start,
        "" if multihost.is_main() else " (this process does not share process 0's data_dir)")
    return builder


def _remove_new(paths: list[str]) -> None:
  """Removes what a failed preparation created: folders that did not exist before it and hold no file
  (TFDS's own metadata aside), so a retry starts clean and nothing empty is left behind."""
  for path in paths:
    files_in = [f for root, _, names in os.walk(path) for f in names
                if os.path.relpath(root, path).split(os.sep)[0] != ".config"]
    if os.path.isdir(path) and not files_in:
      shutil.rmtree(path, ignore_errors=True)


def load(config: ml_collections.ConfigDict, split: str, mesh=None) -> episodes.DeviceDataset:
  """The split on the devices of `mesh` in config.data.placement (default device without a mesh)."""
  return episodes.load_split(builder_from_config(config), split, mesh, config.data.placement)


def options(config: ml_collections.ConfigDict) -> dict:
  """The dataset record's own data.* keys (Dataset.options) as config.data sets them (a config.json
  that predates one: its default)."""
  d = config.data
  return {key: d[key] if key in d else value for key, value in registry.get(d.name).options.items()}


def channels(config: ml_collections.ConfigDict) -> int:
  """Channels of the stored images: data.channels where the record lets the config choose, else the record's."""
  return options(config).get("channels", registry.get(config.data.name).channels)


def episode_sampling(config: ml_collections.ConfigDict, *, training: bool, ways: int | None = None,
                     queries: int | None = None, query_sampling: str | None = None,
                     disjoint: bool | None = None) -> dict:
  """The keyword arguments of episodes.sample_tasks (ways, shots, queries, augment, query_sampling,
  disjoint) under `config`, for training and for every evaluation protocol.

  `training` applies config.augment's training augmentation (augment.from_config); each other
  argument replaces its config.episode.* value (ways, queries, query_sampling, disjoint_queries).
  """
  ways = config.episode.ways if ways is None else ways
  return dict(ways=ways, shots=config.episode.shots,
              queries=config.episode.queries if queries is None else queries,
              augment=augment.from_config(config, ways, training=training),
              query_sampling=config.episode.query_sampling if query_sampling is None else query_sampling,
              disjoint=config.episode.disjoint_queries if disjoint is None else disjoint)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Shape of one image as the model sees it (after on-device resizing)."""
  size = augment.input_size(config)
  return (size, size, channels(config))


def with_statistics(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, or a copy whose empty data.mean / data.std are the per-channel statistics of the prepared
  train split (data.train_split): kept in the prepared dataset's metadata by builders that compute them
  while writing (an image folder's), else one streaming pass over the split (sources.channel_stats).
  The dataset is prepared here if it is not yet."""
  d = config.data
  if len(d.mean) and len(d.std):
    return config
  builder = builder_from_config(config)
  metadata = builder.info.metadata or {}
  if d.train_split == "train" and "mean" in metadata and "std" in metadata:
    mean, std = tuple(metadata["mean"]), tuple(metadata["std"])
  else:
    mean, std = sources.channel_stats(builder, d.train_split)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.mean = tuple(config.data.mean) or mean
    config.data.std = tuple(config.data.std) or std
  logging.info("data.mean=%s, data.std=%s: the statistics of %s's %s split",
               tuple(round(m, 2) for m in config.data.mean), tuple(round(s, 2) for s in config.data.std),
               builder.info.full_name, d.train_split)
  return config
