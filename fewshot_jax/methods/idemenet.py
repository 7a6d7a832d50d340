"""IDeMe-Net stage 2 (Chen et al., CVPR 2019): meta-learn image deformations.

Per task: the embedding E (ResNet-18, BatchNorm frozen) embeds real supports
and queries; each class's prototype picks its `choose_num` nearest gallery
images (the gallery: `gallery_per_class` base-class images per class, chosen
once, embedded once by the stage-1 E, kept in the model state so checkpoints
carry it); every support gets `augnum` deformed copies: probe = the support,
flipped with probability `probe_flip`, gallery = a uniformly chosen candidate,
deformed = W * probe + (1 - W) * gallery with W the deformation net D's G x G
patch weights. Prototypes average real and deformed supports; logits are
-scale * squared distance.

Two losses, each updating only its own parameters (the reference's separate
optimisers), in one backward pass:
  prototype loss -> D and scale: E's parameters enter it through stop_gradient,
    so its gradient reaches D through E's activations but never E itself;
  classification loss (64-way fc, the probe's base class) -> E and fc, over
    the real supports and their deformed copies (`cls_images='all'`, the
    reference) or the deformed copies only ('deformed'): the deformed images
    enter it through stop_gradient. It is
    computed only when E trains (method.fix_embedding=False) and its updates
    start at method.cls_start_step (the reference skips the first epoch).
optax.multi_transform gives each group its learning rate; a fixed group
(fix_embedding / fix_deformation, for alternating rounds) gets set_to_zero.

Everything (candidate choice, fusion, both embeddings) is inside the jitted
step: E and D run once on the images of all tasks and copies flattened; the
per-task parts are vmapped over the task axis.

Prediction modes: 'deformed' (prototypes with the deformed supports, the
method) and 'plain' (real supports only: the same embedding as a prototype
baseline, the ablation), both from one pass on the same episodes.

build() assembles the Method record from the module-level functions below, each
taking (config, nets, ...) first: `networks(config)` makes E and D once. The
evaluation figure is methods/idemenet_figures.py's.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fewshot_jax import checkpoint
from fewshot_jax.errors import CheckpointError, ConfigError
from fewshot_jax.data import augment
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.data import registry
from fewshot_jax.methods import common
from fewshot_jax.methods import idemenet_figures
from fewshot_jax.models import backbones
from fewshot_jax.models import deformation as deform_lib
from fewshot_jax.models import layers
from fewshot_jax.models.resnet import ResNet18

EVAL_MODES = ("deformed", "plain")


@dataclasses.dataclass(frozen=True)
class IDeMeNetMethod(common.Method):
  """common.Method plus `deform` (probe, gallery, weights, deformed), for figures and compare."""

  deform: Callable[..., Any] | None = None


BACKBONES = ("resnet18",)  # model.backbone: E is a ResNet-18
KEYS = ("grid", "augnum", "choose_num", "gallery_per_class", "gallery_seed", "num_classes", "probe_flip",
         "gallery_flip", "gallery_bn", "gallery_bn_chunk", "cls_images", "decay_scale",
         "pretrained", "fix_embedding", "fix_deformation", "lr_deformation", "lr_scale", "lr_embedding",
         "lr_fc", "cls_start_step", "decay_every", "decay_factor", "eval_mode", "scale_init")
# make_optimizer reads method.lr_* / decay_* only: these train.* keys must keep their defaults.
UNUSED_TRAIN_KEYS = ("optimizer", "lr", "schedule", "decay_every", "decay_factor", "min_lr", "warmup_steps",
                     "weight_decay", "grad_clip")
GALLERY_BN = ("train", "eval")
CLS_IMAGES = ("all", "deformed")


def check_config(config: ml_collections.ConfigDict) -> None:
  mc = config.method
  if mc.grid not in (3, 5, 7):
    raise ConfigError(f"method.grid={mc.grid!r} is not supported; valid: [3, 5, 7]")
  for key in ("augnum", "choose_num", "gallery_per_class", "num_classes", "decay_every", "gallery_bn_chunk"):
    if not isinstance(mc[key], int) or mc[key] < 1:
      raise ConfigError(f"method.{key}={mc[key]!r} must be a positive integer")
  if mc.choose_num > mc.gallery_per_class * mc.num_classes:
    raise ConfigError(f"method.choose_num={mc.choose_num} exceeds the gallery's "
                      f"{mc.gallery_per_class * mc.num_classes} images")
  if mc.eval_mode not in EVAL_MODES:
    raise ConfigError(f"method.eval_mode={mc.eval_mode!r} is unknown; valid: {list(EVAL_MODES)}")
  for key in ("probe_flip", "gallery_flip"):
    if not 0.0 <= mc[key] <= 1.0:
      raise ConfigError(f"method.{key}={mc[key]} must lie in [0, 1]")
  if mc.gallery_bn not in GALLERY_BN:
    raise ConfigError(f"method.gallery_bn={mc.gallery_bn!r} is unknown; valid: {list(GALLERY_BN)}")
  if mc.cls_images not in CLS_IMAGES:
    raise ConfigError(f"method.cls_images={mc.cls_images!r} is unknown; valid: {list(CLS_IMAGES)}")
  if mc.fix_embedding and mc.fix_deformation:
    raise ConfigError("method.fix_embedding and method.fix_deformation are both True: nothing but "
                      "the scale would train")
  check_rgb(config)


def check_rgb(config: ml_collections.ConfigDict) -> None:
  """RGB images and statistics (empty: the data's own, filled in later); a generated dataset (no files:
  run to exercise the code) takes any."""
  channels = input_pipeline.channels(config)
  if not registry.get(config.data.name).generated and (channels != 3 or len(config.data.mean) not in (0, 3)):
    raise ConfigError(f"IDeMe-Net runs on RGB datasets; data.name={config.data.name!r} has "
                      f"{channels if channels != 3 else len(config.data.mean)} channel(s)")


def embedding_model(config: ml_collections.ConfigDict) -> ResNet18:
  """E: ResNet-18 in torchvision layout with the 64-way fc head."""
  return ResNet18(num_classes=config.method.num_classes, dtype=backbones.dtype_from_config(config),
                  conv_general_dilated=layers.conv_function(config.model.conv_impl),
                  remat=backbones.remat_from_config(config))


input_size = augment.input_size


def preprocess(config, images_u8):
  """uint8 [..., h, w, C] -> normalised float [..., S, S, C] at the model's input size (and centre crop)."""
  return augment.resize(augment.normalise(images_u8, config.data.mean, config.data.std), input_size(config),
                        config.data.center_crop)


def embed_batched(model, variables, images_u8, config, batch: int = 128):
  """E's eval-mode features of many uint8 images, `batch` at a time (bounded memory)."""
  apply = jax.jit(lambda x: model.apply(variables, preprocess(config, x), train=False)[0])
  return jnp.concatenate([apply(images_u8[i:i + batch]) for i in range(0, len(images_u8), batch)])


def train_mode_features(model, variables, images, momentum: float):
  """E's features of one chunk with BatchNorm in training mode, and the running statistics after it.

  The statistics follow PyTorch's update, which the gallery pass of the
  reference runs: running = momentum * running + (1 - momentum) * batch, with
  the batch variance unbiased (n / (n - 1), n = images x height x width of that
  layer); Flax's own update uses the biased one, so each variance is corrected
  by the count its BatchNorm saw.
  """
  counts = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, flax.linen.BatchNorm) and context.method_name == "__call__":
      counts[context.module.path] = args[0].size // args[0].shape[-1]
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    (features, _), new = model.apply(variables, images, train=True, mutable=["batch_stats"])
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  stats = flax.traverse_util.flatten_dict(new["batch_stats"])
  for path, value in stats.items():
    if path[-1] == "var":
      n = counts[path[:-1]]
      stats[path] = value + (value - momentum * old[path]) / (n - 1)
  return features, flax.traverse_util.unflatten_dict(stats)


def gallery_features(model, variables, images_u8, config):
  """(features [G, 512], E's batch_stats after the pass) of the class-sorted gallery images.

  method.gallery_bn 'eval': running statistics, unchanged. 'train' (the
  reference): chunks of method.gallery_bn_chunk images in order, each
  normalised by its own batch statistics, each moving the running statistics.
  """
  mc = config.method
  chunk = mc.gallery_bn_chunk
  if mc.gallery_bn == "eval":
    return embed_batched(model, variables, images_u8, config, chunk), variables["batch_stats"]
  step = jax.jit(lambda params, stats, x: train_mode_features(
      model, {"params": params, "batch_stats": stats}, preprocess(config, x), model.bn_momentum))
  stats, features = variables["batch_stats"], []
  for i in range(0, len(images_u8), chunk):
    f, stats = step(variables["params"], stats, images_u8[i:i + chunk])
    features.append(f)
  return jnp.concatenate(features), stats


def choose_gallery(class_index: np.ndarray, class_counts: np.ndarray, per_class: int, seed: int):
  """Image indices [num_classes * per_class] and base labels: `per_class` images per class, from `seed`."""
  rng = np.random.default_rng(seed)
  idx, labels = [], []
  for c, (row, count) in enumerate(zip(class_index, class_counts)):
    if count < per_class:
      raise ConfigError(f"method.gallery_per_class={per_class} exceeds the {count} images of base class {c}")
    idx.append(row[rng.choice(count, per_class, replace=False)])
    labels.append(np.full(per_class, c, np.int32))
  return np.concatenate(idx), np.concatenate(labels)


def attach_gallery(config, variables, train_dataset):
  """variables + model-state 'gallery': the chosen base-class images and their features under E.

  Features are computed once (`gallery_features`) and never refreshed, as the
  reference; under gallery_bn='train' E's batch_stats in the returned variables
  are the recalibrated ones. `variables` needs E's params and batch_stats under
  'embedding'.
  """
  mc = config.method
  if train_dataset.num_classes != mc.num_classes:
    raise ConfigError(f"method.num_classes={mc.num_classes} but split {config.data.train_split!r} has "
                      f"{train_dataset.num_classes} base classes")
  idx, labels = choose_gallery(np.asarray(train_dataset.class_index), np.asarray(train_dataset.class_counts),
                               mc.gallery_per_class, mc.gallery_seed)
  images = jax.jit(lambda ds, i: episodes.take_images(ds, i, scatter=False))(train_dataset, idx)
  e_vars = {"params": variables["params"]["embedding"], "batch_stats": variables["batch_stats"]["embedding"]}
  features, e_stats = gallery_features(embedding_model(config), e_vars, images, config)
  batch_stats = {**variables["batch_stats"], "embedding": e_stats}
  return {**variables, "batch_stats": batch_stats,
          "gallery": {"images": images, "labels": jnp.asarray(labels), "features": features}}


def gallery_candidates(support_feats, support_labels, gallery_feats, ways: int, k: int):
  """[N, k] indices of the k gallery images nearest (squared Euclidean) to each class prototype."""
  protos = common.prototypes(support_feats, support_labels, ways)
  return common.top_k_indices(-common.squared_distances(protos, gallery_feats), k)


def load_pretrained(workdir: str, which: str = "best") -> dict:
  """{'params': ..., 'batch_stats': ...} of what a workdir holds, by part name.

  A stage-1 workdir ('idemenet_pretrain', or --mode=convert of softRandom.t7)
  gives E ('embedding'); a stage-2 workdir ('idemenet', or a converted
  metaNet_*.t7) gives the whole GNet: E with fc, D ('deformation') and 'scale',
  round 2 of the published recipe. The arrays are read as saved; setup checks
  that each part fits this config.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"method.pretrained={workdir!r} has no config.json; point it at the workdir of "
                      "a configs/idemenet.py run (pretrain or mini-*) or of --mode=convert")
  with open(path) as f:
    name = json.load(f).get("method", {}).get("name")
  if name not in ("idemenet_pretrain", "idemenet"):
    raise CheckpointError(f"method.pretrained={workdir!r} holds a {name!r} run, not an IDeMe-Net "
                          "'idemenet_pretrain' (stage 1) or 'idemenet' (stage 2) one")
  saved = checkpoint.read_as_saved(workdir, which)
  as_jax = lambda tree: jax.tree.map(jnp.asarray, dict(tree))
  if name == "idemenet_pretrain":
    return {"params": {"embedding": as_jax(saved["params"])},
            "batch_stats": {"embedding": as_jax(saved["model_state"]["batch_stats"])}}
  return {"params": as_jax(saved["params"]), "batch_stats": as_jax(saved["model_state"]["batch_stats"])}


def _schedule(config, lr):
  mc = config.method
  return optax.exponential_decay(lr, mc.decay_every, mc.decay_factor, staircase=True)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam per parameter group with the reference rates; fixed groups get zero updates."""
  mc = config.method
  embedding = optax.adam(_schedule(config, mc.lr_embedding))
  fc = optax.adam(_schedule(config, mc.lr_fc))
  # The classification loss starts at cls_start_step: before it, E and fc get
  # zero updates and their Adam moments are not fed (their schedules therefore
  # count from cls_start_step).
  start = lambda tx: optax.conditionally_mask(tx, lambda step: step >= mc.cls_start_step)
  transforms = {
      "deformation": optax.set_to_zero() if mc.fix_deformation else optax.adam(_schedule(config, mc.lr_deformation)),
      # The reference's scale optimiser has no scheduler (decay_scale=False).
      "scale": optax.adam(_schedule(config, mc.lr_scale) if mc.decay_scale else mc.lr_scale),
      "embedding": optax.set_to_zero() if mc.fix_embedding else start(embedding),
      "fc": optax.set_to_zero() if mc.fix_embedding else start(fc),
  }

  def labels(params):
    out = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items() if k != "embedding"}
    out["embedding"] = {name: jax.tree.map(lambda _, n=name: "fc" if n == "fc" else "embedding", sub)
                        for name, sub in params["embedding"].items()}
    return out

  return optax.multi_transform(transforms, labels)


class Nets(NamedTuple):
  """E and D of one config (Flax modules: their description, no parameters)."""

  embedding: ResNet18
  deformation: deform_lib.DeformationNet


def deformation_model(config: ml_collections.ConfigDict) -> deform_lib.DeformationNet:
  """D: probe + gallery image pairs (6 channels) -> method.grid x method.grid patch weights."""
  return deform_lib.DeformationNet(grid=config.method.grid, dtype=backbones.dtype_from_config(config),
                                   conv_general_dilated=layers.conv_function(config.model.conv_impl),
                                   remat=backbones.remat_from_config(config))


def networks(config: ml_collections.ConfigDict) -> Nets:
  return Nets(embedding_model(config), deformation_model(config))


def apply_embedding(nets: Nets, params_e, state, images):
  """E in evaluation mode (BatchNorm frozen throughout stage 2): (features [B, 512], fc logits)."""
  return nets.embedding.apply({"params": params_e, "batch_stats": state["batch_stats"]["embedding"]}, images,
                              train=False)


def apply_deformation(nets: Nets, params, state, pairs):
  """D in evaluation mode: pairs [B, S, S, 6] -> patch weights [B, G*G]."""
  return nets.deformation.apply({"params": params["deformation"],
                                 "batch_stats": state["batch_stats"]["deformation"]}, pairs, train=False)


def init(config: ml_collections.ConfigDict, nets: Nets, key, episode) -> dict:
  """Method.init: E, D, the scale, and an empty gallery of the shapes setup fills."""
  mc = config.method
  size = input_size(config)
  n_gallery = mc.gallery_per_class * mc.num_classes
  raw_shape = (config.data.image_size, config.data.image_size, 3)
  e_key, d_key = jax.random.split(key)
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  e_vars = nets.embedding.init(e_key, image, train=False)
  d_vars = nets.deformation.init(d_key, jnp.zeros((1, size, size, 6), jnp.float32), train=False)
  gallery = {"images": jnp.zeros((n_gallery,) + raw_shape, jnp.uint8),
             "labels": jnp.zeros((n_gallery,), jnp.int32),
             "features": jnp.zeros((n_gallery, 512), jnp.float32)}
  return {"params": {"embedding": e_vars["params"], "deformation": d_vars["params"],
                     "scale": jnp.asarray(mc.scale_init, jnp.float32)},
          "batch_stats": {"embedding": e_vars["batch_stats"], "deformation": d_vars["batch_stats"]},
          "gallery": gallery}


def load_into(config: ml_collections.ConfigDict, variables) -> dict:
  """`variables` with every part method.pretrained's workdir holds (load_pretrained), each checked
  to fit this config."""
  mc = config.method
  if not mc.pretrained:
    raise ConfigError("method.pretrained is empty; set it to the workdir of the stage-1 run "
                      "(configs/idemenet.py:pretrain) or of --mode=convert")
  loaded = load_pretrained(mc.pretrained)
  if mc.fix_deformation and "deformation" not in loaded["params"]:
    raise ConfigError(f"method.fix_deformation=True but method.pretrained={mc.pretrained!r} is a stage-1 "
                      "workdir with no trained D: D would stay frozen at its random init; point "
                      "method.pretrained at a stage-2 workdir (or a converted metaNet_*.t7), or set "
                      "method.fix_deformation=False")
  variables = flax.core.unfreeze(variables)
  for collection in ("params", "batch_stats"):
    for part, value in loaded[collection].items():
      if jax.tree.map(jnp.shape, value) != jax.tree.map(jnp.shape, variables[collection][part]):
        raise CheckpointError(f"method.pretrained={mc.pretrained!r}: its {part!r} does not fit this config "
                              f"(ResNet-18 with a {mc.num_classes}-way fc, a {mc.grid}x{mc.grid} grid)")
      variables[collection][part] = value
  return variables


def setup(config: ml_collections.ConfigDict, variables, train_dataset) -> dict:
  """Method.setup: the pretrained parts, then the gallery of the train split."""
  return attach_gallery(config, load_into(config, variables), train_dataset)


def task_deform_inputs(mc, key, support, support_labels, support_feats, ways: int, gallery):
  """One task: probes [S, A, ...], the chosen gallery indices [S, A] and their flips [S, A]."""
  candidates = gallery_candidates(support_feats, support_labels, gallery["features"], ways, mc.choose_num)
  s = support.shape[0]
  pick_key, flip_key = jax.random.split(key)
  pick = jax.random.randint(pick_key, (s, mc.augnum), 0, mc.choose_num)
  gallery_idx = candidates[support_labels[:, None], pick]  # [S, A]
  flip = jax.random.bernoulli(flip_key, mc.probe_flip, (s, mc.augnum, 1, 1, 1))
  probe = jnp.where(flip, support[:, None, :, ::-1], support[:, None])  # [S, A, H, W, C]
  gallery_flip = jax.random.bernoulli(jax.random.fold_in(key, 2), mc.gallery_flip, (s, mc.augnum))
  return probe, gallery_idx, gallery_flip


def deform(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys, real_support_feats=None):
  """(probe, gallery, weights, deformed): [T, S, A, ...] each; weights [T, S, A, G*G]. keys: [T], one
  per task, so a task's gallery picks and flips do not depend on the batch it is in."""
  mc = config.method
  size, grid, augnum = input_size(config), mc.grid, mc.augnum
  t, s = episode.support.shape[:2]
  ways = episode.classes.shape[1]
  gallery = state["gallery"]
  if real_support_feats is None:
    flat = episode.support.reshape((t * s,) + episode.support.shape[2:])
    real_support_feats = apply_embedding(nets, params["embedding"], state, flat)[0].reshape(t, s, -1)
  probe, gallery_idx, gallery_flip = jax.vmap(
      lambda k, x, y, f: task_deform_inputs(mc, k, x, y, f, ways, gallery))(
          keys, episode.support, episode.support_labels, real_support_feats)
  gallery_images = preprocess(config, gallery["images"][gallery_idx])  # [T, S, A, H, W, C]
  # Flipping after the (symmetric) resize and centre crop equals the reference's flip before them.
  gallery_images = jnp.where(gallery_flip[..., None, None, None], gallery_images[..., ::-1, :], gallery_images)
  pairs = jnp.concatenate([probe, gallery_images], axis=-1).reshape((t * s * augnum, size, size, 6))
  weights = apply_deformation(nets, params, state, pairs).reshape(t, s, augnum, grid * grid)
  wmap = deform_lib.weight_map(weights, size, grid)  # [T, S, A, H, W, 1]
  return probe, gallery_images, weights, deform_lib.fuse(probe, gallery_images, wmap)


def mode_logits(scale, support_feats, support_labels, deformed_feats, deformed_labels, query_feats, ways: int):
  """{'deformed': prototypes of the real and deformed supports, 'plain': of the real ones}: logits
  -scale * squared distance [T, Q, N] of every task."""

  def logits(sf, sl, qf):
    return -scale * common.squared_distances(qf, common.prototypes(sf, sl, ways))

  all_feats = jnp.concatenate([support_feats, deformed_feats], axis=1)
  all_labels = jnp.concatenate([support_labels, deformed_labels], axis=1)
  return {"deformed": jax.vmap(logits)(all_feats, all_labels, query_feats),
          "plain": jax.vmap(logits)(support_feats, support_labels, query_feats)}


def classification_loss(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, deformed,
                        deformed_labels):
  """Cross-entropy of E's fc on the deformed copies (and, cls_images='all', the real supports), each
  labelled with its probe's base class; the images enter through stop_gradient."""
  size = input_size(config)
  t, s = episode.support.shape[:2]
  cls_images = jax.lax.stop_gradient(deformed).reshape((t, s * config.method.augnum, size, size, 3))
  cls_labels = deformed_labels
  if config.method.cls_images == "all":  # the real supports too: the reference's 1 + augnum images per support
    cls_images = jnp.concatenate([episode.support, cls_images], axis=1)  # per task: stays task-sharded
    cls_labels = jnp.concatenate([episode.support_labels, cls_labels], axis=1)
  _, fc_logits = apply_embedding(nets, params["embedding"], state, cls_images.reshape((-1, size, size, 3)))
  base = jnp.take_along_axis(episode.classes, cls_labels, axis=1).reshape(-1)
  return optax.softmax_cross_entropy_with_integer_labels(fc_logits, base).mean()


def forward(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys, with_cls: bool):
  """Per-mode logits [T, Q, N] and, when with_cls, the classification loss."""
  mc = config.method
  size, augnum = input_size(config), mc.augnum
  t, s = episode.support.shape[:2]
  ways = episode.classes.shape[1]
  frozen_e = jax.lax.stop_gradient(params["embedding"])
  images, split = common.flatten_images(episode)
  support_feats, query_feats = split(apply_embedding(nets, frozen_e, state, images)[0])
  _, _, _, deformed = deform(config, nets, params, state, episode, keys, support_feats)
  if mc.fix_deformation:
    deformed = jax.lax.stop_gradient(deformed)
  flat_deformed = deformed.reshape((t * s * augnum, size, size, 3))
  deformed_feats = apply_embedding(nets, frozen_e, state, flat_deformed)[0].reshape(t, s * augnum, -1)
  deformed_labels = jnp.repeat(episode.support_labels, augnum, axis=1)  # support-major, as the reshape
  out = mode_logits(params["scale"], support_feats, episode.support_labels, deformed_feats, deformed_labels,
                    query_feats, ways)
  cls = None
  if with_cls:
    cls = classification_loss(config, nets, params, state, episode, deformed, deformed_labels)
  return out, cls


def loss(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, key):
  """Method.loss: the prototype loss of the 'deformed' mode, plus the classification loss while E trains."""
  keys = jax.random.split(key, episode.support.shape[0])
  out, cls = forward(config, nets, params, state, episode, keys, with_cls=not config.method.fix_embedding)
  proto, metrics = common.classification_metrics(out["deformed"], episode.query_labels)
  metrics["plain_accuracy"] = jnp.mean(jnp.argmax(out["plain"], -1) == episode.query_labels)
  total = proto
  if cls is not None:
    metrics["cls_loss"] = cls
    total = proto + cls
  metrics["scale"] = params["scale"]
  return total, (metrics, state)  # BatchNorm frozen: the state is returned unchanged


def predict_all_modes(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys) -> dict:
  return forward(config, nets, params, state, episode, keys, with_cls=False)[0]


def predict(config: ml_collections.ConfigDict, nets: Nets, params, state, episode, keys):
  return predict_all_modes(config, nets, params, state, episode, keys)[config.method.eval_mode]


def embed(config, nets: Nets, params, state, images):
  """Method.embed: E's evaluation-mode features [B, 512] of preprocessed images."""
  del config
  return apply_embedding(nets, params["embedding"], state, images)[0]


def build(config: ml_collections.ConfigDict) -> IDeMeNetMethod:
  nets = networks(config)
  bind = lambda fn: functools.partial(fn, config, nets)
  return IDeMeNetMethod("idemenet", bind(init), bind(loss), bind(predict), optimizer=make_optimizer,
                        learning_rate=lambda c: _schedule(c, c.method.lr_deformation),
                        setup=functools.partial(setup, config), predict_all_modes=bind(predict_all_modes),
                        eval_mode=lambda c: c.method.eval_mode,
                        figures=idemenet_figures.figures(config, bind(deform)), deform=bind(deform),
                        embed=bind(embed))
