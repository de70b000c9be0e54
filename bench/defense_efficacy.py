"""Does each defense work here? Every baseline on one backdoored model with neurons to prune:
ASR / ACC before and after, and what it changed (``neurons_pruned``, ``weights_changed``, measured
on the weights by ``run_defense``), one JSON line per defense.

Setting (the one ``tests/test_baselines_efficacy.py`` asserts on): BadNets 10% on a wider tiny_cnn
(``--width``, default 32: 32/64/128/256 channels, 480 BN neurons), synthetic 4,000/1,000, 12
``fast`` epochs; the defender holds 10% of the clean training set; each defense at the CPU-sized
settings of the test module (``SETTINGS``), BackdoorBench's defaults otherwise.

    .venv/bin/python bench/defense_efficacy.py --seed 0 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import machine  # also puts the repository on sys.path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--defenses", default="clp,ft,fp,nwc_fp,anp,rnp,nad,ibau,ftsam")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_baselines_efficacy import SETTINGS

    from defense.data import load_dataset
    from defense.data.splits import defender_subset
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import attack_metrics
    from defense.models.tiny_cnn import TinyCNN
    from defense.train import get_recipe, train
    from defense.trial import TrialConfig, make_poisoned

    print(f"# defense_efficacy: {machine()}", flush=True)
    small = dict(n_train=4000, n_test=1000)
    tr, te = load_dataset("synthetic", **small)
    cfg = TrialConfig(attack="badnets", seed=a.seed, epochs=12, dataset_params=small, device="cpu")
    pois = make_poisoned(cfg, tr, te)
    bd, _, bd_true = pois.backdoor_test()
    torch.manual_seed(a.seed)
    model = TinyCNN(10, 3, a.width)
    train(model, pois.train, get_recipe("fast"), seed=a.seed, device="cpu", hook=pois.hook, epochs=12)
    model.eval()
    m0 = attack_metrics(model, te, bd, bd_true, 0)
    print(json.dumps({"name": "none", "width": a.width, "seed": a.seed, "acc": m0["acc"], "asr": m0["asr"]}), flush=True)
    clean, _ = defender_subset(tr, 0.1, seed=0)
    for name in a.defenses.split(","):
        c0 = time.process_time()
        out = run_defense(name, model, clean, SETTINGS[name], DefenseContext(device="cpu", seed=0))
        m = attack_metrics(out.model, te, bd, bd_true, 0)
        d = out.diagnostics
        print(json.dumps({"name": name, "width": a.width, "seed": a.seed, "acc": round(m["acc"], 4),
                          "asr": round(m["asr"], 4), "neurons_pruned": d["neurons_pruned"],
                          "weights_changed": d["weights_changed"], "cpu_s": round(time.process_time() - c0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
