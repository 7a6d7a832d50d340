"""Training steps (forward, backward, Adam update) in plain PyTorch, for speed comparison.

What a PyTorch user would write for each method, on the modules of this
package: NCHW tensors, eager mode, `loss.backward()` then `optimizer.step()`.
benchmarks/torch_vs_jax.py times these against the jitted JAX steps.

  protonet_loss        Conv-4 ProtoNet (Snell et al.'s euclidean_dist), BN in train mode.
  lgmnet_step          LGM-Net via lgmnet.loss (train-mode, intertask BatchNorm).
  IDeMeNetStage2       IDeMe-Net stage 2 on GNet: BN in eval mode, E frozen or trained by the
                       classification loss; gallery candidates, fusion and E on the deformed
                       images all inside the step.
"""

import torch
import torch.nn.functional as F

from fewshot_jax.torch_reference import lgmnet as lgm


def euclidean_dist(x, y):
  """||x_i - y_j||^2 for x [M, D], y [N, D] (the prototypical-networks reference's helper)."""
  return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(2)


def class_means(features, labels, ways: int):
  """[ways, D] mean feature of each class."""
  onehot = F.one_hot(labels, ways).to(features.dtype)
  return onehot.t() @ features / onehot.sum(0).unsqueeze(1)


def protonet_loss(model, support, support_labels, query, query_labels, ways: int):
  """Mean cross-entropy over tasks; support [T, S, C, H, W], query [T, Q, C, H, W].

  The encoder runs once on every image of every task (train-mode BatchNorm
  over the meta-batch, as the JAX method).
  """
  t, s = support.shape[:2]
  feats = model(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
  sup, qry = feats[:t * s].view(t, s, -1), feats[t * s:].view(t, query.shape[1], -1)
  logits = torch.stack([-euclidean_dist(q, class_means(f, l, ways))
                        for f, l, q in zip(sup, support_labels, qry)])
  return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())


def protonet_step(model, optimizer, support, support_labels, query, query_labels, ways: int):
  optimizer.zero_grad(set_to_none=True)
  loss = protonet_loss(model, support, support_labels, query, query_labels, ways)
  loss.backward()
  optimizer.step()
  return loss.detach()


def lgmnet_step(model, optimizer, support, support_labels, query, query_labels, ways: int):
  """One meta-batch: fresh weight-generator noise per task and layer, as the JAX loss."""
  optimizer.zero_grad(set_to_none=True)
  noise = torch.randn(model.noise_shape(support.shape[0]), device=support.device)
  loss = lgm.loss(model, support, support_labels, query, query_labels, ways, noise)
  loss.backward()
  optimizer.step()
  return loss.detach()


class IDeMeNetStage2:
  """IDeMe-Net stage-2 training on a GNet (one task per step).

  Per step: E (frozen BatchNorm) embeds the real supports and queries without
  autograd; each class prototype picks its `choose_num` nearest gallery images
  (torch.topk on squared distances to the precomputed gallery features); every
  support gets `augnum` probes (the support, flipped with probability
  `probe_flip`) paired with a random candidate of its class; D weighs the G x G
  patches of all S * augnum pairs in one batch, the fused images go through E,
  and the prototype loss over real + deformed supports trains D and the scale.
  With `train_embedding`, the classification loss (GNet.fc on E of the detached
  deformed images, the probe's base class) trains E and fc; the prototype
  loss's gradient is kept off E (backward(inputs=...)), as separate optimisers
  per loss would.

  gallery_images: uint8 [G, 3, H, W] (raw pixels, normalised and resized to
  `input_size` when used); gallery_features: [G, 512] E's features.
  """

  def __init__(self, net, gallery_images, gallery_features, *, mean, std, input_size: int,
               augnum: int = 5, choose_num: int = 30, probe_flip: float = 0.5,
               train_embedding: bool = False, lr_deformation: float = 1e-3, lr_scale: float = 1e-3,
               lr_embedding: float = 1e-4, lr_fc: float = 1e-3):
    self.net = net.eval()  # BatchNorm frozen in stage 2
    self.gallery_images, self.gallery_features = gallery_images, gallery_features
    device = gallery_features.device
    self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    self.input_size, self.augnum, self.choose_num = input_size, augnum, choose_num
    self.probe_flip, self.train_embedding = probe_flip, train_embedding
    self.deformation_params = list(net.attentionNet.parameters()) + list(net.toWeight.parameters())
    groups = [{"params": self.deformation_params, "lr": lr_deformation},
              {"params": [net.scale], "lr": lr_scale}]
    embedding = [p for n, p in net.CNet.named_parameters() if not n.startswith("resnet.convnet.fc.")]
    for p in list(net.CNet.parameters()) + list(net.fc.parameters()):
      p.requires_grad_(train_embedding)
    if train_embedding:
      groups += [{"params": embedding, "lr": lr_embedding},
                 {"params": list(net.fc.parameters()), "lr": lr_fc}]
    self.optimizer = torch.optim.Adam(groups)

  def preprocess(self, images_u8):
    x = (images_u8.float() - self.mean) / self.std
    if x.shape[-1] != self.input_size:
      x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                        align_corners=False, antialias=True)
    return x

  def losses(self, support, support_labels, query, query_labels, classes):
    """(prototype loss, classification loss or None) of one task; images are normalised NCHW."""
    net, ways, a = self.net, classes.shape[0], self.augnum
    with torch.no_grad():
      feats = net.embed(torch.cat([support, query]))
      support_feats, query_feats = feats[:len(support)], feats[len(support):]
      protos = class_means(support_feats, support_labels, ways)
      candidates = torch.cdist(protos, self.gallery_features).topk(self.choose_num, largest=False).indices
    s = len(support)
    pick = torch.randint(self.choose_num, (s, a), device=support.device)
    gallery_idx = candidates[support_labels].gather(1, pick)  # [S, A]
    flip = torch.rand(s, a, 1, 1, 1, device=support.device) < self.probe_flip
    probe = support.unsqueeze(1).expand(-1, a, -1, -1, -1)
    probe = torch.where(flip, probe.flip(-1), probe).flatten(0, 1)  # [S*A, 3, H, W], support-major
    gallery = self.preprocess(self.gallery_images[gallery_idx.flatten()])
    weights = net.patch_weights(probe, gallery)
    deformed = net.deform(probe, gallery, weights)
    deformed_feats = net.embed(deformed)
    deformed_labels = support_labels.repeat_interleave(a)
    logits = net.prototype_logits(torch.cat([support_feats, deformed_feats]),
                                  torch.cat([support_labels, deformed_labels]), query_feats, ways)
    proto = F.cross_entropy(logits, query_labels)
    cls = None
    if self.train_embedding:
      cls = F.cross_entropy(net.classify(net.embed(deformed.detach())), classes[deformed_labels])
    return proto, cls

  def step(self, support, support_labels, query, query_labels, classes):
    self.optimizer.zero_grad(set_to_none=True)
    proto, cls = self.losses(support, support_labels, query, query_labels, classes)
    if cls is None:
      proto.backward()
    else:
      proto.backward(inputs=self.deformation_params + [self.net.scale])
      cls.backward()
    self.optimizer.step()
    return proto.detach()
