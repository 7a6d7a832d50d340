"""Accuracy comparison: one converted model, the same episodes, JAX and PyTorch.

`compare_checkpoint` restores a checkpoint, loads the very same variables into
the PyTorch reference modules (torch_reference: GNet for IDeMe-Net, the
ClassificationNetwork for its stage-1 embedding), samples the evaluation
episodes exactly as evaluate.Evaluator does under the standard protocol
(episode i from fold_in(eval.seed's sample key, i), the prediction key of each
batch of eval.tasks episodes from fold_in(eval.seed's predict key, start)), so
the JAX accuracies are those of --mode=eval, and scores every prediction mode
in both frameworks on the same episode tensors. It writes
<workdir>/compare_<split>.json.

What each framework computes:
  idemenet_pretrain  'default': prototype classifier (-squared distance to class
                     means) on E's 512-d features.
  idemenet           'plain': prototypes of the real supports only, -scale * squared
                     distance. 'deformed': the random choices (probe flip, gallery
                     candidate) are JAX's, taken from method.deform with the same key
                     and the same support features as predict uses; PyTorch computes
                     everything after them itself: the patch weights (attentionNet +
                     toWeight), the fusion, the embeddings of real supports, queries
                     and deformed images, prototypes of real + deformed supports and
                     -scale * squared distance (GNet.prototype_logits).

JAX runs as --mode=eval does (its default matmul precision, which on an
NVIDIA GPU is TF32 for float32; pass precision='highest' for true float32);
PyTorch runs in float32 with TF32 off, eval mode, on CUDA when torch has it.

Flax -> PyTorch loading inverts convert.py's key mapping instead of restating
it: the converter is run on a state_dict whose tensors hold their own element
indices, so every Flax leaf it returns says which torch elements it came from
(layout transposes and reshapes included), and the Flax values are scattered
back there.
"""

import contextlib
import os
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fewshot_jax import checkpoint
from fewshot_jax import config as config_lib
from fewshot_jax import convert
from fewshot_jax import evaluate
from fewshot_jax import files
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax.data import augment as augment_lib
from fewshot_jax.data import episodes as episodes_lib
from fewshot_jax.errors import CheckpointError, ConfigError
from fewshot_jax.methods import common

SUPPORTED = ("idemenet", "idemenet_pretrain")
TOLERANCE_POINTS = 0.1  # the accuracies of the two frameworks must agree to this many points
_DUPLICATE_TRUNK = ("CNet.resnet.convnet.", "CNet.")  # GNet registers the trunk twice (shared modules)


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("--mode=compare runs the PyTorch reference models and needs torch: "
                      "pip install 'fewshot_jax[torch]'") from None
  return torch


# ---------------------------------------------------------------- Flax -> PyTorch


def _plain(tree):
  """Flax variables (FrozenDicts, device arrays) -> nested dicts of numpy arrays."""
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


def load_into_torch(module, variables, converter: Callable[[dict], dict], aliases: Mapping[str, str] = (),
                    what: str = "model"):
  """Loads Flax `variables` into the torch `module` through the inverse of `converter`.

  `converter` is a convert.*_from_torch function (state_dict -> variables). It
  is called on an index state_dict: every tensor of `module` holds the global
  indices of its elements, so each Flax leaf it returns holds, element by
  element, the torch position its value goes to. `aliases` {copy prefix:
  original prefix} gives keys that are a second name of the same tensor (they
  get the original's indices, as the converter's duplicate check expects).
  torch keys the converter drops (GNet's CNet.resnet.convnet.fc, the unused
  stage-1 head) and num_batches_tracked keep the module's own values. Any leaf
  of `variables` the inverse does not account for is a CheckpointError.
  """
  torch = _torch()
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
  variables = _plain(variables)
  if jax.tree.structure(positions) != jax.tree.structure(variables):
    names = lambda tree: {"/".join(str(getattr(e, "key", e)) for e in path)
                          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    want, have = names(positions), names(variables)
    raise CheckpointError(f"the variables do not fit the PyTorch {what}: missing {sorted(want - have)[:5]}, "
                          f"unexpected {sorted(have - want)[:5]}")
  flat = np.zeros(offset, np.float32)
  covered = np.zeros(offset, bool)
  for pos, value in zip(jax.tree.leaves(positions), jax.tree.leaves(variables)):
    if pos.shape != value.shape:
      raise CheckpointError(f"a variable of shape {value.shape} does not fit the PyTorch {what} ({pos.shape})")
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


def gnet_to_torch(params, batch_stats, config: ml_collections.ConfigDict):
  """IDeMe-Net variables -> torch_reference.idemenet.GNet (eval mode, float32).

  The trunk goes to CNet.* and, being the same modules, to CNet.resnet.convnet.*;
  embedding/fc to GNet's fc; deformation to attentionNet / toWeight; scale to scale.
  CNet.resnet.convnet.fc (the stage-1 head GNet never uses) keeps GNet's fc values,
  so the module's state_dict converts back without a duplicate mismatch.
  """
  from fewshot_jax.methods import idemenet  # pylint: disable=import-outside-toplevel
  from fewshot_jax.torch_reference import idemenet as torch_idemenet  # pylint: disable=import-outside-toplevel
  mc = config.method
  size = idemenet.input_size(config)
  net = torch_idemenet.GNet(grid=mc.grid, num_classes=mc.num_classes,
                            weight_features=torch_idemenet.weight_features(size))
  converter = lambda sd: convert.idemenet_from_torch(sd, grid=mc.grid, num_classes=mc.num_classes,
                                                     image_size=size, source="the index state_dict")
  load_into_torch(net, {"params": params, "batch_stats": batch_stats}, converter,
                  aliases=dict([_DUPLICATE_TRUNK]), what="GNet")
  head = net.CNet.resnet.convnet.fc
  with _torch().no_grad():
    head.weight.copy_(net.fc.weight)
    head.bias.copy_(net.fc.bias)
  return net.float().eval()


def embedding_to_torch(params, batch_stats, num_classes: int):
  """Stage-1 ResNet-18 variables (fc included) -> torch_reference.resnet.ClassificationNetwork."""
  from fewshot_jax.torch_reference import resnet as torch_resnet  # pylint: disable=import-outside-toplevel
  net = torch_resnet.ClassificationNetwork(num_classes)
  converter = lambda sd: convert.embedding_from_torch(sd, num_classes=num_classes, source="the index state_dict")
  load_into_torch(net, {"params": params, "batch_stats": batch_stats}, converter, what="ClassificationNetwork")
  return net.float().eval()


# ---------------------------------------------------------------- PyTorch side


@contextlib.contextmanager
def _float32_torch():
  """TF32 off (cuDNN convolutions would otherwise use it on Ampere and later), grads off."""
  torch = _torch()
  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    with torch.inference_mode():
      yield torch
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_device():
  torch = _torch()
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _nchw(x, device):
  """[..., H, W, C] numpy -> float32 torch [B, C, H, W] on device."""
  torch = _torch()
  x = np.asarray(x, np.float32)
  x = x.reshape((-1,) + x.shape[-3:]).transpose(0, 3, 1, 2)
  return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _chunked(fn, *arrays, chunk: int, device):
  """fn over NHWC numpy arrays `chunk` images at a time; the outputs concatenated on the CPU."""
  torch = _torch()
  n = int(np.prod(np.asarray(arrays[0]).shape[:-3]))
  flat = [np.asarray(a).reshape((n,) + np.asarray(a).shape[-3:]) for a in arrays]
  outs = [fn(*[_nchw(a[i:i + chunk], device) for a in flat]) for i in range(0, n, chunk)]
  return torch.cat([o.float().cpu() for o in outs])


def _proto_logits(torch, support, labels, query, ways: int, scale=None):
  """-[scale *] squared distance of each query to each class mean, for one task."""
  onehot = torch.nn.functional.one_hot(labels, ways).to(support.dtype)
  centers = onehot.t() @ support / onehot.sum(0, keepdim=True).t()
  dist = (query.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(2)
  return -dist if scale is None else -(dist * scale)


def _torch_logits(method_name, net, ep, probe, gallery, ways, chunk, device) -> dict:
  """{mode: logits [T, Q, N]} of the torch model on one batch of episodes (numpy inputs)."""
  with _float32_torch() as torch:
    t, s = ep["support"].shape[:2]
    q = ep["query"].shape[1]
    embed = net.embed
    sf = _chunked(embed, ep["support"], chunk=chunk, device=device).reshape(t, s, -1)
    qf = _chunked(embed, ep["query"], chunk=chunk, device=device).reshape(t, q, -1)
    labels = torch.from_numpy(np.asarray(ep["support_labels"], np.int64))
    if method_name == "idemenet_pretrain":
      return {"default": torch.stack([_proto_logits(torch, sf[i], labels[i], qf[i], ways) for i in range(t)])}
    augnum = probe.shape[2]
    df = _chunked(lambda p, g: net(p, g)[0], probe, gallery, chunk=chunk, device=device).reshape(t, s * augnum, -1)
    d_labels = labels.repeat_interleave(augnum, dim=1)  # support-major, as the reshape
    # GNet's own prototype_logits (-scale * squared distance to the class means), on its device.
    logits = lambda s_, y_, q_: net.prototype_logits(s_.to(device), y_.to(device), q_.to(device), ways).cpu()
    plain = [logits(sf[i], labels[i], qf[i]) for i in range(t)]
    deformed = [logits(torch.cat([sf[i], df[i]]), torch.cat([labels[i], d_labels[i]]), qf[i]) for i in range(t)]
    return {"deformed": torch.stack(deformed), "plain": torch.stack(plain)}


# ---------------------------------------------------------------- the comparison


def _jax_side(method_name, method, config):
  """Jitted (params, state, episode, key) -> ({mode: logits}, probe, gallery); probe / gallery
  None for methods without deformation."""
  if method_name == "idemenet":
    from fewshot_jax.methods import idemenet  # pylint: disable=import-outside-toplevel
    model = idemenet.embedding_model(config)

    def side(params, state, episode, key):
      logits = evaluate._modes(method, params, state, episode, key)  # pylint: disable=protected-access
      # The support features exactly as forward() computes them (one pass over supports and
      # queries), so deform() picks the same gallery candidates as the logits above used.
      images, split = common.flatten_images(episode)
      e_vars = {"params": params["embedding"], "batch_stats": state["batch_stats"]["embedding"]}
      support_feats, _ = split(model.apply(e_vars, images, train=False)[0])
      probe, gallery, _, _ = method.deform(params, state, episode, key, support_feats)
      return logits, probe, gallery
  else:
    def side(params, state, episode, key):
      return evaluate._modes(method, params, state, episode, key), None, None  # pylint: disable=protected-access
  return jax.jit(side)


def torch_model(method_name: str, config: ml_collections.ConfigDict, params, state):
  if method_name == "idemenet":
    return gnet_to_torch(params, state["batch_stats"], config)
  if method_name == "idemenet_pretrain":
    return embedding_to_torch(params, state["batch_stats"], config.method.num_classes)
  raise ConfigError(f"--mode=compare supports method.name in {list(SUPPORTED)}, not {method_name!r}")


def compare_on_episodes(method_name: str, config: ml_collections.ConfigDict, params, state,
                        episode_batches: Iterable[episodes_lib.Episode], key, num_episodes: int | None = None,
                        precision: str | None = None, chunk: int = 64, return_logits: bool = False) -> dict:
  """Scores every prediction mode in JAX and PyTorch on the same episodes.

  `episode_batches` yields Episode batches of T tasks; the batch starting at
  episode `start` is predicted with fold_in(key, start), as Evaluator does with
  its predict key. Stops after `num_episodes` episodes (the last batch is run
  whole in JAX, so the random choices do not depend on the cut).

  Returns {mode: {"jax": [E] accuracies, "torch": [E] accuracies,
  "agreement": [E] fraction of queries with the same argmax,
  "logit_rel_diff": [E] max |jax - torch| / max |torch| of the episode's logits}}
  (and "jax_logits" / "torch_logits" [E, Q, N] when return_logits).
  """
  if method_name not in SUPPORTED:
    raise ConfigError(f"--mode=compare supports method.name in {list(SUPPORTED)}, not {method_name!r}")
  method = methods.build(config)
  side = _jax_side(method_name, method, config)
  device = torch_device()
  net = torch_model(method_name, config, params, state).to(device)
  parts, start = [], 0
  for episode in episode_batches:
    if num_episodes is not None and start >= num_episodes:
      break
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      logits, probe, gallery = jax.device_get(side(params, state, episode, jax.random.fold_in(key, start)))
    ep = jax.device_get({"support": episode.support, "support_labels": episode.support_labels,
                         "query": episode.query, "query_labels": episode.query_labels})
    t = ep["support"].shape[0]
    keep = t if num_episodes is None else min(t, num_episodes - start)
    cut = lambda x, keep=keep: None if x is None else x[:keep]
    ep = {k: v[:keep] for k, v in ep.items()}
    ways = int(episode.classes.shape[1])
    torch_logits = _torch_logits(method_name, net, ep, cut(probe), cut(gallery), ways, chunk, device)
    labels = ep["query_labels"]
    part = {}
    for mode, jl in logits.items():
      jl = np.asarray(jl[:keep], np.float32)
      tl = torch_logits[mode].numpy()
      jp, tp = jl.argmax(-1), tl.argmax(-1)
      part[mode] = {"jax": (jp == labels).mean(-1), "torch": (tp == labels).mean(-1),
                    "agreement": (jp == tp).mean(-1),
                    "logit_rel_diff": np.abs(jl - tl).max((1, 2)) / np.maximum(np.abs(tl).max((1, 2)), 1e-30)}
      if return_logits:
        part[mode].update(jax_logits=jl, torch_logits=tl)
    parts.append(part)
    start += t
  if not parts:
    raise ConfigError("no episodes to compare")
  return {mode: {k: np.concatenate([p[mode][k] for p in parts]) for k in parts[0][mode]} for mode in parts[0]}


def standard_episode_batches(config: ml_collections.ConfigDict, dataset, num_episodes: int):
  """(batches, predict key): evaluate.Evaluator's standard-protocol episodes, eval.tasks at a time
  (episode i from fold_in(sample key, i); (sample key, predict key) = split(key(eval.seed)))."""
  sample = _sampler(config)
  _, predict_key = jax.random.split(jax.random.key(config.eval.seed))

  def batches():
    for start in range(0, num_episodes, config.eval.tasks):
      yield sample(dataset, start)

  return batches(), predict_key


_SAMPLERS = {}


def _sampler(config):
  """Jitted (dataset, start) -> Episode of tasks start..start+eval.tasks-1, as Evaluator samples
  them; one per distinct sampling setting (a second compare in a process compiles nothing)."""
  ways, shots, queries, tasks = config.episode.ways, config.episode.shots, config.eval.queries, config.eval.tasks
  setting = (ways, shots, queries, tasks, config.eval.seed, config.data.to_json(), config.augment.to_json())
  if setting not in _SAMPLERS:
    aug = augment_lib.from_config(config, ways, training=False)
    sample_key, _ = jax.random.split(jax.random.key(config.eval.seed))

    @jax.jit
    def sample(dataset, start):
      task_keys = jax.vmap(lambda i: jax.random.fold_in(sample_key, i))(start + jnp.arange(tasks))
      return episodes_lib.sample_tasks(task_keys, dataset, ways=ways, shots=shots, queries=queries, augment=aug)

    _SAMPLERS[setting] = sample
  return _SAMPLERS[setting]


def summarize_comparison(per_mode: dict) -> dict:
  """Per-episode arrays of compare_on_episodes -> the JSON summary (accuracies in percent)."""
  modes = {}
  for mode, r in per_mode.items():
    jax_s, torch_s = evaluate.summarize(r["jax"]), evaluate.summarize(r["torch"])
    diff = abs(jax_s["accuracy"] - torch_s["accuracy"])
    modes[mode] = {"jax": {"accuracy": jax_s["accuracy"], "ci95": jax_s["ci95"]},
                   "torch": {"accuracy": torch_s["accuracy"], "ci95": torch_s["ci95"]},
                   "difference": diff,
                   "prediction_agreement": float(np.mean(r["agreement"])),
                   "max_logit_rel_diff": float(np.max(r["logit_rel_diff"])),
                   "within_tolerance": bool(diff <= TOLERANCE_POINTS)}
  return modes


def compare_checkpoint(config: ml_collections.ConfigDict, workdir: str, episodes: int | None = None,
                       precision: str | None = None) -> dict:
  """Scores the eval.checkpoint (default best) checkpoint of workdir in JAX and PyTorch on the
  first `episodes` (default eval.episodes) standard-protocol episodes of eval.split.

  Returns {"episodes": E, "modes": {mode: {"jax": {accuracy, ci95}, "torch": {accuracy, ci95},
  "difference": |jax - torch| in points, "prediction_agreement": fraction of queries with the
  same argmax, "max_logit_rel_diff", "within_tolerance"}}, "per_episode": {mode: {"jax": [E],
  "torch": [E]}} (fractions), ...} and writes it to <workdir>/compare_<split>.json.
  `precision` (e.g. 'highest') runs the JAX side under jax.default_matmul_precision; None
  keeps --mode=eval's numbers.
  """
  name = _supported_method(config, "compare")
  num = config.eval.episodes if episodes is None else episodes
  if not isinstance(num, int) or isinstance(num, bool) or num < 1:
    raise ConfigError(f"the number of episodes to compare must be a positive integer, not {num!r}")
  _torch()
  mesh = sharding.make_mesh()
  config = config_lib.fit_to_devices(config, mesh.size)
  method, state = checkpoint.load_for_eval(config, workdir, mesh, config.eval.checkpoint)
  split = config.eval.split
  # The Evaluator loads the split and checks that the episodes fit it; its sampling is mirrored
  # by standard_episode_batches.
  evaluator = evaluate.Evaluator(method, config, mesh, split, num, protocol="standard")
  batches, predict_key = standard_episode_batches(config, evaluator.dataset, num)
  per_mode = compare_on_episodes(name, config, state.params, state.model_state, batches, predict_key,
                                 num_episodes=num, precision=precision)
  result = {"method": name, "dataset": config.data.name, "split": split, "ways": config.episode.ways,
            "shots": config.episode.shots, "protocol": "standard", "step": int(state.step),
            "checkpoint": config.eval.checkpoint, "episodes": num,
            "queries_per_episode": config.eval.queries * config.episode.ways,
            "default_mode": evaluate.default_mode(config) if name == "idemenet" else "default",
            "jax_backend": jax.default_backend(), "jax_precision": precision or "default",
            "torch_device": str(torch_device()), "tolerance_points": TOLERANCE_POINTS,
            "modes": summarize_comparison(per_mode),
            "per_episode": {mode: {"jax": r["jax"].tolist(), "torch": r["torch"].tolist()}
                            for mode, r in per_mode.items()}}
  checkpoint.write_json(os.path.join(workdir, f"compare_{split}.json"), result)
  return result


def _supported_method(config: ml_collections.ConfigDict, mode: str) -> str:
  """Validates config; its method.name, which must have a PyTorch reference (SUPPORTED)."""
  config_lib.validate(config)
  name = config.method.name
  if name not in SUPPORTED:
    raise ConfigError(f"--mode={mode} supports method.name in {list(SUPPORTED)}, not {name!r}")
  return name


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict:
  """Writes the eval.checkpoint (default best) model of workdir as a PyTorch state_dict in the
  authors' format, so a researcher can go back to the PyTorch code (or check our converter on a
  trained model: --mode=convert of this file restores the same variables).

  IDeMe-Net presets write a GNet state_dict (metaNet_*.t7's keys, the duplicate
  CNet.resnet.convnet.* copy included); `pretrain` a ClassificationNetwork one
  (softRandom.t7's keys). Written through a temporary file and a rename: a crash
  never leaves a partial file at `path`.
  """
  name = _supported_method(config, "export")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):  # before the checkpoint is read
    raise ConfigError(f"cannot write --torch_checkpoint={path!r}: {directory} is not a directory")
  torch = _torch()
  _, state = checkpoint.load_for_eval(config, workdir, sharding.make_mesh(), config.eval.checkpoint)
  state_dict = torch_model(name, config, state.params, state.model_state).state_dict()
  with files.atomic_path(path) as tmp:
    torch.save(state_dict, tmp)
  return {"exported": path, "workdir": workdir, "method": name, "step": int(state.step),
          "checkpoint": config.eval.checkpoint, "keys": len(state_dict)}


def format_table(result: dict) -> str:
  """Markdown table of a compare_checkpoint result."""
  head = (f"{result.get('method', '?')} on {result.get('episodes', '?')} {result.get('split', '')} episodes"
          f" ({result.get('ways', '?')}-way {result.get('shots', '?')}-shot, step {result.get('step', '?')};"
          f" JAX on {result.get('jax_backend', '?')}, PyTorch on {result.get('torch_device', '?')})")
  lines = [head, "", "| mode | JAX accuracy (%) | PyTorch accuracy (%) | difference (points) | prediction agreement |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for mode, m in result["modes"].items():
    lines.append(f"| {mode} | {m['jax']['accuracy']:.2f} ± {m['jax']['ci95']:.2f} "
                 f"| {m['torch']['accuracy']:.2f} ± {m['torch']['ci95']:.2f} | {m['difference']:.3f} "
                 f"| {100 * m['prediction_agreement']:.2f}% |")
  return "\n".join(lines)
