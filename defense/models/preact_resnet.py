"""PreAct-ResNet18, BackdoorBench's CIFAR variant (3x3 stem, no max-pool, 11.17M parameters
for 10 classes). Shortcut 1x1 convolutions live in a module named ``shortcut`` so that TSBD's
neuron-weight-change scoring can exclude them by name, as the reference does.

Source of the architecture: He et al., "Identity Mappings in Deep Residual Networks" (2016),
and BackdoorBench's ``models/preact_resnet.py``.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from defense.models import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            seq = []
            for s in [stride] + [1] * (n - 1):
                seq.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("preact_resnet18", paper=True)
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
