"""Model registry: ``create_model(name, num_classes=..., in_channels=..., image_size=...)``.

One file per model family, one ``@register_model`` per name (the timm pattern). Models take
normalised float input ``(B, C, H, W)`` and return logits.
"""
from __future__ import annotations

from typing import Callable

import torch

from defense.registry import Registry

MODELS = Registry("model")


def register_model(name: str, **meta) -> Callable:
    """Register ``fn(num_classes, in_channels, image_size) -> nn.Module``."""
    return MODELS.register(name, **meta)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> torch.nn.Module:
    return MODELS.get(name).fn(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from defense.models import preact_resnet, tiny_cnn, vgg, vit  # noqa: E402,F401  (registration)
