"""ResNet-18 in PyTorch with torchvision's exact module layout and parameter names.

torchvision is not a dependency here, yet checkpoints of the IDeMe-Net
embedding (softRandom.t7) are state_dicts of torchvision's resnet18 wrapped in
`ClassificationNetwork`. Rebuilding the same modules under the same names makes
`load_state_dict` of such a file work unchanged, and gives the parity tests and
the speed comparison a plain, idiomatic PyTorch baseline.
"""

import torch
from torch import nn


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; `downsample` (1x1 conv + BN) when the shape changes."""

  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = _conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    self.stride = stride

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class ResNet18(nn.Module):
  """torchvision.models.resnet18: state_dict keys conv1.weight, bn1.*, layer1.0.conv1.weight, ...,
  layer2.0.downsample.0.weight, layer2.0.downsample.1.*, ..., fc.weight, fc.bias."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.layer1 = self._layer(64, 64, 1)
    self.layer2 = self._layer(64, 128, 2)
    self.layer3 = self._layer(128, 256, 2)
    self.layer4 = self._layer(256, 512, 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)
    # torchvision's initialisation, so a fresh model here starts where a fresh torchvision one does.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  @staticmethod
  def _layer(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))

  def features(self, x):
    """Globally pooled 512-d features (everything but fc)."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


class ClassificationNetwork(nn.Module):
  """The stage-1 (softRandom) embedding network: its only child is `convnet`, a ResNet-18
  whose fc maps 512 -> num_classes, so its state_dict keys are convnet.conv1.weight, ...,
  convnet.fc.weight."""

  def __init__(self, num_classes: int = 64):
    super().__init__()
    self.convnet = ResNet18(num_classes)

  def embed(self, x):
    return self.convnet.features(x)

  def forward(self, x):
    return self.convnet(x)
