"""ACC, ASR, RA and DER, computed batched on the data's device.

- ACC: clean test accuracy.
- ASR: fraction of backdoor test images (true class != target) classified as the target.
- RA: the same images scored against their true labels (robust accuracy).
- DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2
  (defense effectiveness rating, BackdoorBench; all values as fractions).
"""
from __future__ import annotations

import torch

from defense.data import Data
from defense.data.augment import normalize


@torch.no_grad()
def predict(model: torch.nn.Module, data: Data, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels for every image of ``data`` (eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(data), batch_size):
        x = normalize(data.x[i : i + batch_size].to(dev), data.info)
        out.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=dev)


def accuracy(model: torch.nn.Module, data: Data, labels: torch.Tensor | None = None) -> float:
    if len(data) == 0:
        return float("nan")
    pred = predict(model, data)
    ref = (labels if labels is not None else data.y).to(pred.device)
    return float((pred == ref).float().mean())


def attack_metrics(model: torch.nn.Module, clean_test: Data, bd_test: Data, bd_true: torch.Tensor,
                   target: int | torch.Tensor) -> dict[str, float]:
    """ACC on clean images; ASR and RA on backdoor images (labels of ``bd_test`` are the attack's
    targets, ``bd_true`` the images' true classes)."""
    acc = accuracy(model, clean_test)
    if len(bd_test) == 0:
        return {"acc": acc, "asr": float("nan"), "ra": float("nan")}
    pred = predict(model, bd_test)
    asr = float((pred == bd_test.y.to(pred.device)).float().mean())
    ra = float((pred == bd_true.to(pred.device)).float().mean())
    return {"acc": acc, "asr": asr, "ra": ra}


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating in [0, 1]; 0.5 means no change."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2
