"""IDeMe-Net's GNet in PyTorch, with the parameter names of the authors' checkpoints.

A GNet state_dict (metaNet_1shot.t7 / metaNet_5shot.t7) has the keys
  attentionNet.encoder.{0..4}.{0,1}.*   five conv3x3(+bias)/BN blocks on the 6-channel pair
  toWeight.0.weight / .bias             Linear(784 at 224 px, G*G): one weight per patch
  CNet.conv1.*, CNet.bn1.*, CNet.layer{1..4}.*       the ResNet-18 trunk
  CNet.resnet.convnet.*                 the same trunk again (plus an unused fc)
  fc.weight / .bias                     Linear(512, 64) on the trunk's features
  scale                                 shape [1], multiplies the squared distance
The trunk appears twice because the reference's embedding module keeps the whole
ClassificationNetwork as `resnet` and also registers its conv1, bn1, layer1..4
as its own attributes; state_dict lists a shared module under every name. This
module reproduces that, so reference checkpoints load with load_state_dict and
a state_dict saved here has exactly the reference keys.
"""

import torch
from torch import nn
import torch.nn.functional as F

from fewshot_jax.torch_reference.resnet import ClassificationNetwork

ENCODER_CHANNELS = (32, 64, 64, 32, 16)


def weight_features(image_size: int) -> int:
  """toWeight's input width: 16 channels times the map left after five 2x2 max-pools
  (224 -> 7: 784; 84 -> 2: 64)."""
  side = image_size
  for _ in ENCODER_CHANNELS:
    side //= 2
  return ENCODER_CHANNELS[-1] * side * side


def patch_borders(size: int, grid: int) -> list[int]:
  """Patch edges along one image side: k * (size // grid), the last patch taking the rest
  (224, G=3 -> [0, 74, 148, 224]; G=5 -> [0, 44, ..., 176, 224]), as in the reference."""
  step = size // grid
  return [k * step for k in range(grid)] + [size]


class AttentionNet(nn.Module):
  """The deformation sub-network's encoder: 5 x [conv3x3 pad 1, BN, ReLU, maxpool 2], flattened
  in NCHW order."""

  def __init__(self, in_channels: int = 6, channels=ENCODER_CHANNELS):
    super().__init__()
    blocks = []
    for c in channels:
      blocks.append(nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.MaxPool2d(2)))
      in_channels = c
    self.encoder = nn.Sequential(*blocks)

  def forward(self, x):
    return torch.flatten(self.encoder(x), 1)


class Trunk(nn.Module):
  """ResNet-18 without fc (512-d features), registered under two names as in the reference."""

  def __init__(self, num_classes: int = 64):
    super().__init__()
    self.resnet = ClassificationNetwork(num_classes)
    net = self.resnet.convnet
    self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
    self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
    self.avgpool = net.avgpool

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


class GNet(nn.Module):
  """Deformation sub-network (attentionNet + toWeight), embedding trunk (CNet), the 64-way fc
  and the distance scale.

  `weight_features` is toWeight's input width: 784 for 224-pixel inputs, see
  `weight_features(image_size)` for other sizes.
  """

  def __init__(self, grid: int = 3, num_classes: int = 64, weight_features: int = 784):
    super().__init__()
    self.grid = grid
    self.attentionNet = AttentionNet()
    self.toWeight = nn.Sequential(nn.Linear(weight_features, grid * grid))
    self.CNet = Trunk(num_classes)
    self.fc = nn.Linear(512, num_classes)
    self.scale = nn.Parameter(torch.ones(1))

  def patch_weights(self, probe, gallery):
    """[B, G*G] weights, row-major over the grid; probe channels come first in the pair.
    Unbounded (no activation), as in the reference."""
    return self.toWeight(self.attentionNet(torch.cat((probe, gallery), 1)))

  def weight_map(self, weights, height: int, width: int):
    """[B, G*G] patch weights -> [B, 1, H, W], each weight constant over its patch."""
    g = self.grid
    rows = torch.diff(torch.tensor(patch_borders(height, g), device=weights.device))
    cols = torch.diff(torch.tensor(patch_borders(width, g), device=weights.device))
    w = weights.view(-1, g, g).repeat_interleave(rows, dim=1).repeat_interleave(cols, dim=2)
    return w.unsqueeze(1)

  def deform(self, probe, gallery, weights):
    """W * probe + (1 - W) * gallery with W the per-pixel patch weight, the same for all channels."""
    w = self.weight_map(weights, probe.shape[2], probe.shape[3])
    return w * probe + (1.0 - w) * gallery

  def embed(self, x):
    return self.CNet(x)

  def classify(self, features):
    return self.fc(features)

  def prototype_logits(self, support_emb, support_labels, query_emb, ways: int):
    """-scale * squared Euclidean distance of each query to each class mean: [Q, ways]."""
    onehot = F.one_hot(support_labels, ways).to(support_emb.dtype)
    centers = onehot.t() @ support_emb / onehot.sum(0, keepdim=True).t()
    diff = query_emb.unsqueeze(1) - centers.unsqueeze(0)
    return -(diff.pow(2) * self.scale).sum(2)

  def forward(self, probe, gallery):
    """Embedding of the deformed images and the patch weights that made them."""
    weights = self.patch_weights(probe, gallery)
    return self.embed(self.deform(probe, gallery, weights)), weights
