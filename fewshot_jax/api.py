"""A trained workdir's model from Python: `model = fewshot_jax.load(workdir)`.

    model = fewshot_jax.load("workdirs/run")                  # best checkpoint, the workdir's config.json
    labels, probs = model.predict(support, support_labels, query)   # numpy in, numpy out
    features = model.embed(images)

Images in, either
  * uint8 pixels as image files hold them: an array [n, H, W, C] or a list of [H, W] / [H, W, C] arrays
    of any sizes (C: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA), or files (`read_images`). Each is first made
    what the dataset's builder stores, by the builder's own reading (the record's `read_image`,
    data/image_files.py: orientation, transparency over white, 16-bit, conversion to the dataset's
    channels by the one channel rule, the whole image resized to data.image_size with the builder's
    resampling; an ink dataset's record reads dark ink on light paper, as its scans), then normalised
    and resized on the device by evaluation's own path (augment.from_config(training=False):
    data.mean / data.std, data.input_size, data.center_crop). Or
  * float32 [n, S, S, C], already preprocessed: the model's input (S = data.input_size, normalised), as
    the evaluator's episodes hold it; used as given.
Out: numpy arrays.

`predict` runs one task: N classes (labels 0..N-1, each with >= 1 support; the counts may differ),
the method's checkpoint mode unless `mode` names another of `model.modes`, its noise from
fold_in(eval predict key, 0) (eval.seed) whatever the batching, so results are reproducible and equal
those of evaluation episode 0 given the same images. Queries go in batches of `batch_size` (the last
padded), so a query's prediction does not depend on the others. Every jitted function is built once
per Model and compiled once per input shape: `model.traces` counts the traces.

The CLI, `launch.py --mode=predict` (fewshot_jax/predict.py), is built on this module.
"""

import collections
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from fewshot_jax.data import common
from fewshot_jax.errors import CheckpointError, ConfigError, DataError

DEFAULT_BATCH = 128
_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def workdir_config(workdir: str):
  """<workdir>/config.json (what its checkpoints were made with), keys it predates at their defaults."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from fewshot_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir!r} does not exist")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"workdir {workdir!r} has no config.json: not a trained workdir (train it with "
                          "--mode=train, or give its config with --config=FILE:PRESET)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  return config_lib.fill_missing(ml_collections.ConfigDict(saved), config_lib.base_config())


def apply_overrides(config, overrides: dict | None):
  """`config` with {'eval.seed': 3, ...} set; a key the config lacks is one ConfigError naming the valid ones."""
  config = config.copy_and_resolve_references()
  for key, value in (overrides or {}).items():
    node, parts = config, key.split(".")
    for part in parts[:-1]:
      if part not in node or not hasattr(node[part], "keys"):
        raise ConfigError(f"config key {key!r} does not exist; valid: {sorted(node.keys())}")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"config key {key!r} does not exist; valid: {sorted(node.keys())}")
    with config.unlocked():
      node[parts[-1]] = value
  return config


def load(workdir: str, *, checkpoint: str | None = None, config=None, overrides: dict | None = None) -> "Model":
  """The model of a trained workdir: its best checkpoint (checkpoint='latest': the latest; default
  eval.checkpoint) under its config.json, or under `config` (a ConfigDict, as --config gives), with
  `overrides` ({'eval.seed': 7, 'method.eval_mode': 'mean'}) applied. Errors are FewshotErrors."""
  from fewshot_jax import restore  # pylint: disable=import-outside-toplevel
  from fewshot_jax import sharding  # pylint: disable=import-outside-toplevel
  config = apply_overrides(workdir_config(workdir) if config is None else config, overrides)
  if checkpoint is not None:
    with config.unlocked():
      config.eval.checkpoint = checkpoint
  config, mesh = sharding.setup(config)
  method, state = restore.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  return Model(config, method, state, workdir)


class Model:
  """A restored model and its prediction functions (see the module docstring)."""

  def __init__(self, config, method, state, workdir: str = ""):
    import jax  # pylint: disable=import-outside-toplevel
    from fewshot_jax import evaluate  # pylint: disable=import-outside-toplevel
    from fewshot_jax.data import augment  # pylint: disable=import-outside-toplevel
    from fewshot_jax.data import registry  # pylint: disable=import-outside-toplevel
    from fewshot_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    self.config = config
    self.method = method
    self.workdir = workdir
    self.params, self.model_state = state.params, state.model_state
    self.step = int(state.step)
    self.record = registry.get(config.data.name)
    self.image_size = int(config.data.image_size)
    self.input_size = int(augment.input_size(config))
    self.channels = input_pipeline.channels(config)  # data.channels where the record lets it vary
    self.mode = method.checkpoint_mode(config)  # the default prediction mode
    self.traces = collections.Counter()  # function name -> times traced (= compiled shapes)
    self._jitted = {}
    self._modes = None
    # Evaluation episode 0's prediction noise (evaluate.indexed_keys(predict key, 0, T)[0]).
    self._key = jax.random.fold_in(evaluate.episode_keys(config)[1], 0)

  def __repr__(self):
    return (f"Model({self.method.name} on {self.config.data.name}, step {self.step}, mode {self.mode!r}, "
            f"{self.image_size}px x {self.channels})")

  # ------------------------------------------------------------ modes

  @property
  def modes(self) -> tuple[str, ...]:
    """The method's prediction modes (from the shapes of one pass; nothing is computed)."""
    if self._modes is None:
      import jax  # pylint: disable=import-outside-toplevel
      from fewshot_jax.data import episodes  # pylint: disable=import-outside-toplevel
      shape = episodes.episode_shapes(2, 1, 1, 1, (self.input_size, self.input_size, self.channels))
      keys = jax.ShapeDtypeStruct((1,), jax.random.key(0).dtype)
      out = jax.eval_shape(lambda p, s, e, k: self.method.modes(p, s, e, k), self.params, self.model_state,
                           shape, keys)
      self._modes = tuple(out)
    return self._modes

  def check_mode(self, mode: str | None) -> str:
    """`mode`, or the checkpoint mode when None; one ConfigError when it is not one of `modes`."""
    if mode is None or mode == self.mode:
      return self.mode
    if mode not in self.modes:
      raise ConfigError(f"prediction mode {mode!r} is not one of {self.method.name}'s; valid: {list(self.modes)} "
                        f"(default {self.mode!r})")
    return mode

  # ------------------------------------------------------------ images

  def _read(self, source, where: str) -> np.ndarray:
    """One image as the dataset's builder stores it: its record's read_image (data/image_files.py)."""
    return self.record.read_image(source, where, self.image_size, self.channels)

  def read_images(self, paths: Sequence[str]) -> np.ndarray:
    """Image files (any format PIL reads, any size and mode) -> uint8 [n, S, S, C], each exactly the
    array the dataset's builder stores for that file; an unreadable file is one DataError naming it."""
    out = np.zeros((len(paths), self.image_size, self.image_size, self.channels), np.uint8)
    for i, path in enumerate(paths):
      out[i] = self._read(path, f"image {path}")
    return out

  def prepare(self, images) -> np.ndarray:
    """uint8 images (see the module docstring) -> uint8 [n, S, S, C] as the dataset stores its images;
    float32 [n, S, S, C] preprocessed inputs are checked and returned as they are."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
      want = (self.input_size, self.input_size, self.channels)
      if images.ndim != 4 or images.shape[1:] != want:
        raise DataError(f"float images are taken as preprocessed model inputs [n, {', '.join(map(str, want))}]; "
                        f"got shape {images.shape} (pass uint8 pixels to have them preprocessed)")
      return images.astype(np.float32)
    items = list(images)
    out = np.zeros((len(items), self.image_size, self.image_size, self.channels), np.uint8)
    for i, image in enumerate(items):
      image = np.asarray(image)
      if image.dtype != np.uint8:
        raise DataError(f"image {i} is {image.dtype}: images are uint8 pixels (0..255, any size) or float32 "
                        f"preprocessed model inputs [n, {self.input_size}, {self.input_size}, {self.channels}]")
      if image.ndim == 3 and image.shape[-1] == 1:
        image = image[:, :, 0]
      if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in _ARRAY_MODES)) or 0 in image.shape:
        raise DataError(f"image {i} has shape {image.shape}; expected [H, W] or [H, W, C] with C in 1..4")
      im = Image.fromarray(image, "L" if image.ndim == 2 else _ARRAY_MODES[image.shape[-1]])
      out[i] = self._read(im, f"image {i}")
    return out

  def _check_inputs(self, x: np.ndarray, what: str) -> np.ndarray:
    """A batch as `prepare` returns it: stored uint8 or preprocessed float32."""
    x = np.asarray(x)
    stored = (self.image_size, self.image_size, self.channels)
    model = (self.input_size, self.input_size, self.channels)
    if not ((x.dtype == np.uint8 and x.shape[1:] == stored) or (x.dtype == np.float32 and x.shape[1:] == model)) \
        or x.ndim != 4:
      raise DataError(f"{what}: expected uint8 [n, {', '.join(map(str, stored))}] (Model.prepare / read_images) "
                      f"or float32 [n, {', '.join(map(str, model))}]; got {x.dtype} {x.shape}")
    return x

  def check_labels(self, labels, count: int) -> tuple[np.ndarray, int]:
    """(int32 labels, ways): labels 0..N-1, each class present, 2 <= N <= the method's max_ways."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"support_labels must be {count} integers (one per support image); got {labels.dtype} "
                      f"{labels.shape}")
    ways = int(labels.max()) + 1 if count else 0
    missing = sorted(set(range(ways)) - set(labels.tolist()))
    if labels.min(initial=0) < 0 or missing:
      problem = "negative labels" if labels.min() < 0 else f"no support of class {missing[0]}"
      raise DataError(f"support_labels must be 0..N-1 with every class present; {problem}")
    common.check_ways(ways, "the supports hold", DataError)
    if self.method.max_ways is not None and ways > self.method.max_ways:
      raise ConfigError(f"{ways} classes are more than {self.method.name} takes in one task (at most "
                        f"{self.method.max_ways})")
    return labels.astype(np.int32), ways

  # ------------------------------------------------------------ jitted functions

  def _model_input(self, x, ways: int, key):
    """On the device: stored uint8 -> evaluation's augmentation (normalise, resize, centre crop);
    float32 -> as given."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from fewshot_jax.data import augment  # pylint: disable=import-outside-toplevel
    if x.dtype != jnp.uint8:
      return x
    aug = augment.from_config(self.config, ways, training=False)
    labels = jnp.zeros((x.shape[0],), jnp.int32)
    return aug(key, x, labels, x, labels)[0]  # the duplicate query half is dead code under jit

  def _predict_fn(self, mode: str):
    if ("predict", mode) not in self._jitted:
      import jax  # pylint: disable=import-outside-toplevel
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      from fewshot_jax.data import episodes  # pylint: disable=import-outside-toplevel
      method, default = self.method, mode == self.mode

      def predict(params, state, support, support_labels, query, classes, key):
        self.traces["predict"] += 1
        ways = classes.shape[0]
        s, q = self._model_input(support, ways, key), self._model_input(query, ways, key)
        episode = episodes.Episode(support=s[None], support_labels=support_labels[None], query=q[None],
                                   query_labels=jnp.zeros((1, q.shape[0]), jnp.int32), classes=classes[None])
        keys = key[None]
        scores = (method.predict(params, state, episode, keys) if default
                  else method.modes(params, state, episode, keys)[mode])[0]
        return jnp.argmax(scores, -1), method.class_probabilities(mode, scores)

      self._jitted[("predict", mode)] = jax.jit(predict)
    return self._jitted[("predict", mode)]

  def _embed_fn(self):
    if "embed" not in self._jitted:
      import jax  # pylint: disable=import-outside-toplevel
      if self.method.embed is None:
        raise ConfigError(f"{self.method.name} has no shared network to embed images with")

      def embed(params, state, images, key):
        self.traces["embed"] += 1
        return self.method.embed(params, state, self._model_input(images, 1, key))

      self._jitted["embed"] = jax.jit(embed)
    return self._jitted["embed"]

  # ------------------------------------------------------------ prediction

  def predict_batches(self, support, support_labels, query_batches: Iterable[np.ndarray], *, mode: str | None = None,
                      batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels [b], probabilities [b, N]) of each batch of `query_batches` (each as `prepare` returns,
    at most `batch_size` images; padded to it, so one compiled shape serves all). `support` as `prepare`
    returns. A batch is decoded (the iterable advanced) while the device predicts the one before."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    mode = self.check_mode(mode)
    support = self._check_inputs(support, "support images")
    labels, ways = self.check_labels(support_labels, len(support))
    fn = self._predict_fn(mode)
    s, y, classes = jnp.asarray(support), jnp.asarray(labels), jnp.arange(ways, dtype=jnp.int32)
    pending = None
    for batch in query_batches:
      batch = self._check_inputs(batch, "query images")
      n = len(batch)
      if not 0 < n <= batch_size:
        raise ValueError(f"a query batch of {n} images; expected 1..{batch_size}")
      padded = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
      out = fn(self.params, self.model_state, s, y, jnp.asarray(padded), classes, self._key)  # dispatched
      if pending is not None:
        yield _fetch(*pending)
      pending = (out, n)
    if pending is not None:
      yield _fetch(*pending)

  def predict(self, support_images, support_labels, query_images, *, mode: str | None = None,
              batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(labels [Q] int, probabilities [Q, N] float32) of the queries of one task.

    support_labels: [S] ints, 0..N-1, every class at least once. mode: one of `modes` (default: the
    checkpoint mode). Queries go `batch_size` (or all, when fewer) per compiled call."""
    support = self.prepare(support_images)
    query = self.prepare(query_images)
    if not len(query):
      raise DataError("no query images")
    batch = max(1, min(int(batch_size), len(query)))
    batches = (query[i:i + batch] for i in range(0, len(query), batch))
    outs = list(self.predict_batches(support, support_labels, batches, mode=mode, batch_size=batch))
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

  def embed(self, images, *, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """The method's shared-network features [n, ...] of the images: Method.embed, which each method's
    file documents (a backbone's features, or the task-independent part of a network whose final
    embedding depends on the task)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    x = self.prepare(images)
    fn = self._embed_fn()
    if not len(x):
      raise DataError("no images to embed")
    batch = max(1, min(int(batch_size), len(x)))
    outs = []
    for i in range(0, len(x), batch):
      part = x[i:i + batch]
      padded = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], part.dtype)])
      outs.append((fn(self.params, self.model_state, jnp.asarray(padded), self._key), len(part)))
    return np.concatenate([np.asarray(o)[:n] for o, n in outs])


def _fetch(out, n: int):
  labels, probs = out
  return np.asarray(labels)[:n].astype(np.int64), np.asarray(probs, np.float32)[:n]
