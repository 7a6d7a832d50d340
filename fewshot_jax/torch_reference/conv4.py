"""Conv-4 ProtoNet embedding in PyTorch, the baseline and conversion source for models/conv4.py.

Layout as in the prototypical-networks reference: `encoder.{i}` is
Sequential(conv3x3 64 pad 1 with bias, BatchNorm2d, ReLU, MaxPool2d(2)), so keys
are encoder.{i}.0.weight/bias (conv) and encoder.{i}.1.* (BN). methods/protonet_torch.conv4_from_torch
maps block i onto the Flax Conv_i / BatchNorm_i. The output is flattened in NCHW
order, the Flax Conv4 in NHWC order: the embeddings are the same numbers in
another order, so distances (and ProtoNet logits) agree exactly.
"""

import torch
from torch import nn


class Conv4(nn.Module):

  def __init__(self, in_channels: int = 3, features: int = 64, blocks: int = 4):
    super().__init__()
    layers = []
    for _ in range(blocks):
      layers.append(nn.Sequential(nn.Conv2d(in_channels, features, 3, padding=1),
                                  nn.BatchNorm2d(features), nn.ReLU(), nn.MaxPool2d(2)))
      in_channels = features
    self.encoder = nn.Sequential(*layers)

  def forward(self, x):
    return torch.flatten(self.encoder(x), 1)
