"""Config defaults shared by every method, data.* from a dataset's record (data/registry.py), validation.

configs/<method>.py builds on `base_config()` and `apply_dataset()`; every
number lives in the config, none in method files. Keys every method has (so
users and scripts can rely on them): data.name, data.split, data.manual_dir,
data.data_dir, data.image_size, episode.ways, episode.shots, episode.queries,
episode.tasks, train.steps, train.seed, train.eval_every, eval.episodes,
eval.split.
"""

import importlib.util
import json
import math
import os

import ml_collections

from fewshot_jax.data import common as data_common
from fewshot_jax.data import registry
from fewshot_jax.errors import ConfigError

def default_manual_dir(name: str) -> str | None:
  """$FEWSHOT_DATA_DIR/<the record's folder> when set (our shipped copies), else None (TFDS download)."""
  root = os.environ.get("FEWSHOT_DATA_DIR")
  folder = registry.get(name).folder
  return os.path.join(root, folder) if root and folder else None


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # method.*: only the name is common; every other key is the method's own, declared by
  # methods/<name>.py (KEYS) and set by configs/<name>.py.
  c.method = ml_collections.ConfigDict(dict(name=""))
  # model.remat: recompute each backbone block in the backward pass (less activation
  # memory, more FLOPs: benchmarks/steps.py); parameter names are the same either way.
  c.model = ml_collections.ConfigDict(dict(backbone="conv4", features=64, dtype="float32", conv_impl="auto",
                                           remat=False))
  # data.* starts on registry.DEFAULT. data.mean/std are per-channel tuples (length 1
  # broadcasts): ConfigDict keeps a field's type, so a float default could not take RGB statistics.
  dataset = registry.DEFAULT
  c.data = ml_collections.ConfigDict(dict(
      name=dataset.name, split=dataset.schemes[0], manual_dir=ml_collections.FieldReference(None, field_type=str),
      data_dir=default_data_dir(), image_size=dataset.image_size, input_size=0, mean=dataset.mean,
      std=dataset.std,
      train_split="train", val_split="val",
      # Fraction of the image kept around its centre before resizing to the input
      # size (augment.resize): 0.875 is Resize 256 + CenterCrop 224; 1 the whole image.
      center_crop=1.0,
      # 'replicated': every device holds the whole split; 'sharded': each holds 1/D
      # of the images (splits larger than one device) and an episode's images are
      # gathered from their owners inside the step (data/episodes.take_images).
      placement="replicated"))
  # class_rotations: one angle per class of a task, drawn from this list. The
  # rotation is scipy.ndimage.rotate(reshape=False, mode='nearest') (rotation_order 3: cubic
  # spline; edge pixels replicated); order 1 with rotation_mode 'constant' is the bilinear
  # zero-fill rotation, whose blank corners give the angle away. Which original code does
  # what (here and in episode.*): docs/faithful.md.
  c.augment = ml_collections.ConfigDict(dict(flip_prob=0.0, class_rotations=(), rotation_order=3,
                                             rotation_mode="nearest"))
  # episode.* is the task trained on and evaluated; train_ways (0 = ways) trains
  # on higher-way episodes, as Snell et al. do on ink characters. query_sampling
  # 'per_class': `queries` queries of every class; 'per_task': `queries` per task,
  # each of a class drawn uniformly (an original that trains on one query per task).
  # disjoint_queries=False draws queries independently of the supports (a query may
  # repeat a support image), as an original does, in training and evaluation.
  c.episode = ml_collections.ConfigDict(dict(ways=5, shots=1, queries=5, tasks=1, train_ways=0,
                                             query_sampling="per_class", disjoint_queries=True))
  # train.checkpoint_every: the latest checkpoint's own cadence (it is also
  # written at every validation and when SIGTERM / SIGINT stop the run).
  # train.nonfinite: 'stop' the run at a non-finite loss or gradient (keeping the
  # last good checkpoint) or 'skip' such steps (no update). allow_config_change:
  # resume a workdir with a changed config, recording the change (see RESUME_FREE).
  c.train = ml_collections.ConfigDict(dict(
      steps=2000, seed=0, eval_every=500, log_every=100, checkpoint_every=200, steps_per_call=50, loop="auto",
      nonfinite="stop", allow_config_change=False,
      optimizer="adam", lr=1e-3, schedule="step", decay_every=2000, decay_factor=0.5, min_lr=0.0,
      warmup_steps=0, weight_decay=0.0, grad_clip=0.0, keep_checkpoints=2))
  # eval.protocol: 'standard' (every method's: eval.episodes episodes of eval.queries queries per
  # class, no augmentation, evaluate.py) or one of the method's own (its PROTOCOLS, e.g. 'reference',
  # which scores eval.reference_tasks tasks). eval.data: '' evaluates data.* on eval.split; 'NAME:SPLIT'
  # (or 'NAME': eval.split) another dataset's split, cross-domain (parse_eval_data,
  # evaluate.load_eval), its files in eval.data_manual_dir ('': the record's under $FEWSHOT_DATA_DIR).
  c.eval = ml_collections.ConfigDict(dict(
      episodes=600, split="test", queries=15, tasks=8, seed=1234, val_episodes=300,
      checkpoint="best", protocol="standard", reference_tasks=8000, data="", data_manual_dir=""))
  return c


def apply_dataset(c: ml_collections.ConfigDict, name: str, scheme: str | None = None) -> None:
  """Sets data.* from a dataset's record: its default scheme, the manual dir from $FEWSHOT_DATA_DIR,
  stored size, pixel statistics (empty: the prepared train split's, filled in at the start of a run)
  and placement, and adds the record's own keys (options, e.g. data.channels) with their defaults."""
  dataset = registry.get(name)
  c.data.name = name
  c.data.split = scheme or dataset.schemes[0]
  c.data.manual_dir = default_manual_dir(name)
  c.data.image_size = dataset.image_size
  c.data.mean, c.data.std = dataset.mean, dataset.std
  c.data.placement = dataset.placement
  with c.data.unlocked():
    for key, value in dataset.options.items():
      c.data[key] = value


def fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (e.g. a workdir's config.json) with every key it predates taken from `defaults`."""
  with config.unlocked():
    for section, values in defaults.items():
      if section not in config:
        config[section] = values
        continue
      for key, value in values.items():
        if key not in config[section]:
          config[section][key] = value
  return config


def check_preset(preset: str, presets) -> str:
  if preset not in presets:
    raise ConfigError(f"preset {preset!r} is unknown; valid presets: {sorted(presets)}")
  return preset


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every value once, before any work, naming the bad key: the shared sections here, the
  method's own keys (methods.check_config, declared by each method) after them."""
  from fewshot_jax import methods  # pylint: disable=g-import-not-at-top  # (imports no config)
  from fewshot_jax.data import augment  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data.episodes import PLACEMENTS, QUERY_SAMPLING  # pylint: disable=g-import-not-at-top
  from fewshot_jax.models import backbones, layers  # pylint: disable=g-import-not-at-top
  if c.data.name not in registry.NAMES:
    raise ConfigError(f"data.name={c.data.name!r} is unknown; valid: {list(registry.NAMES)}")
  schemes = registry.get(c.data.name).schemes
  if c.data.split not in schemes:
    raise ConfigError(f"data.split={c.data.split!r} is not a split of {c.data.name}; valid: {list(schemes)}")
  positive = {"episode.ways": c.episode.ways, "episode.shots": c.episode.shots,
              "episode.queries": c.episode.queries, "episode.tasks": c.episode.tasks,
              "train.steps": c.train.steps, "train.eval_every": c.train.eval_every,
              "train.log_every": c.train.log_every, "train.steps_per_call": c.train.steps_per_call,
              "train.checkpoint_every": c.train.checkpoint_every,
              "eval.episodes": c.eval.episodes, "eval.queries": c.eval.queries,
              "eval.tasks": c.eval.tasks, "eval.val_episodes": c.eval.val_episodes,
              "eval.reference_tasks": c.eval.reference_tasks}
  for key, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"{key}={value!r} must be a positive integer")
  data_common.check_ways(c.episode.ways, f"episode.ways={c.episode.ways} asks for")
  if c.episode.query_sampling not in QUERY_SAMPLING:
    raise ConfigError(f"episode.query_sampling={c.episode.query_sampling!r} is unknown; "
                      f"valid: {list(QUERY_SAMPLING)}")
  if not 0.0 < c.data.center_crop <= 1.0:
    raise ConfigError(f"data.center_crop={c.data.center_crop} must lie in (0, 1] (the kept fraction of the image)")
  rotation = (c.augment.rotation_order, c.augment.rotation_mode)
  if rotation not in augment.ROTATIONS:
    raise ConfigError(f"augment.rotation_order, augment.rotation_mode = {rotation!r} is not supported; "
                      f"valid: {list(augment.ROTATIONS)}")
  if c.data.placement not in PLACEMENTS:
    raise ConfigError(f"data.placement={c.data.placement!r} is unknown; valid: {list(PLACEMENTS)}")
  if c.train.loop not in LOOPS:
    raise ConfigError(f"train.loop={c.train.loop!r} is unknown; valid: {list(LOOPS)}")
  if c.train.schedule not in SCHEDULES:
    raise ConfigError(f"train.schedule={c.train.schedule!r} is unknown; valid: {list(SCHEDULES)}")
  if c.train.optimizer not in OPTIMIZERS:
    raise ConfigError(f"train.optimizer={c.train.optimizer!r} is unknown; valid: {list(OPTIMIZERS)}")
  if not 0.0 <= c.augment.flip_prob <= 1.0:
    raise ConfigError(f"augment.flip_prob={c.augment.flip_prob} must lie in [0, 1]")
  if c.episode.train_ways < 0:
    raise ConfigError(f"episode.train_ways={c.episode.train_ways} must be 0 (= episode.ways) or >= 2")
  if c.episode.train_ways:
    data_common.check_ways(c.episode.train_ways, f"episode.train_ways={c.episode.train_ways} (0: episode.ways) "
                           "asks for")
  if not (c.train.lr > 0 and math.isfinite(c.train.lr)):
    raise ConfigError(f"train.lr={c.train.lr} must be a finite number > 0")
  if c.train.nonfinite not in NONFINITE:
    raise ConfigError(f"train.nonfinite={c.train.nonfinite!r} is unknown; valid: {list(NONFINITE)}")
  if c.eval.split not in EVAL_SPLITS:
    raise ConfigError(f"eval.split={c.eval.split!r} is unknown; valid: {list(EVAL_SPLITS)}")
  parse_eval_data(c)
  if c.eval.checkpoint not in ("best", "latest"):
    raise ConfigError(f"eval.checkpoint={c.eval.checkpoint!r} is unknown; valid: ['best', 'latest']")
  if c.model.conv_impl not in layers.CONV_IMPLS:
    raise ConfigError(f"model.conv_impl={c.model.conv_impl!r} is unknown; valid: {list(layers.CONV_IMPLS)}")
  backbones.dtype_from_config(c)
  backbones.remat_from_config(c)
  base = base_config()
  methods.check_config(c, train_defaults=base.train)
  return c


EVAL_SPLITS = ("train", "val", "test")


def parse_eval_data(c: ml_collections.ConfigDict) -> tuple[str, str]:
  """(dataset name, split) evaluation scores: eval.data's ('NAME:SPLIT', or 'NAME' with eval.split), or
  (data.name, eval.split) when it is ''. A name other than data.name is a cross-domain evaluation."""
  value = c.eval.get("data", "")
  if not value:
    return c.data.name, c.eval.split
  if not isinstance(value, str) or value.count(":") > 1:
    raise ConfigError(f"eval.data={value!r} must be NAME or NAME:SPLIT; valid names: {list(registry.NAMES)}")
  name, colon, split = value.partition(":")
  if name not in registry.NAMES:
    raise ConfigError(f"eval.data={value!r} names an unknown dataset {name!r}; valid: {list(registry.NAMES)}")
  split = split if colon else c.eval.split
  if split not in EVAL_SPLITS:
    raise ConfigError(f"eval.data={value!r} names an unknown split {split!r}; valid: {list(EVAL_SPLITS)}")
  return name, split


LOOPS = ("auto", "scan", "python")
SCHEDULES = ("constant", "step", "cosine")  # train.schedule: state.SCHEDULES builds each
OPTIMIZERS = ("adam", "adamw", "sgd")  # train.optimizer: state.OPTIMIZERS builds each
NONFINITE = ("stop", "skip")
# Keys a resumed run may change without train.allow_config_change: run length,
# cadences, paths, data placement, rematerialisation (the same parameters either way) and
# evaluation (a prefix ending in '.' covers a section).
RESUME_FREE = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
               "train.steps_per_call", "train.loop", "train.keep_checkpoints", "train.allow_config_change",
               "train.nonfinite", "data.data_dir", "data.manual_dir", "data.placement", "model.remat",
               "method.pretrained", "eval.")


def config_changes(started: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'key: old -> new' for every key outside RESUME_FREE where `config` differs from the
  config.json a workdir was started with."""
  flat = lambda d, prefix="": ({k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
                               if isinstance(d, dict) else {prefix[:-1]: d})
  old, new = flat(started), flat(json.loads(config.to_json_best_effort()))
  free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FREE)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]


def fit_to_devices(c: ml_collections.ConfigDict, devices: int) -> ml_collections.ConfigDict:
  """A copy with episode.tasks and eval.tasks rounded up to multiples of the device count.

  The task axis is sharded over all devices, so presets written for one device
  run unchanged on 2, 4, ... 16: a meta-batch of 32 stays 32 where it divides,
  a single-task preset trains one task per device. Each change is logged.
  Evaluation results do not depend on eval.tasks (episode i is always the same).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  c = c.copy_and_resolve_references()
  with c.unlocked():
    for section in ("episode", "eval"):
      tasks = c[section].tasks
      fitted = -(-tasks // devices) * devices
      if fitted != tasks:
        logging.info("%s.tasks=%d rounded up to %d, a multiple of the %d devices", section, tasks, fitted,
                     devices)
        c[section].tasks = fitted
  return c


def train_ways(c) -> int:
  return c.episode.train_ways or c.episode.ways


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # configs/ in a checkout


def packaged_configs() -> list[str]:
  """The names of the config files shipped in the package (`--config=<name>:<preset>`)."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_arg(value: str) -> str:
  """`<name>:<preset>` (a packaged config: `<method>:<preset>`) -> that file's path:preset;
  anything else (a path to a config file, with or without :preset) is returned unchanged."""
  name, sep, preset = value.partition(":")
  if name in packaged_configs() and not os.path.exists(name):
    return os.path.join(CONFIG_DIR, name + ".py") + sep + preset
  return value


def load_module(path: str):
  """A config file as a module (its get_config, PRESETS), e.g. for a config file built on another."""
  name = "_fewshot_cfg_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(path: str, preset: str) -> ml_collections.ConfigDict:
  """get_config(preset) of a config file (what launch.py's --config=PATH:PRESET loads)."""
  return load_module(path).get_config(preset)
