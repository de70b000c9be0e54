"""VGG19 with batch norm for 32x32 inputs (the CIFAR form BackdoorBench uses: 16 conv-BN-ReLU
layers, five max-pools, a 512 -> num_classes classifier). Simonyan & Zisserman (2015).
"""
from __future__ import annotations

import torch.nn as nn

from defense.models import register_model

CFG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # also lets 64x64 inputs through
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg19_bn", paper=True)
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
    return VGG(CFG19, num_classes, in_channels, image_size)
