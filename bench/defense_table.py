"""Every defense on the same backdoored models: before/after ACC, ASR, RA and DER, one Markdown table.

Protocol (the trial's, ``defense.trial.run_trial``): a tiny_cnn is backdoored once per attack
(synthetic data, ``fast`` recipe), the defender holds a seeded 5% of the clean training set, every
defense runs with its registered defaults unless ``--param`` says otherwise, and every number is
on the reported test split (the validation split is never read here). DER = (max(0, dASR) -
max(0, dACC) + 1) / 2 (``defense.metrics.der``).

CPU default: the shared test fixtures' setting (synthetic 4,000/1,000, 12 epochs, seed 0), so the
table describes exactly the models ``tests/test_tsbd_e2e.py`` purifies. ``--models DIR`` caches the
backdoored models (``DIR/<attack>.pt``, a state dict loaded with ``weights_only=True``).

    .venv/bin/python bench/defense_table.py                                  # all defenses, badnets + blended
    .venv/bin/python bench/defense_table.py --defenses ft,tsbd --attacks badnets -p tsbd.n=0.15
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine  # noqa: E402
from defense.data import load_dataset  # noqa: E402
from defense.data.splits import defender_subset, val_test_indices  # noqa: E402
from defense.methods import DEFENSES, DefenseContext, run_defense  # noqa: E402
from defense.metrics import der  # noqa: E402
from defense.models import create_model  # noqa: E402
from defense.trial import TrialConfig, evaluate, make_poisoned, train_backdoored  # noqa: E402

ALL = "ft,fp,nad,anp,clp,ibau,rnp,ftsam,nwc_fp,tsbd"


def backdoored(attack: str, a, models: Path | None):
    cfg = TrialConfig(attack=attack, seed=a.seed, pratio=a.pratio, epochs=a.epochs, device="cpu",
                      dataset_params=dict(n_train=a.n_train, n_test=a.n_test))
    train, test = load_dataset("synthetic", **cfg.dataset_params)
    poisoned = make_poisoned(cfg, train, test)
    path = models / f"{attack}.pt" if models else None
    if path is not None and path.exists():
        info = train.info
        model = create_model(cfg.arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model, _ = train_backdoored(cfg, poisoned)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    return cfg, train, test, poisoned, model.eval()


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        if not param or not value:
            raise SystemExit(f"--param wants defense.key=value, got {item!r}")
        out.setdefault(name, {})[param] = value  # Entry.make_params coerces the type
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", default="badnets,blended")
    ap.add_argument("--defenses", default=ALL)
    ap.add_argument("-p", "--param", action="append", default=[], help="defense.key=value (repeatable)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--pratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", type=Path, default=None, help="cache dir for the backdoored models")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    overrides = parse_overrides(a.param)
    defenses = [d for d in a.defenses.split(",") if d]
    for d in defenses:
        DEFENSES.get(d)  # fail early, with did-you-mean
    print(f"# {machine()}", flush=True)
    rows = []
    for attack in [x for x in a.attacks.split(",") if x]:
        cfg, train, test, poisoned, model = backdoored(attack, a, a.models)
        _, test_idx = val_test_indices(len(test), 0.2, seed=0)
        before = evaluate(model, test, poisoned, test_idx, cfg.target, "cpu")
        clean, _ = defender_subset(train, cfg.defender_ratio, cfg.seed)
        print(f"# {attack}: before ACC {before['acc']:.3f} ASR {before['asr']:.3f} RA {before['ra']:.3f}; "
              f"Dc {len(clean)} images", flush=True)
        for name in defenses:
            t0 = time.perf_counter()
            out = run_defense(name, copy.deepcopy(model), clean, overrides.get(name, {}),
                              DefenseContext(device="cpu", seed=cfg.seed))
            after = evaluate(out.model, test, poisoned, test_idx, cfg.target, "cpu")
            row = {"attack": attack, "defense": name, "bd_acc": before["acc"], "bd_asr": before["asr"],
                   "bd_ra": before["ra"], **after, "der": der(before["acc"], before["asr"], after["acc"], after["asr"]),
                   "params": overrides.get(name, {}), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"# {attack} {name}: ACC {after['acc']:.3f} ASR {after['asr']:.3f} RA {after['ra']:.3f} "
                  f"DER {row['der']:.3f} ({row['seconds']:.0f} s)", flush=True)
    print(table(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| attack | defense | ACC before -> after | ASR before -> after | RA after | DER | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = ",".join(f"{k}={v}" for k, v in r["params"].items())
        name = r["defense"] + (f" ({extra})" if extra else "")
        lines.append(f"| {r['attack']} | {name} | {100 * r['bd_acc']:.1f} -> {100 * r['acc']:.1f} | "
                     f"{100 * r['bd_asr']:.1f} -> {100 * r['asr']:.1f} | {100 * r['ra']:.1f} | {r['der']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
