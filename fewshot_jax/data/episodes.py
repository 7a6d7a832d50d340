"""Device-resident datasets and the on-device episode sampler.

A split lives on the accelerator as one uint8 image array plus a per-class index
table, so an episode is just a gather inside the jitted step: no host input
pipeline in the hot loop, and every episode is a pure function of a PRNG key.

Under a mesh the image array is either replicated (every device holds the
split) or sharded over the devices (each holds 1/D of it, for splits larger
than one device's memory). Either way each process builds only its own
devices' part (`jax.make_array_from_callback`): no process ever gathers the
dataset from the others. `take_images` hides the difference from samplers.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fewshot_jax.data import common
from fewshot_jax.errors import ConfigError, DataError

# data.placement: every device holds the whole split, or 1/D of it (load_split; config.validate checks it).
PLACEMENTS = ("replicated", "sharded")
# episode.query_sampling: `queries` of every class, or `queries` per task of uniformly drawn classes
# (sample_tasks; config.validate checks it).
QUERY_SAMPLING = ("per_class", "per_task")


@flax.struct.dataclass
class DeviceDataset:
  """One split on the device.

  images: uint8 [num_images, H, W, C].
  class_index: int32 [num_classes, max_per_class], indices into `images`
    (entries past a class's count are padding and never sampled).
  class_counts: int32 [num_classes].
  class_ids: int32 [num_classes], the builder's global class label of each row.
  mesh: the mesh the arrays live on (None: one default device); episodes are
    sampled per device, each device its own tasks.
  sharded: `images` is split over the mesh's 'data' axis (rows padded to a
    multiple of the device count) instead of replicated on every device.
  """

  images: jax.Array
  class_index: jax.Array
  class_counts: jax.Array
  class_ids: jax.Array
  mesh: Any = flax.struct.field(pytree_node=False, default=None)
  sharded: bool = flax.struct.field(pytree_node=False, default=False)

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


def class_table(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(class_index, class_counts, class_ids) of a label vector: image indices grouped by label."""
  labels = np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  class_ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  table = np.zeros((len(class_ids), counts.max()), np.int32)
  for row, (start, count) in enumerate(zip(starts, counts)):
    table[row, :count] = order[start:start + count]
  return table, counts.astype(np.int32), class_ids.astype(np.int32)


def from_arrays(images: np.ndarray, labels: np.ndarray) -> DeviceDataset:
  """Groups images by label into a DeviceDataset (host arrays; place with jax.device_put)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DataError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  if len(images) == 0:
    raise DataError("the split holds no images")
  table, counts, ids = class_table(labels)
  return DeviceDataset(images=images, class_index=table, class_counts=counts, class_ids=ids)


def load_split(builder, split: str, mesh=None, placement: str = "replicated") -> DeviceDataset:
  """Reads a prepared TFDS split (ArrayRecord data source) onto the devices.

  Without a mesh: the default device. With one: `placement` 'replicated' puts
  the whole split on every device, 'sharded' gives device i rows
  [i * n / D, (i + 1) * n / D) of the (padded) image array. Each process reads
  every label (the class table is replicated) but keeps only the images its
  own devices hold, streaming the split in chunks, so host memory holds one
  process's share of the images, never the split times the process count.
  """
  sources = builder.as_data_source()
  if split not in sources:
    raise ConfigError(f"split {split!r} does not exist in {builder.name}/{builder.builder_config.name}; "
                      f"valid splits: {sorted(sources)}")
  source = sources[split]
  n = len(source)
  if not n:
    raise DataError(f"split {split!r} of {builder.name} is empty")
  shard = placement == "sharded" and mesh is not None and mesh.size > 1
  devices = mesh.size if shard else 1
  rows = -(-n // devices) * devices  # padded so every device holds the same number of rows
  keep = _local_rows(mesh, rows) if shard else (0, n)
  first = source[0]["image"]
  images = np.zeros((keep[1] - keep[0],) + first.shape, np.uint8)
  labels = np.empty((n,), np.int64)
  chunk = 4096
  for start in range(0, n, chunk):
    batch = source.__getitems__(list(range(start, min(n, start + chunk))))
    for i, example in enumerate(batch):
      labels[start + i] = example["label"]
      if keep[0] <= start + i < keep[1]:
        images[start + i - keep[0]] = example["image"]
  table, counts, ids = class_table(labels)
  if mesh is None:
    return jax.device_put(DeviceDataset(images=images, class_index=table, class_counts=counts, class_ids=ids))
  replicated = NamedSharding(mesh, P())
  put = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])
  if shard:
    sharding = NamedSharding(mesh, P("data"))
    shape = (rows,) + images.shape[1:]
    image_array = jax.make_array_from_callback(
        shape, sharding, lambda index: _local_block(images, keep[0], index, shape))
  else:
    image_array = put(images)
  return DeviceDataset(images=image_array, class_index=put(table), class_counts=put(counts),
                       class_ids=put(ids), mesh=mesh, sharded=shard)


def _local_rows(mesh, rows: int) -> tuple[int, int]:
  """[first, last) rows of a 'data'-sharded array that this process's devices hold."""
  per_device = rows // mesh.size
  mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  return min(mine) * per_device, (max(mine) + 1) * per_device


def _local_block(images: np.ndarray, offset: int, index, shape) -> np.ndarray:
  """The rows `index` (global slices) asks for, from this process's rows starting at `offset`."""
  start, stop, _ = index[0].indices(shape[0])
  block = images[max(0, start - offset):max(0, stop - offset)]
  if len(block) < stop - start:  # padding rows past the split's end
    block = np.concatenate([block, np.zeros((stop - start - len(block),) + shape[1:], np.uint8)])
  return block


def take_images(dataset: DeviceDataset, idx: jax.Array, scatter: bool = True) -> jax.Array:
  """dataset.images[idx] without moving the dataset: only the gathered images travel.

  Replicated (or unsharded) images: a plain gather on each device. Sharded: in
  shard_map every device gathers the rows of `idx` it holds (zeros elsewhere),
  then the partial results are summed: with `scatter` a reduce-scatter over the
  leading axis of `idx` (the task or batch axis, a multiple of the device
  count), so each device receives just its own tasks' images; otherwise a psum
  (the result replicated on every device).
  """
  if not dataset.sharded:
    return dataset.images[idx]

  def local(images, index):
    n = images.shape[0]
    pos = index - jax.lax.axis_index("data") * n
    mine = (pos >= 0) & (pos < n)
    got = images[jnp.clip(pos, 0, n - 1)]
    got = jnp.where(mine.reshape(mine.shape + (1,) * (got.ndim - mine.ndim)), got, jnp.zeros_like(got))
    if scatter:
      return jax.lax.psum_scatter(got, "data", scatter_dimension=0, tiled=True)
    return jax.lax.psum(got, "data")

  out_spec = P("data") if scatter else P()
  return jax.shard_map(local, mesh=dataset.mesh, in_specs=(P("data"), P()), out_specs=out_spec)(
      dataset.images, idx)


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
    have = f"{kw}={ways} is larger than the {dataset.num_classes} classes of split {split!r}"
    if dataset.num_classes < common.MIN_WAYS:  # no valid ways to advise: say what to add
      raise ConfigError(f"{have}, and a task needs at least {common.MIN_WAYS}: add classes to "
                        f"split {split!r} (more class folders, or data.split_fractions giving it a larger share)")
    raise ConfigError(f"{have}; use {kw} <= {dataset.num_classes}")
  smallest = dataset.min_class_size
  if shots + queries > smallest:
    raise ConfigError(f"{ks} + {kq} = {shots} + {queries} = {shots + queries} is "
                      f"larger than the {smallest} images of the smallest class of split {split!r}; "
                      f"use {ks} + {kq} <= {smallest}")


def _sample_task(key, tables, ways: int, shots: int, queries: int, per_task: bool = False,
                 disjoint: bool = True):
  """One task: N distinct classes, K+Q distinct images per class, labels by class position.

  tables: (class_index, class_counts, class_ids) of a DeviceDataset. per_task:
  the task has Q queries in all (not Q per class), each of a class drawn
  uniformly (an original's one query per task); a class's queries are still
  distinct images. disjoint=False draws queries independently of the supports,
  so a query may repeat a support image (an original's episodes; a small
  optimistic bias). Which original does which: docs/faithful.md.
  """
  class_index, class_counts, class_ids = tables
  class_key, image_key = jax.random.split(key)
  # Random priorities + top_k = sampling without replacement in random order.
  _, classes = jax.lax.top_k(jax.random.uniform(class_key, (class_index.shape[0],)), ways)
  width = class_index.shape[1]

  def pick(k, row):
    scores = jax.random.uniform(k, (width,))
    scores = jnp.where(jnp.arange(width) < class_counts[row], scores, -1.0)
    _, cols = jax.lax.top_k(scores, shots + queries)
    return class_index[row, cols]

  picked = jax.vmap(pick)(jax.random.split(image_key, ways), classes)  # [N, K+Q]
  support_idx = picked[:, :shots].reshape(-1)
  if not disjoint:  # queries from a second, independent draw of each class's images
    redraw = jax.vmap(pick)(jax.random.split(jax.random.fold_in(key, 3), ways), classes)
    picked = jnp.concatenate([picked[:, :shots], redraw[:, :queries]], axis=1)
  labels = jnp.arange(ways, dtype=jnp.int32)
  if per_task:
    query_labels = jax.random.randint(jax.random.fold_in(key, 2), (queries,), 0, ways)
    earlier = jnp.tril(query_labels[:, None] == query_labels[None, :], -1)
    column = shots + earlier.sum(1)  # the j-th query of a class takes that class's j-th spare image
    query_idx = picked[query_labels, column]
  else:
    query_labels = jnp.repeat(labels, queries)
    query_idx = picked[:, shots:].reshape(-1)
  return dict(
      support=support_idx,
      support_labels=jnp.repeat(labels, shots),
      query=query_idx,
      query_labels=query_labels,
      classes=class_ids[classes])


# augment(key, support_u8, support_labels, query_u8, query_labels) -> (support, query) floats, one task.
Augment = Callable[..., tuple[jax.Array, jax.Array]]


def sample_episodes(key, dataset: DeviceDataset, *, tasks: int, ways: int, shots: int, queries: int,
                    augment: Augment | None = None, query_sampling: str = "per_class",
                    disjoint: bool = True) -> Episode:
  """Samples T tasks on the device from one key; see `sample_tasks`."""
  return sample_tasks(jax.random.split(key, tasks), dataset, ways=ways, shots=shots, queries=queries,
                      augment=augment, query_sampling=query_sampling, disjoint=disjoint)


def sample_tasks(task_keys, dataset: DeviceDataset, *, ways: int, shots: int, queries: int,
                 augment: Augment | None = None, query_sampling: str = "per_class",
                 disjoint: bool = True) -> Episode:
  """Samples one task per key and gathers (and augments) its images.

  A task depends only on its key, so evaluation draws the same episodes
  whatever its batch size or device count. `augment(key, support,
  support_labels, query, query_labels)` receives the uint8 images of one task
  (labels allow per-class transforms) and returns float images; None only
  converts to float32 in [0, 1]. query_sampling: 'per_class' (`queries` of
  every class) or 'per_task' (`queries` per task, classes drawn uniformly).
  disjoint=False: queries may repeat supports (see `_sample_task`).
  """
  per_task = query_sampling == "per_task"
  tables = (dataset.class_index, dataset.class_counts, dataset.class_ids)

  def indices(keys, tables):
    return jax.vmap(lambda k: _sample_task(jax.random.fold_in(k, 0), tables, ways, shots, queries, per_task,
                                                     disjoint))(
        keys)

  if dataset.mesh is None:
    idx = indices(task_keys, tables)
    support, query = dataset.images[idx["support"]], dataset.images[idx["query"]]
  elif not dataset.sharded:  # each device samples and gathers its own tasks: nothing moves
    def local(keys, tables, images):
      idx = indices(keys, tables)
      return idx, images[idx["support"]], images[idx["query"]]
    idx, support, query = jax.shard_map(local, mesh=dataset.mesh, in_specs=(P("data"), P(), P()),
                                        out_specs=P("data"))(task_keys, tables, dataset.images)
  else:  # every device computes all tasks' (cheap) indices; only the episode's images move
    idx = jax.shard_map(indices, mesh=dataset.mesh, in_specs=(P(), P()), out_specs=P())(task_keys, tables)
    support, query = take_images(dataset, idx["support"]), take_images(dataset, idx["query"])
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


def episode_shapes(ways: int, shots: int, queries: int, tasks: int, image_shape: tuple[int, ...],
                   query_sampling: str = "per_class") -> Any:
  """Shape-only Episode, for initialising models without sampling."""
  total_queries = queries if query_sampling == "per_task" else ways * queries
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  i = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  return Episode(
      support=f(tasks, ways * shots, *image_shape),
      support_labels=i(tasks, ways * shots),
      query=f(tasks, total_queries, *image_shape),
      query_labels=i(tasks, total_queries),
      classes=i(tasks, ways))
