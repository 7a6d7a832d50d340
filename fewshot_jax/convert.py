"""PyTorch checkpoints -> Flax variables: the IDeMe-Net embedding (softRandom.t7), the
full GNet (metaNet_*.t7) and Conv-4 ProtoNet.

torch is imported only by `load_state_dict`, so the conversion functions (which
also accept a live `model.state_dict()`) and this module's import need no
torch. Every converter is strict and reports every missing key, unexpected key,
wrong shape and disagreeing duplicate in one CheckpointError, so a mismatched
checkpoint is diagnosed in one run instead of one key at a time.

Layouts: Conv2d weight [O, I, H, W] -> kernel [H, W, I, O]; Linear weight
[out, in] -> Dense kernel [in, out]; BatchNorm weight / bias / running_mean /
running_var -> params scale / bias and batch_stats mean / var (the optional
num_batches_tracked is accepted and dropped: Flax keeps no counter, and PyTorch
0.4.0 checkpoints lack it). Floating tensors become float32 numpy arrays.
"""

from collections.abc import Mapping
import os
import pickle
import shutil

import numpy as np

from fewshot_jax.errors import CheckpointError

_TORCH_EXTRA = "pip install 'fewshot_jax[torch]'"
_DUPLICATE_TRUNK = "CNet.resnet.convnet."


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Reads a torch.save'd state_dict as {name: numpy array}, without running pickled code.

  torch.load(weights_only=True) refuses any pickle that would build objects
  other than tensors and plain containers, so a malicious file fails here
  instead of executing. A DataParallel `module.` prefix (on every key) is
  removed.
  """
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"reading the PyTorch checkpoint {path} needs torch: {_TORCH_EXTRA}") from None
  if not os.path.exists(path):
    raise CheckpointError(f"PyTorch checkpoint {path} does not exist")
  if not os.path.isfile(path):
    raise CheckpointError(f"PyTorch checkpoint {path} is not a file")
  _check_format(path)
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"PyTorch checkpoint {path} was refused: it holds Python objects other than tensors, "
        f"which could run code when loaded (torch.load weights_only=True: {_first_line(e)})") from None
  except Exception as e:  # pylint: disable=broad-exception-caught  # torch raises many types for corrupt files
    raise CheckpointError(f"PyTorch checkpoint {path} is truncated or corrupt: it starts like a torch.save "
                          f"file but cannot be read ({type(e).__name__}: {_first_line(e)})") from None
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"PyTorch checkpoint {path} holds a {type(obj).__name__}, "
                          f"not a state_dict (a flat mapping of names to tensors)")
  bad = [f"{k!r} is a {type(v).__name__}, not a tensor" for k, v in obj.items()
         if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    raise CheckpointError(f"PyTorch checkpoint {path} is not a flat mapping of names to tensors: "
                          f"{', '.join(bad[:3])}{more}")
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return {k: _to_numpy(v) for k, v in obj.items()}


def _check_format(path: str) -> None:
  """torch.save writes a zip archive (PK..., torch >= 1.6) or, in the legacy format of the authors'
  .t7 files, a pickle (protocol byte 0x80): anything else is not a PyTorch checkpoint at all."""
  with open(path, "rb") as f:
    head = f.read(512)
  if not head:
    raise CheckpointError(f"PyTorch checkpoint {path} is empty (0 bytes)")
  if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
    kind = "text" if all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "binary data"
    raise CheckpointError(f"PyTorch checkpoint {path} is not a torch.save file: it starts with {kind} "
                          f"({head[:8]!r}), where torch.save writes a zip archive (b'PK\\x03\\x04') or a "
                          "pickle (b'\\x80')")


def embedding_from_torch(state_dict: Mapping, num_classes: int = 64, source: str = "state_dict") -> dict:
  """ClassificationNetwork state_dict (keys convnet.*) -> models.resnet.ResNet18 variables
  {'params', 'batch_stats'}, fc included. `source` names the checkpoint in errors."""
  spec = _Spec()
  spec.resnet18("convnet.", (), num_classes)
  return spec.convert(state_dict, source, "ClassificationNetwork (ResNet-18 embedding)")


def idemenet_from_torch(state_dict: Mapping, grid: int = 3, num_classes: int = 64, image_size: int = 224,
                        source: str = "state_dict") -> dict:
  """GNet state_dict -> the IDeMe-Net variables
  {'params': {'embedding', 'deformation', 'scale'}, 'batch_stats': {'embedding', 'deformation'}}.

  CNet.* (the trunk) -> embedding without fc; GNet's own `fc` -> embedding/fc
  (the reference classifies deformed images with it); attentionNet / toWeight ->
  deformation; scale [1] -> scale []. The reference registers the trunk a second
  time as CNet.resnet.convnet.*: those copies must equal the CNet.* tensors, and
  CNet.resnet.convnet.fc.* (the stage-1 head, never used by GNet) is dropped.
  `image_size` fixes toWeight's input width (784 at 224, 64 at 84).
  """
  spec = _Spec()
  spec.resnet18("CNet.", ("embedding",), num_classes=0)
  spec.linear("fc", ("embedding", "fc"), num_classes, 512)
  spec.resnet18(_DUPLICATE_TRUNK, None, num_classes)
  spec.deformation("attentionNet.encoder.", "toWeight.0", ("deformation",), grid, image_size)
  spec.add("scale", (1,), "params", ("scale",), lambda a: a.reshape(()))
  return spec.convert(state_dict, source, f"GNet (IDeMe-Net, grid {grid}, {image_size} px)",
                      duplicates=(_DUPLICATE_TRUNK, "CNet."))


def conv4_from_torch(state_dict: Mapping, in_channels: int = 3, features: int = 64, blocks: int = 4,
                     source: str = "state_dict") -> dict:
  """torch_reference.conv4.Conv4 / prototypical-networks state_dict (encoder.{i}.0 conv,
  encoder.{i}.1 BN) -> models.conv4.Conv4 variables (Conv_i, BatchNorm_i)."""
  spec = _Spec()
  for i in range(blocks):
    spec.conv(f"encoder.{i}.0", (f"Conv_{i}",), features, in_channels if i == 0 else features, 3, bias=True)
    spec.batchnorm(f"encoder.{i}.1", (f"BatchNorm_{i}",), features)
  return spec.convert(state_dict, source, f"Conv-{blocks}")


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else ""


def _to_numpy(value):
  """A torch tensor or array -> numpy; bfloat16 (which numpy lacks) widens to float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point() and value.element_size() < 4:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


class _Spec:
  """Expected torch keys, each with its shape and where (if anywhere) it goes in the Flax tree."""

  def __init__(self):
    self.entries = {}  # key -> (shape, collection, flax path or None = dropped, transform)
    self.optional = {}  # key -> shape; accepted and dropped when present

  def add(self, key, shape, collection, path, transform=None):
    self.entries[key] = (tuple(shape), collection, path, transform)

  def conv(self, key, path, out, inp, k, bias=False):
    self.add(f"{key}.weight", (out, inp, k, k), "params", _sub(path, "kernel"), lambda a: a.transpose(2, 3, 1, 0))
    if bias:
      self.add(f"{key}.bias", (out,), "params", _sub(path, "bias"))

  def linear(self, key, path, out, inp):
    self.add(f"{key}.weight", (out, inp), "params", _sub(path, "kernel"), lambda a: a.T)
    self.add(f"{key}.bias", (out,), "params", _sub(path, "bias"))

  def batchnorm(self, key, path, c):
    self.add(f"{key}.weight", (c,), "params", _sub(path, "scale"))
    self.add(f"{key}.bias", (c,), "params", _sub(path, "bias"))
    self.add(f"{key}.running_mean", (c,), "batch_stats", _sub(path, "mean"))
    self.add(f"{key}.running_var", (c,), "batch_stats", _sub(path, "var"))
    self.optional[f"{key}.num_batches_tracked"] = ()

  def resnet18(self, prefix, path, num_classes):
    """torchvision resnet18 keys under `prefix`; fc only when num_classes > 0. path None = drop."""
    at = lambda *names: None if path is None else path + names
    self.conv(f"{prefix}conv1", at("conv1"), 64, 3, 7)
    self.batchnorm(f"{prefix}bn1", at("bn1"), 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
      for b in range(2):
        key, name = f"{prefix}layer{layer}.{b}", f"layer{layer}_{b}"
        inp = inplanes if b == 0 else planes
        self.conv(f"{key}.conv1", at(name, "conv1"), planes, inp, 3)
        self.batchnorm(f"{key}.bn1", at(name, "bn1"), planes)
        self.conv(f"{key}.conv2", at(name, "conv2"), planes, planes, 3)
        self.batchnorm(f"{key}.bn2", at(name, "bn2"), planes)
        if b == 0 and inp != planes:
          self.conv(f"{key}.downsample.0", at(name, "downsample_conv"), planes, inp, 1)
          self.batchnorm(f"{key}.downsample.1", at(name, "downsample_bn"), planes)
      inplanes = planes
    if num_classes:
      self.linear(f"{prefix}fc", at("fc"), num_classes, 512)

  def deformation(self, encoder, to_weight, path, grid, image_size, channels=(32, 64, 64, 32, 16)):
    side, inp = image_size, 6
    for i, c in enumerate(channels):
      self.conv(f"{encoder}{i}.0", path + (f"encoder_{i}", "conv"), c, inp, 3, bias=True)
      self.batchnorm(f"{encoder}{i}.1", path + (f"encoder_{i}", "bn"), c)
      inp, side = c, side // 2
    self.linear(to_weight, path + ("to_weight",), grid * grid, inp * side * side)

  def convert(self, state_dict, source, what, duplicates=None):
    if not isinstance(state_dict, Mapping):
      raise CheckpointError(f"{source} is a {type(state_dict).__name__}, not a state_dict mapping")
    problems = []
    missing = [k for k in self.entries if k not in state_dict]
    unexpected = [k for k in state_dict if k not in self.entries and k not in self.optional]
    wanted = {**{k: e[0] for k, e in self.entries.items()}, **self.optional}
    shapes = [f"{k} is {list(state_dict[k].shape)} in the checkpoint but {list(s)} expected"
              for k, s in wanted.items() if k in state_dict and tuple(state_dict[k].shape) != s]
    arrays = {k: _to_numpy(v) for k, v in state_dict.items() if k in wanted}
    differ = []
    if duplicates:
      copy, original = duplicates
      for k in self.entries:
        if k.startswith(copy):
          twin = original + k[len(copy):]
          if (twin in self.entries and k in arrays and twin in arrays
              and arrays[k].shape == arrays[twin].shape and not np.array_equal(arrays[k], arrays[twin])):
            differ.append(f"{k} != {twin}")
    for one, many, items in (("missing key", "missing keys", missing),
                             ("unexpected key", "unexpected keys", unexpected),
                             ("wrong shape", "wrong shapes", shapes),
                             ("duplicate differing from its original", "duplicates differing from their originals",
                              differ)):
      if items:
        problems.append(f"{len(items)} {one if len(items) == 1 else many}: {', '.join(items)}")
    if problems:
      raise CheckpointError(f"{source} does not fit {what}{_hint(state_dict, what)}: " + "; ".join(problems))
    variables = {"params": {}, "batch_stats": {}}
    for key, (_, collection, path, transform) in self.entries.items():
      if path is None:
        continue
      a = arrays[key]
      a = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
      node = variables[collection]
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = np.array(transform(a) if transform else a, order="C")  # 0-d stays 0-d
    return variables


def _sub(path, name):
  return None if path is None else path + (name,)


def _hint(state_dict, what) -> str:
  """Names the right converter when the keys are those of the other checkpoint kind."""
  keys = list(state_dict)
  if what.startswith("ClassificationNetwork") and any(k.startswith("CNet.") for k in keys):
    return " (its keys look like a GNet checkpoint: use idemenet_from_torch)"
  if what.startswith("GNet") and keys and all(k.startswith("convnet.") for k in keys):
    return " (its keys look like a ClassificationNetwork checkpoint: use embedding_from_torch)"
  return ""


def convert_to_workdir(config, torch_checkpoint: str, workdir: str, overwrite: bool = False) -> dict:
  """Converts a PyTorch checkpoint once into an orbax checkpoint in `workdir` (step 0).

  A workdir that already holds checkpoints is refused (it would describe one
  model and hold another); `overwrite` replaces them.

  configs/idemenet.py:pretrain takes an embedding file like softRandom.t7;
  configs/idemenet.py:mini-5w1s / mini-5w5s take a GNet file like
  metaNet_1shot.t7, and get their gallery built from the config's train split
  with the converted embedding (as stage 2 builds it from a stage-1 run). The
  workdir then holds config.json and the latest/best checkpoints, so
  --mode=eval, --mode=train (resumes from step 0) and stage 2's
  method.pretrained read it like any other. 'best' carries val_accuracy 0:
  the converted model has not been validated here.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from fewshot_jax import files  # pylint: disable=g-import-not-at-top
  from fewshot_jax import methods  # pylint: disable=g-import-not-at-top
  from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
  from fewshot_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from fewshot_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  name = config.method.name
  if name not in ("idemenet_pretrain", "idemenet"):
    raise ConfigError(f"--mode=convert handles IDeMe-Net checkpoints; method.name={name!r} "
                      "(use configs/idemenet.py:pretrain or :mini-5w1s / :mini-5w5s)")
  state_dict = load_state_dict(torch_checkpoint)  # first: a bad file fails before any model work
  held = [d for d in ("checkpoints", "best") if os.path.isdir(os.path.join(workdir, d)) and
          os.listdir(os.path.join(workdir, d))]
  if held and not overwrite:
    raise ConfigError(f"workdir {workdir} already holds checkpoints ({', '.join(held)}); converting into it "
                      "would leave one model described and another stored: use an empty --workdir, or "
                      "pass --overwrite to replace them")
  mesh = sharding.make_mesh()
  method = methods.build(config)
  tx = state_lib.optimizer_for(method, config)
  example = state_lib.train_example(method, config)
  fresh = jax.jit(functools.partial(state_lib.init_state, method, tx))(jax.random.key(0), example)
  mc = config.method
  if name == "idemenet_pretrain":
    variables = embedding_from_torch(state_dict, mc.num_classes, source=torch_checkpoint)
    model_state = {"batch_stats": variables["batch_stats"]}
  else:
    variables = idemenet_from_torch(state_dict, mc.grid, mc.num_classes, idemenet.input_size(config),
                                    source=torch_checkpoint)
    train_data = input_pipeline.load(config, config.data.train_split, mesh)
    model_state = idemenet.attach_gallery(config, variables, train_data)
    model_state.pop("params")
    # A conversion stores the file's statistics exactly (export -> convert is bit-identical);
    # method.gallery_bn='train' recalibrates them when stage 2 starts from this workdir.
    model_state["batch_stats"] = variables["batch_stats"]
  params = jax.tree.map(jax.numpy.asarray, variables["params"])
  wanted = jax.tree.map(lambda x: x.shape, fresh.params)
  if jax.tree.map(lambda x: x.shape, params) != wanted:
    raise CheckpointError(f"{torch_checkpoint} converts to parameters that do not fit "
                          f"configs/idemenet.py ({name}); check method.grid / data.input_size")
  state = state_lib.TrainState(step=fresh.step, params=params, model_state=model_state,
                               opt_state=tx.init(params))
  state = jax.device_put(state, sharding.replicated(mesh))
  os.makedirs(workdir, exist_ok=True)
  lock = files.WorkdirLock(workdir)
  lock.acquire()
  try:
    for d in held:  # overwrite: the old model goes entirely
      shutil.rmtree(os.path.join(workdir, d))
    _save_converted(config, state, workdir)
  finally:
    lock.release()
  return {"converted": torch_checkpoint, "workdir": workdir, "method": name,
          "parameters": int(sum(x.size for x in jax.tree.leaves(params)))}


def _save_converted(config, state, workdir) -> None:
  """Step 0 as the latest and the best checkpoint, and config.json."""
  from fewshot_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fewshot_jax import files  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpoints(workdir, config.train.keep_checkpoints)
  meta = checkpoint.checkpoint_meta(config)
  ckpt.save(ckpt.latest, state, meta)
  ckpt.save(ckpt.best, state, meta, metrics={"val_accuracy": 0.0})
  ckpt.wait()
  ckpt.close()
  files.write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
