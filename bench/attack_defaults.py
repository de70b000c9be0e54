"""One attack at its default trigger parameters on a wider tiny_cnn: ACC / ASR, one JSON line.

Setting: synthetic 4,000/1,000, the attack tests' recipe (``tests/attack_setup.RECIPE``: ``fast``
with batch 64, lr 0.1), a TinyCNN of width ``WIDTH`` (tiny_cnn is width 16) trained ``EPOCHS``
epochs, seed 0, poisoning 10%. ``PARAMS`` (JSON) may shorten resource training only (trigger
optimisation steps, reference-model epochs, generator / encoder training), never the trigger's
strength, so the ASR is the defaults' ASR.

    .venv/bin/python bench/attack_defaults.py wanet 32 20
    .venv/bin/python bench/attack_defaults.py lf 32 20 '{"steps": 100, "ref_epochs": 4}'
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import machine  # also puts the repository on sys.path

import torch


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        raise SystemExit(__doc__)
    name, width, epochs = argv[0], int(argv[1]), int(argv[2])
    params = json.loads(argv[3]) if len(argv) > 3 else {}
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from attack_setup import RECIPE, attack_ctx

    from defense.attacks import run_attack
    from defense.data import load_dataset
    from defense.models.tiny_cnn import TinyCNN
    from defense.resources import ResourceCache
    from defense.train import train
    from defense.trial import evaluate

    tr, te = load_dataset("synthetic", n_train=4000, n_test=1000)
    c0 = time.process_time()
    p = run_attack(name, tr, te, params, attack_ctx(ResourceCache(tempfile.mkdtemp()), recipe=replace(RECIPE, epochs=8)))
    torch.manual_seed(0)
    model = TinyCNN(10, 3, width)
    train(model, p.train, replace(RECIPE, epochs=epochs), seed=0, device="cpu", hook=p.hook)
    r = evaluate(model, te, p, torch.arange(len(te)), 0, "cpu")
    out = {"machine": machine(), "attack": name, "width": width, "epochs": epochs, "params": params, "acc": round(r["acc"], 4),
           "asr": round(r["asr"], 4), "cpu_s": round(time.process_time() - c0, 1)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
