"""Flax variables <-> PyTorch state_dicts, and the record a method's PyTorch bridge fills in.

Below methods/ and above nothing but errors: every method's bridge
(methods/<name>_torch.py) declares its torch key layout with a `Spec`, and the
entry points (convert, compare) read files with `load_state_dict`.

torch is imported only where a torch object is made or read, so the
converters (which also accept a live `model.state_dict()`) and this module's
import need no torch. Every converter is strict and reports every missing key,
unexpected key, wrong shape and disagreeing duplicate in one CheckpointError, so
a mismatched checkpoint is diagnosed in one run instead of one key at a time.

Layouts: Conv2d weight [O, I, H, W] -> kernel [H, W, I, O]; Linear weight
[out, in] -> Dense kernel [in, out]; BatchNorm weight / bias / running_mean /
running_var -> params scale / bias and batch_stats mean / var (the optional
num_batches_tracked is accepted and dropped: Flax keeps no counter, and PyTorch
0.4.0 checkpoints lack it). Floating tensors become float32 numpy arrays.

Flax -> PyTorch (`load_into_torch`) inverts a converter instead of restating
it: the converter is run on a state_dict whose tensors hold their own element
indices, so every Flax leaf it returns says which torch elements it came from
(layout transposes and reshapes included), and the Flax values are scattered
back there.
"""

from collections.abc import Mapping
import contextlib
import dataclasses
import os
import pickle
from typing import Any, Callable

import jax
import numpy as np

from fewshot_jax.errors import CheckpointError, ConfigError

_TORCH_EXTRA = "pip install 'fewshot_jax[torch]'"


@dataclasses.dataclass(frozen=True)
class TorchBridge:
  """A method's PyTorch counterpart (built by methods/<name>_torch.py's `bridge(config)`).

  from_torch(state_dict, source) -> {'params', 'batch_stats'}: strict, in the
    authors' key layout (what --mode=convert reads); `source` names the file in errors.
  to_torch(params, model_state) -> the torch module holding those variables, float32,
    eval mode; its state_dict() is what --mode=export writes (from_torch inverts it).
  logits(net, episode, extras, device) -> {mode: torch logits [T, Q, N]} on numpy
    Episode arrays (support, support_labels, query), for compare: the method's
    prediction modes computed by PyTorch.
  jax_extras(params, state, episode, keys) -> arrays the torch side takes from JAX (random
    choices both must share, e.g. sampled images), or None; traced.
  complete(variables, load_train_split) -> model state of a converted checkpoint (e.g. a
    gallery embedded from the train split), or None: {'batch_stats': ...} as converted.
  """

  from_torch: Callable[..., dict]
  to_torch: Callable[..., Any]
  logits: Callable[..., dict]
  jax_extras: Callable[..., Any] | None = None
  complete: Callable[..., dict] | None = None


def torch_module():
  """torch, or one ConfigError saying how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(f"this mode runs PyTorch and needs torch: {_TORCH_EXTRA}") from None
  return torch


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


class Spec:
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

  def flax_names(self, shapes):
    """Keys for a model whose torch attribute names are its Flax module names (torch_reference
    ports): params/a/b/kernel -> a.b.weight (conv HWIO -> OIHW, dense [in, out] -> [out, in]),
    scale -> weight, bias -> bias, batch_stats mean / var -> running_mean / running_var.
    `shapes`: the Flax variables or their jax.eval_shape."""
    leaves = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}
    for collection in ("params", "batch_stats"):
      for path, leaf in jax.tree_util.tree_leaves_with_path(shapes.get(collection, {})):
        names = tuple(str(getattr(e, "key", e)) for e in path)
        key = ".".join(names[:-1] + (leaves[names[-1]],))
        shape, transform = tuple(leaf.shape), None
        if names[-1] == "kernel" and len(shape) == 4:
          shape, transform = (shape[3], shape[2], shape[0], shape[1]), lambda a: a.transpose(2, 3, 1, 0)
        elif names[-1] == "kernel":
          shape, transform = shape[::-1], lambda a: a.T
        self.add(key, shape, collection, names, transform)
        if names[-1] == "mean":
          self.optional[".".join(names[:-1] + ("num_batches_tracked",))] = ()
    return self

  def convert(self, state_dict, source, what, duplicates=None, hint: Callable[[Mapping], str] = lambda sd: ""):
    """state_dict -> variables; every problem in one CheckpointError. `duplicates` (copy prefix,
    original prefix): keys that must equal their original. hint(state_dict) -> a note for errors."""
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
      raise CheckpointError(f"{source} does not fit {what}{hint(state_dict)}: " + "; ".join(problems))
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


def plain(tree):
  """Flax variables (FrozenDicts, device arrays) -> nested dicts of numpy arrays."""
  if isinstance(tree, Mapping):
    return {k: plain(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


def load_into_torch(module, variables, converter: Callable[[dict], dict], aliases: Mapping[str, str] = (),
                    what: str = "model"):
  """Loads Flax `variables` into the torch `module` through the inverse of `converter`.

  `converter` is a bridge's from_torch function (state_dict -> variables). It
  is called on an index state_dict: every tensor of `module` holds the global
  indices of its elements, so each Flax leaf it returns holds, element by
  element, the torch position its value goes to. `aliases` {copy prefix:
  original prefix} gives keys that are a second name of the same tensor (they
  get the original's indices, as the converter's duplicate check expects).
  torch keys the converter drops (a head the model never uses) and
  num_batches_tracked keep the module's own values. Any leaf
  of `variables` the inverse does not account for is a CheckpointError.
  """
  torch = torch_module()
  target = module.state_dict()
  aliases = dict(aliases)
  index, offset = {}, 0
  for key, tensor in target.items():
    if key.endswith("num_batches_tracked") or any(key.startswith(p) and (q + key[len(p):]) in target
                                                  for p, q in aliases.items()):
      continue
    index[key] = np.arange(offset, offset + tensor.numel(), dtype=np.int64).reshape(tuple(tensor.shape))
    offset += tensor.numel()
  for key in target:
    for p, q in aliases.items():
      if key.startswith(p) and (q + key[len(p):]) in index:
        index[key] = index[q + key[len(p):]]
  positions = converter(index)
  variables = plain(variables)
  if jax.tree.structure(positions) != jax.tree.structure(variables):
    names = lambda tree: {"/".join(str(getattr(e, "key", e)) for e in path)
                          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    want, have = names(positions), names(variables)
    raise CheckpointError(f"the variables do not fit the PyTorch {what}: missing {sorted(want - have)[:5]}, "
                          f"unexpected {sorted(have - want)[:5]}")
  flat = np.zeros(offset, np.float32)
  covered = np.zeros(offset, bool)
  for (path, pos), value in zip(jax.tree_util.tree_leaves_with_path(positions), jax.tree.leaves(variables)):
    if pos.shape != value.shape:
      name = "/".join(str(getattr(e, "key", e)) for e in path)
      raise CheckpointError(f"{name} has shape {tuple(value.shape)}, but the PyTorch {what} needs "
                            f"{tuple(pos.shape)} there")
    flat[pos.ravel()] = value.astype(np.float32).ravel()
    covered[pos.ravel()] = True
  state = {}
  for key, tensor in target.items():
    hit = covered[index[key].ravel()] if key in index else np.zeros(1, bool)
    if hit.all():
      state[key] = torch.from_numpy(flat[index[key]].reshape(tuple(tensor.shape)).copy())
    elif not hit.any():  # dropped by the converter, or a counter
      state[key] = tensor
    else:
      raise CheckpointError(f"the variables fill only part of the PyTorch {what}'s {key}")
  module.load_state_dict(state, strict=True)
  return module


@contextlib.contextmanager
def float32_torch():
  """TF32 off (cuDNN convolutions would otherwise use it on Ampere and later), grads off."""
  torch = torch_module()
  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    with torch.inference_mode():
      yield torch
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_device():
  torch = torch_module()
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def nchw(x, device):
  """[..., H, W, C] numpy -> float32 torch [B, C, H, W] on device."""
  torch = torch_module()
  x = np.asarray(x, np.float32)
  x = x.reshape((-1,) + x.shape[-3:]).transpose(0, 3, 1, 2)
  return torch.from_numpy(np.array(x, order="C")).to(device)  # a copy: device_get's arrays are read-only


def chunked(fn, *arrays, chunk: int, device):
  """fn over NHWC numpy arrays `chunk` images at a time; the outputs concatenated on the CPU."""
  torch = torch_module()
  n = int(np.prod(np.asarray(arrays[0]).shape[:-3]))
  flat = [np.asarray(a).reshape((n,) + np.asarray(a).shape[-3:]) for a in arrays]
  outs = [fn(*[nchw(a[i:i + chunk], device) for a in flat]) for i in range(0, n, chunk)]
  return torch.cat([o.float().cpu() for o in outs])


def prototype_logits(torch, support, labels, query, ways: int, scale=None):
  """-[scale *] squared distance of each query to each class mean, for one task."""
  onehot = torch.nn.functional.one_hot(labels, ways).to(support.dtype)
  centers = onehot.t() @ support / onehot.sum(0, keepdim=True).t()
  dist = (query.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(2)
  return -dist if scale is None else -(dist * scale)
