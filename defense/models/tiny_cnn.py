"""A tiny CNN for tests and CPU demos: three conv-BN-ReLU blocks that pool early (~3k img/s
on 2 CPU threads). Same building blocks as the paper models (Conv2d + BatchNorm2d), so every
defense, TSBD's neuron scoring included, runs on it unchanged.
"""
from __future__ import annotations

import torch.nn as nn

from defense.models import register_model


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.MaxPool2d(2),
            *_block(4 * w, 8 * w),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        return self.linear(self.pool(self.features(x)).flatten(1))


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
    return TinyCNN(num_classes, in_channels)
