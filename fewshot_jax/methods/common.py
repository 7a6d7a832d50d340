"""Pieces shared by methods: the Method record, episode flattening, metric helpers."""

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Method:
  """A few-shot method as pure functions, and what entry points need to know about it.

  init(key, episode) -> variables {'params': ..., 'batch_stats': ...}
  loss(params, state, episode, key) -> (loss, (metrics, new_state)); state is
    the non-trainable collections (BatchNorm statistics), updated in training.
  predict(params, state, episode, keys) -> logits [T, N*Q, N]; keys [T]: one PRNG key per task (the
    evaluator's fold_in(predict key, episode index)), so that a task's prediction noise does not
    depend on the batch, device or process it is predicted in.
  optimizer(config) -> optax transformation, or None for the trainer's default
    (a method whose optimiser ignores train.* lists those keys as UNUSED_TRAIN_KEYS in its
    module, so that setting one is an error rather than silently ignored);
    learning_rate(config) -> the schedule the trainer logs as `lr` and names in a divergence
    error, for a method whose optimiser does not read train.lr (None: train.*'s).
  Optional hooks, for methods whose training is not plain episodes:
  train_batch(key, dataset) -> the batch `loss` trains on (default: episodes of
    config.episode.*); train_example() -> its shapes, for init.
  setup(variables, train_dataset) -> variables: once, on a fresh (not resumed)
    run, after init: load pretrained weights, build a gallery.
  For evaluation and the PyTorch entry points (compare, export, convert):
  predict_all_modes(params, state, episode, keys) -> {mode: logits}, every
    prediction mode from one pass (None: the one mode 'default' = predict);
    eval_mode(config) -> the mode that selects checkpoints and heads eval_<split>.json (a
    function of the config the evaluation runs under: the method's own knob; None: 'default').
  figures: Figures written beside an evaluation, or None.
  For prediction on users' images (fewshot_jax.load, --mode=predict):
  embed(params, state, images) -> features [B, ...] of preprocessed images: the shared network's
    evaluation-mode output (None: the method has none to offer);
  probabilities(mode, scores [..., N]) -> [..., N], the class probabilities of a mode's scores
    (None: softmax of the scores, which are logits or log-probabilities);
  max_ways: the most classes one task may have (None: any number).
  protocols: {name: Protocol}, the method's own evaluation protocols beside the shared
    STANDARD_PROTOCOL (evaluate.py); eval.protocol names one of them (checked by config.validate).
  The optional PyTorch bridge is methods/<name>_torch.py (see methods.torch_bridge).
  """

  name: str
  init: Callable[..., Any]
  loss: Callable[..., Any]
  predict: Callable[..., Any]
  optimizer: Callable[..., Any] | None = None
  train_batch: Callable[..., Any] | None = None
  train_example: Callable[..., Any] | None = None
  setup: Callable[..., Any] | None = None
  predict_all_modes: Callable[..., Any] | None = None
  eval_mode: Callable[..., str] | None = None
  figures: "Figures | None" = None
  learning_rate: Callable[..., Any] | None = None
  embed: Callable[..., Any] | None = None
  probabilities: Callable[..., Any] | None = None
  max_ways: int | None = None
  protocols: Mapping[str, "Protocol"] = dataclasses.field(default_factory=dict)

  def modes(self, params, state, episode, keys) -> dict:
    """{mode: logits [T, N*Q, N]} for every prediction mode (keys: [T], one per task)."""
    if self.predict_all_modes is not None:
      return self.predict_all_modes(params, state, episode, keys)
    return {"default": self.predict(params, state, episode, keys)}

  def checkpoint_mode(self, config) -> str:
    """The prediction mode that selects checkpoints under `config`."""
    return "default" if self.eval_mode is None else self.eval_mode(config)

  def class_probabilities(self, mode: str, scores):
    """Class probabilities [..., N] of a mode's scores [..., N] (`probabilities`, or their softmax)."""
    if self.probabilities is not None:
      return self.probabilities(mode, scores)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class Figures:
  """Figures an evaluation writes: `compute(params, state, episode, keys)` runs on the device (jitted
  by the evaluator on its first eval.tasks episodes, one query per class), `write(data, workdir,
  split, title)` on the host of every process (drawing on process 0 only) and returns the entries it
  adds to the evaluation result (e.g. {'figure': path})."""

  compute: Callable[..., Any]
  write: Callable[..., dict]


# The evaluation protocol every method has (evaluate.py): eval.episodes episodes of eval.queries
# queries per class, no augmentation. A method adds its own as Method.protocols.
STANDARD_PROTOCOL = "standard"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """An evaluation protocol: `sampling(config)` -> the keyword arguments of episodes.sample_tasks
  (input_pipeline.episode_sampling's), `episodes(config)` -> how many episodes --mode=eval scores."""

  sampling: Callable[..., dict]
  episodes: Callable[..., int]


def flatten_images(episode):
  """Support and query images of all tasks as one batch (shared networks run once).

  Concatenated task by task ([T, S + Q, ...] -> [T * (S + Q), ...]), so the
  batch stays sharded on the task axis: concatenating all supports and then
  all queries would make every device gather the other devices' images.
  `split(features)` -> (support [T, S, ...], query [T, Q, ...]).
  """
  t, s = episode.support.shape[:2]
  q = episode.query.shape[1]
  images = jnp.concatenate([episode.support, episode.query], axis=1)
  images = images.reshape((t * (s + q),) + images.shape[2:])

  def split(features):
    features = features.reshape((t, s + q) + features.shape[1:])
    return features[:, :s], features[:, s:]

  return images, split


def apply_backbone(model, params, state, images, train: bool):
  """Runs a Flax backbone; in training returns the updated BatchNorm statistics."""
  variables = {"params": params, **state}
  if train and state:
    features, new_state = model.apply(variables, images, train=True, mutable=list(state))
    return features, new_state
  return model.apply(variables, images, train=train), state


def prototypes(support, labels, ways: int):
  """Class means of one task's support embeddings [S, D] -> [N, D]."""
  onehot = jax.nn.one_hot(labels, ways, dtype=support.dtype)
  return (onehot.T @ support) / onehot.sum(0)[:, None]


def squared_distances(a, b):
  """||a_i - b_j||^2 for a [M, D], b [N, D].

  Summed differences rather than a^2 + b^2 - 2ab: the expansion cancels
  catastrophically when distances are small next to the norms (ResNet
  features: distances in the hundreds drifted ~1e-3 from PyTorch's), and
  few-shot M x N x D is small enough that the direct form costs nothing.
  """
  return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), -1)


def top_k_indices(x, k: int):
  """Indices of the k largest entries of the last axis, as lax.top_k's (ties: lower index first).

  A stable sort: XLA partitions a sort along its batch axes, where it gathers
  the whole operand of a TopK to every device.
  """
  return jnp.argsort(-x, axis=-1, stable=True)[..., :k]


def classification_metrics(logits, labels):
  """Mean cross-entropy and accuracy over all tasks and queries."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}


def metric_method(name: str, model, head: Callable[..., Any], **hooks) -> Method:
  """A method that embeds all images with one backbone and scores each task with `head`.

  head(support [S, D], support_labels [S], query [Q, D], ways) -> logits [Q, N],
  vmapped over tasks; the backbone runs once on the flattened meta-batch.
  `hooks`: further Method fields (e.g. torch_bridge).
  """

  def logits_fn(params, state, episode, train):
    ways = episode.classes.shape[1]
    images, split = flatten_images(episode)
    features, new_state = apply_backbone(model, params, state, images, train)
    support, query = split(features)
    task = lambda s, labels, q: head(s, labels, q, ways)
    return jax.vmap(task)(support, episode.support_labels, query), new_state

  def init(key, episode):
    images, _ = flatten_images(episode)
    return model.init(key, images, train=False)

  def loss(params, state, episode, key):
    del key
    logits, new_state = logits_fn(params, state, episode, True)
    value, metrics = classification_metrics(logits, episode.query_labels)
    return value, (metrics, new_state)

  def predict(params, state, episode, key):
    del key
    return logits_fn(params, state, episode, False)[0]

  def embed(params, state, images):
    return apply_backbone(model, params, state, images, False)[0]

  return Method(name, init, loss, predict, embed=embed, **hooks)
