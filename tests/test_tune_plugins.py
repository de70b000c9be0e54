"""Test-only registrations for the tuning tests, imported by Ray workers via the spec's ``imports``.

* defense ``tune_probe``: a cheap TSBD look-alike with a ``prepare`` (one epoch of clean
  unlearning -> per-channel weight change) shared across trials that change only ``n`` or
  the fine-tuning parameters; every prepare call drops a file into ``count_dir`` so a test
  can count calls made in any worker process.
* dataset ``synthetic_garbled``: ``synthetic`` with every image and label of the REPORTED test
  split replaced by noise; the validation split is untouched. Tuning on it must give exactly
  the same objective values as on ``synthetic``.
"""
from __future__ import annotations

import copy
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from defense.data import DATASETS, Data, load_dataset, register_dataset
from defense.data.augment import normalize, to_float
from defense.data.splits import val_test_indices
from defense.data.synthetic import INFO, SyntheticParams
from defense.methods import DEFENSES, DefenseOutput, register_defense
from defense.train import get_recipe, train


@dataclass
class ProbeParams:
    n: float = 0.1  # fraction of conv channels zeroed, highest weight change first
    lr: float = 0.01  # fine-tuning learning rate
    epochs: int = 1  # fine-tuning epochs
    lr_un: float = 1e-3  # shared: unlearning learning rate (prepare)
    count_dir: str = ""  # shared: prepare() writes one file here per call
    sleep_s: float = 0.0  # a slow defense, for the kill/resume test
    fail_above: float = 1.0  # raise when n > fail_above (failed-trial path)
    die_once_dir: str = ""  # the first defense call that creates a marker here kills its worker (os._exit)

    def check(self):
        if not 0 <= self.n <= 1:
            yield f"n must be in [0, 1], got {self.n}"


def probe_prepare(model, clean, p: ProbeParams, ctx):
    if p.count_dir:
        Path(p.count_dir).mkdir(parents=True, exist_ok=True)
        (Path(p.count_dir) / f"prepare-{uuid.uuid4().hex}").write_text(f"{p.lr_un} {os.getpid()}")
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=p.lr_un, momentum=0.9)
    x = normalize(to_float(clean.x), clean.info)
    for i in range(0, len(x), 64):
        opt.zero_grad()
        (-F.cross_entropy(m(x[i:i + 64]), clean.y[i:i + 64])).backward()  # gradient ascent
        opt.step()
    w0, wu = dict(model.named_parameters()), dict(m.named_parameters())
    return {n: (wu[n] - w0[n]).abs().flatten(1).sum(1).detach() for n in w0 if w0[n].ndim == 4}


if "tune_probe" not in DEFENSES:
    @register_defense("tune_probe", params=ProbeParams, prepare=probe_prepare, shared=("lr_un", "count_dir"))
    def tune_probe(model, clean, p: ProbeParams, ctx):
        if p.n > p.fail_above:
            raise RuntimeError(f"probe: n={p.n} above fail_above={p.fail_above}")
        if p.die_once_dir:  # a worker lost as an OOM kill loses it: Ray's retry must re-run the stage
            Path(p.die_once_dir).mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(Path(p.die_once_dir) / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(17)
            except FileExistsError:
                pass
        time.sleep(p.sleep_s)
        scores = ctx.prepared
        model = copy.deepcopy(model)
        flat = torch.cat([s for s in scores.values()])
        k = int(len(flat) * p.n)
        if k:
            tau = flat.topk(k).values[-1]
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, s in scores.items():
                    params[name][s >= tau] = 0
        if p.epochs:
            train(model, clean, get_recipe("paper", lr=p.lr, batch_size=64), seed=ctx.seed, device=ctx.device,
                  epochs=p.epochs)
        return DefenseOutput(model.eval(), {"zeroed": k})


if "synthetic_garbled" not in DATASETS:
    @register_dataset("synthetic_garbled", info=INFO, params=SyntheticParams)
    def synthetic_garbled(root, **params):
        train_set, test_set = load_dataset("synthetic", root, **params)
        _, test_idx = val_test_indices(len(test_set), 0.2, seed=0)  # TrialConfig's val_ratio 0.2
        g = torch.Generator().manual_seed(123)
        x, y = test_set.x.clone(), test_set.y.clone()
        x[test_idx] = torch.randint(0, 256, x[test_idx].shape, generator=g, dtype=torch.uint8)
        y[test_idx] = torch.randint(0, INFO.num_classes, (len(test_idx),), generator=g)
        return train_set, Data(x, y, test_set.info)
