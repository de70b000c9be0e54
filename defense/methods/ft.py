"""FT: plain fine-tuning of all weights on the defender's clean data.

Defaults: BackdoorBench ``config/defense/ft/config.yaml`` (SGD lr 0.01, momentum 0.9, weight
decay 5e-4, batch 256, CosineAnnealingLR, 100 epochs). Uses ``defense.train.train``.
"""
from __future__ import annotations

from dataclasses import dataclass

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import clean_acc, finetune, working_copy


@dataclass
class FTParams:
    epochs: int = 100  # BackdoorBench ft/config.yaml
    batch_size: int = 256  # idem
    lr: float = 0.01  # idem
    momentum: float = 0.9  # idem (sgd_momentum)
    weight_decay: float = 5e-4  # idem (wd)
    schedule: str = "cosine"  # idem (CosineAnnealingLR)

    def check(self):
        if self.epochs < 0:
            yield f"epochs must be >= 0, got {self.epochs}"
        if self.lr <= 0:
            yield f"lr must be > 0, got {self.lr}"


@register_defense("ft", params=FTParams)
def defend(model, clean, p: FTParams, ctx):
    """Fine-tuning (FT): all weights, clean data, the paper recipe's optimiser (BackdoorBench ft)."""
    net = working_copy(model, ctx.device)
    clean = clean.to(next(net.parameters()).device)
    hist = finetune(net, clean, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                    weight_decay=p.weight_decay, schedule=p.schedule, seed=ctx.seed, device=ctx.device)
    curves = [{"phase": "finetune", **h} for h in hist]
    return DefenseOutput(net, {"clean_acc": clean_acc(net, clean)}, curves)
