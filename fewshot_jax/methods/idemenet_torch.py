"""IDeMe-Net's PyTorch bridge: the authors' checkpoints (GNet metaNet_*.t7, stage-1 softRandom.t7)
<-> our variables, and the PyTorch forward --mode=compare scores.

What each framework computes in compare:
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
"""

from collections.abc import Mapping

import ml_collections
import numpy as np
import torch

from fewshot_jax import state_dicts
from fewshot_jax.data import augment
from fewshot_jax.methods import common
from fewshot_jax.methods import idemenet
from fewshot_jax.torch_reference import idemenet as torch_idemenet
from fewshot_jax.torch_reference import resnet as torch_resnet

DUPLICATE_TRUNK = ("CNet.resnet.convnet.", "CNet.")  # GNet registers the trunk twice (shared modules)


def _gnet_keys_hint(state_dict) -> str:
  if any(k.startswith("CNet.") for k in state_dict):
    return " (its keys look like a GNet checkpoint: use idemenet_from_torch)"
  return ""


def _embedding_keys_hint(state_dict) -> str:
  keys = list(state_dict)
  if keys and all(k.startswith("convnet.") for k in keys):
    return " (its keys look like a ClassificationNetwork checkpoint: use embedding_from_torch)"
  return ""


def embedding_from_torch(state_dict: Mapping, num_classes: int = 64, source: str = "state_dict") -> dict:
  """ClassificationNetwork state_dict (keys convnet.*) -> models.resnet.ResNet18 variables
  {'params', 'batch_stats'}, fc included. `source` names the checkpoint in errors."""
  spec = state_dicts.Spec()
  spec.resnet18("convnet.", (), num_classes)
  return spec.convert(state_dict, source, "ClassificationNetwork (ResNet-18 embedding)", hint=_gnet_keys_hint)


def deformation_spec(spec: state_dicts.Spec, encoder, to_weight, path, grid, image_size,
                     channels=(32, 64, 64, 32, 16)) -> None:
  """D's keys in `spec`: the attention encoder's conv + BatchNorm blocks and the to-weight linear."""
  side, inp = image_size, 6
  for i, c in enumerate(channels):
    spec.conv(f"{encoder}{i}.0", path + (f"encoder_{i}", "conv"), c, inp, 3, bias=True)
    spec.batchnorm(f"{encoder}{i}.1", path + (f"encoder_{i}", "bn"), c)
    inp, side = c, side // 2
  spec.linear(to_weight, path + ("to_weight",), grid * grid, inp * side * side)


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
  spec = state_dicts.Spec()
  spec.resnet18("CNet.", ("embedding",), num_classes=0)
  spec.linear("fc", ("embedding", "fc"), num_classes, 512)
  spec.resnet18(DUPLICATE_TRUNK[0], None, num_classes)
  deformation_spec(spec, "attentionNet.encoder.", "toWeight.0", ("deformation",), grid, image_size)
  spec.add("scale", (1,), "params", ("scale",), lambda a: a.reshape(()))
  return spec.convert(state_dict, source, f"GNet (IDeMe-Net, grid {grid}, {image_size} px)",
                      duplicates=DUPLICATE_TRUNK, hint=_embedding_keys_hint)


def gnet_to_torch(params, batch_stats, config: ml_collections.ConfigDict):
  """IDeMe-Net variables -> torch_reference.idemenet.GNet (eval mode, float32).

  The trunk goes to CNet.* and, being the same modules, to CNet.resnet.convnet.*;
  embedding/fc to GNet's fc; deformation to attentionNet / toWeight; scale to scale.
  CNet.resnet.convnet.fc (the stage-1 head GNet never uses) keeps GNet's fc values,
  so the module's state_dict converts back without a duplicate mismatch.
  """
  mc = config.method
  size = augment.input_size(config)
  net = torch_idemenet.GNet(grid=mc.grid, num_classes=mc.num_classes,
                            weight_features=torch_idemenet.weight_features(size))
  converter = lambda sd: idemenet_from_torch(sd, grid=mc.grid, num_classes=mc.num_classes, image_size=size,
                                             source="the index state_dict")
  state_dicts.load_into_torch(net, {"params": params, "batch_stats": batch_stats}, converter,
                              aliases=dict([DUPLICATE_TRUNK]), what="GNet")
  head = net.CNet.resnet.convnet.fc
  with torch.no_grad():
    head.weight.copy_(net.fc.weight)
    head.bias.copy_(net.fc.bias)
  return net.float().eval()


def embedding_to_torch(params, batch_stats, num_classes: int):
  """Stage-1 ResNet-18 variables (fc included) -> torch_reference.resnet.ClassificationNetwork."""
  net = torch_resnet.ClassificationNetwork(num_classes)
  converter = lambda sd: embedding_from_torch(sd, num_classes=num_classes, source="the index state_dict")
  state_dicts.load_into_torch(net, {"params": params, "batch_stats": batch_stats}, converter,
                              what="ClassificationNetwork")
  return net.float().eval()


def _features(net, ep, chunk, device):
  t, s = ep["support"].shape[:2]
  q = ep["query"].shape[1]
  sf = state_dicts.chunked(net.embed, ep["support"], chunk=chunk, device=device).reshape(t, s, -1)
  qf = state_dicts.chunked(net.embed, ep["query"], chunk=chunk, device=device).reshape(t, q, -1)
  return sf, qf, torch.from_numpy(np.asarray(ep["support_labels"], np.int64))


def pretrain_bridge(config: ml_collections.ConfigDict, shapes=None) -> state_dicts.TorchBridge:
  """Stage 1: the ClassificationNetwork (softRandom.t7's keys), scored as a prototype classifier."""
  num_classes = config.method.num_classes

  def logits(net, ep, extras, device, chunk):
    del extras
    ways = int(ep["ways"])
    with state_dicts.float32_torch():
      sf, qf, labels = _features(net, ep, chunk, device)
      return {"default": torch.stack([state_dicts.prototype_logits(torch, sf[i], labels[i], qf[i], ways)
                                      for i in range(sf.shape[0])])}

  return state_dicts.TorchBridge(
      from_torch=lambda sd, source="state_dict": embedding_from_torch(sd, num_classes, source=source),
      to_torch=lambda params, state: embedding_to_torch(params, state["batch_stats"], num_classes),
      logits=logits)


def bridge(config: ml_collections.ConfigDict, shapes=None) -> state_dicts.TorchBridge:
  """Stage 2: GNet (metaNet_*.t7's keys, the duplicate trunk included)."""
  mc = config.method
  size = augment.input_size(config)
  model = idemenet.embedding_model(config)
  method = idemenet.build(config)

  def jax_extras(params, state, episode, keys):
    # The support features exactly as forward() computes them (one pass over supports and
    # queries), so deform() picks the same gallery candidates as the JAX logits used.
    images, split = common.flatten_images(episode)
    e_vars = {"params": params["embedding"], "batch_stats": state["batch_stats"]["embedding"]}
    support_feats, _ = split(model.apply(e_vars, images, train=False)[0])
    probe, gallery, _, _ = method.deform(params, state, episode, keys, support_feats)
    return probe, gallery

  def logits(net, ep, extras, device, chunk):
    probe, gallery = extras
    ways = int(ep["ways"])
    with state_dicts.float32_torch():
      sf, qf, labels = _features(net, ep, chunk, device)
      t, s = sf.shape[:2]
      augnum = probe.shape[2]
      df = state_dicts.chunked(lambda p, g: net(p, g)[0], probe, gallery, chunk=chunk,
                               device=device).reshape(t, s * augnum, -1)
      d_labels = labels.repeat_interleave(augnum, dim=1)  # support-major, as the reshape
      # GNet's own prototype_logits (-scale * squared distance to the class means), on its device.
      proto = lambda s_, y_, q_: net.prototype_logits(s_.to(device), y_.to(device), q_.to(device), ways).cpu()
      plain = [proto(sf[i], labels[i], qf[i]) for i in range(t)]
      deformed = [proto(torch.cat([sf[i], df[i]]), torch.cat([labels[i], d_labels[i]]), qf[i]) for i in range(t)]
      return {"deformed": torch.stack(deformed), "plain": torch.stack(plain)}

  def complete(variables, load_train_split):
    """The gallery, built from the config's train split with the converted embedding (as stage 2
    builds it from a stage-1 run); the file's BatchNorm statistics are stored exactly (export ->
    convert is bit-identical): method.gallery_bn='train' recalibrates them when stage 2 starts."""
    model_state = idemenet.attach_gallery(config, variables, load_train_split())
    model_state.pop("params")
    model_state["batch_stats"] = variables["batch_stats"]
    return model_state

  return state_dicts.TorchBridge(
      from_torch=lambda sd, source="state_dict": idemenet_from_torch(sd, mc.grid, mc.num_classes, size,
                                                                     source=source),
      to_torch=lambda params, state: gnet_to_torch(params, state["batch_stats"], config),
      logits=logits, jax_extras=jax_extras, complete=complete)
