"""Device-resident datasets and the on-device episode sampler.

A split lives on the accelerator as one uint8 image array plus a per-class index
table, so an episode is just a gather inside the jitted step: no host input
pipeline in the hot loop, and every episode is a pure function of a PRNG key.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fewshot_jax.errors import ConfigError, DataError


@flax.struct.dataclass
class DeviceDataset:
  """One split on the device.

  images: uint8 [num_images, H, W, C].
  class_index: int32 [num_classes, max_per_class], indices into `images`
    (entries past a class's count are padding and never sampled).
  class_counts: int32 [num_classes].
  class_ids: int32 [num_classes], the builder's global class label of each row.
  """

  images: jax.Array
  class_index: jax.Array
  class_counts: jax.Array
  class_ids: jax.Array

  @property
  def num_classes(self) -> int:
    return self.class_index.shape[0]

  @property
  def min_class_size(self) -> int:
    return int(np.min(np.asarray(self.class_counts)))


@flax.struct.dataclass
class Episode:
  """A batch of T tasks (leading axis). Labels are 0..N-1 in a random class order."""

  support: jax.Array  # [T, N*K, H, W, C]
  support_labels: jax.Array  # [T, N*K] int32
  query: jax.Array  # [T, N*Q, H, W, C]
  query_labels: jax.Array  # [T, N*Q] int32
  classes: jax.Array  # [T, N] global class ids


def from_arrays(images: np.ndarray, labels: np.ndarray) -> DeviceDataset:
  """Groups images by label into a DeviceDataset (host arrays; place with jax.device_put)."""
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DataError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  if len(images) == 0:
    raise DataError("the split holds no images")
  order = np.argsort(labels, kind="stable")
  class_ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  table = np.zeros((len(class_ids), counts.max()), np.int32)
  for row, (start, count) in enumerate(zip(starts, counts)):
    table[row, :count] = order[start:start + count]
  return DeviceDataset(
      images=images,
      class_index=table,
      class_counts=counts.astype(np.int32),
      class_ids=class_ids.astype(np.int32))


def load_split(builder, split: str, sharding=None) -> DeviceDataset:
  """Reads a prepared TFDS split (ArrayRecord data source) onto the device.

  Under a mesh pass a replicated `sharding`; the arrays are then copied to
  every device once.
  """
  sources = builder.as_data_source()
  if split not in sources:
    raise ConfigError(f"split {split!r} does not exist in {builder.name}/{builder.builder_config.name}; "
                      f"valid splits: {sorted(sources)}")
  source = sources[split]
  n = len(source)
  first = source[0]["image"] if n else None
  if first is None:
    raise DataError(f"split {split!r} of {builder.name} is empty")
  images = np.empty((n,) + first.shape, np.uint8)
  labels = np.empty((n,), np.int64)
  chunk = 4096
  for start in range(0, n, chunk):
    batch = source.__getitems__(list(range(start, min(n, start + chunk))))
    for i, example in enumerate(batch):
      images[start + i] = example["image"]
      labels[start + i] = example["label"]
  dataset = from_arrays(images, labels)
  return jax.device_put(dataset, sharding) if sharding is not None else jax.device_put(dataset)


def check_episode_fits(dataset: DeviceDataset, ways: int, shots: int, queries: int, split: str,
                       keys: tuple[str, str, str] = ("episode.ways", "episode.shots", "episode.queries")
                       ) -> None:
  """Raises ConfigError if an N-way K-shot Q-query episode cannot be drawn without duplicates.

  `keys` are the config keys the three numbers came from, so the message names
  what the user set (e.g. episode.train_ways for training, eval.queries for evaluation).
  """
  kw, ks, kq = keys
  if ways < 1 or shots < 1 or queries < 0:
    raise ConfigError(f"episode needs {kw} >= 1, {ks} >= 1, {kq} >= 0; got {ways}, {shots}, {queries}")
  if ways > dataset.num_classes:
    raise ConfigError(f"{kw}={ways} is larger than the {dataset.num_classes} classes of "
                      f"split {split!r}; use {kw} <= {dataset.num_classes}")
  smallest = dataset.min_class_size
  if shots + queries > smallest:
    raise ConfigError(f"{ks} + {kq} = {shots} + {queries} = {shots + queries} is "
                      f"larger than the {smallest} images of the smallest class of split {split!r}; "
                      f"use {ks} + {kq} <= {smallest}")


def _sample_task(key, dataset: DeviceDataset, ways: int, shots: int, queries: int):
  """One task: N distinct classes, K+Q distinct images per class, labels by class position."""
  class_key, image_key = jax.random.split(key)
  # Random priorities + top_k = sampling without replacement in random order.
  _, classes = jax.lax.top_k(jax.random.uniform(class_key, (dataset.num_classes,)), ways)
  width = dataset.class_index.shape[1]

  def pick(k, row):
    scores = jax.random.uniform(k, (width,))
    scores = jnp.where(jnp.arange(width) < dataset.class_counts[row], scores, -1.0)
    _, cols = jax.lax.top_k(scores, shots + queries)
    return dataset.class_index[row, cols]

  picked = jax.vmap(pick)(jax.random.split(image_key, ways), classes)  # [N, K+Q]
  support_idx = picked[:, :shots].reshape(-1)
  query_idx = picked[:, shots:].reshape(-1)
  labels = jnp.arange(ways, dtype=jnp.int32)
  return dict(
      support=support_idx,
      support_labels=jnp.repeat(labels, shots),
      query=query_idx,
      query_labels=jnp.repeat(labels, queries),
      classes=dataset.class_ids[classes])


# augment(key, support_u8, support_labels, query_u8, query_labels) -> (support, query) floats, one task.
Augment = Callable[..., tuple[jax.Array, jax.Array]]


def sample_episodes(key, dataset: DeviceDataset, *, tasks: int, ways: int, shots: int, queries: int,
                    augment: Augment | None = None) -> Episode:
  """Samples T tasks on the device from one key; see `sample_tasks`."""
  return sample_tasks(jax.random.split(key, tasks), dataset, ways=ways, shots=shots, queries=queries,
                      augment=augment)


def sample_tasks(task_keys, dataset: DeviceDataset, *, ways: int, shots: int, queries: int,
                 augment: Augment | None = None) -> Episode:
  """Samples one task per key and gathers (and augments) its images.

  A task depends only on its key, so evaluation draws the same episodes
  whatever its batch size or device count. `augment(key, support,
  support_labels, query, query_labels)` receives the uint8 images of one task
  (labels allow per-class transforms) and returns float images; None only
  converts to float32 in [0, 1].
  """
  idx = jax.vmap(lambda k: _sample_task(jax.random.fold_in(k, 0), dataset, ways, shots, queries))(task_keys)
  support = dataset.images[idx["support"]]
  query = dataset.images[idx["query"]]
  if augment is None:
    support = support.astype(jnp.float32) / 255.0
    query = query.astype(jnp.float32) / 255.0
  else:
    aug_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(task_keys)
    support, query = jax.vmap(augment)(aug_keys, support, idx["support_labels"], query, idx["query_labels"])
  return Episode(
      support=support,
      support_labels=idx["support_labels"],
      query=query,
      query_labels=idx["query_labels"],
      classes=idx["classes"])


def episode_shapes(ways: int, shots: int, queries: int, tasks: int, image_shape: tuple[int, ...]) -> Any:
  """Shape-only Episode, for initialising models without sampling."""
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  i = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  return Episode(
      support=f(tasks, ways * shots, *image_shape),
      support_labels=i(tasks, ways * shots),
      query=f(tasks, ways * queries, *image_shape),
      query_labels=i(tasks, ways * queries),
      classes=i(tasks, ways))
