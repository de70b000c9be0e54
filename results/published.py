"""Published reference numbers shipped with bdgrid (``results/published/``).

``backdoorbench``: BackdoorBench's whole leaderboard table, ``backdoorbench_results.csv``, a byte
copy of ``static/data/results.csv`` of the backdoorbench/backdoorbench.github.io repository (source
and commit in ``results/published/README.md``): 4 datasets x 4 architectures x 12 attacks x 16
defenses (incl. no defense) x 5 poisoning ratios, ACC/ASR/RA as fractions. Read here as published,
only renamed to bdgrid's names and scaled to percent; cells the CSV leaves empty or sets to -1
(its "not run" mark) are not published. DER is derived from a defense row and the 'none' row of
the same setting and attack with the formula of ``defense.metrics``
(DER = (max(0, dASR) - max(0, dACC) + 1) / 2), never typed in.

Names: datasets as bdgrid's (``tiny`` -> ``tiny-imagenet``); ``preactresnet18`` -> bdgrid's
``preact_resnet18``; the other architectures keep BackdoorBench's names (``vgg19_bn``,
``vit_b_16``, ``convnext_tiny``), which bdgrid's imported ``bb_<name>`` models match
(``published_arch``); attacks and defenses in bdgrid's spelling (``badnet`` -> ``badnets``,
``no defense`` -> ``none``, ``i-bau`` -> ``ibau``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent / "published"

# --compare name -> CSV file
SOURCES = {"backdoorbench": ("backdoorbench_results.csv", "backdoorbench_leaderboard_html.csv")}
# the setting a grid on other data (synthetic, tiny_cnn) is compared with, flagged as across settings
DEFAULT_SETTING = ("cifar10", "preact_resnet18", 0.1)

_DATASETS = {"tiny": "tiny-imagenet"}
_ARCHS = {"preactresnet18": "preact_resnet18"}
_ATTACKS = {"badnet": "badnets"}
_DEFENSES = {"nodefense": "none"}
# bdgrid's own vgg19_bn has a 512 -> classes head where BackdoorBench's torchvision VGG19-BN has a
# 4096-4096 MLP head: compared, with this note
ARCH_NOTES = {"vgg19_bn": "bdgrid's vgg19_bn has a one-layer 512 -> classes head, BackdoorBench's (torchvision) "
                          "a 4096-4096 MLP head; imported BackdoorBench models are bb_vgg19_bn."}


def norm(name) -> str:
    """'i-BAU' -> 'ibau', 'Input-aware' -> 'inputaware': names compared loosely across sources."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def published_arch(arch: str) -> str:
    """The leaderboard's name for one of bdgrid's architectures (``bb_vgg19_bn`` -> ``vgg19_bn``)."""
    arch = str(arch)
    return arch[3:] if arch.startswith("bb_") else arch


def _read_backdoorbench(path: Path, source: str) -> pd.DataFrame:
    raw = pd.read_csv(path)
    df = pd.DataFrame({
        "dataset": raw["dataset"].map(lambda v: _DATASETS.get(v, v)),
        "arch": raw["backbone"].map(lambda v: _ARCHS.get(v, v)),
        "pratio": raw["ratio"].astype(float),
        "attack": raw["attack_name"].map(norm).map(lambda v: _ATTACKS.get(v, v)),
        "defense": raw["defense_name"].map(norm).map(lambda v: _DEFENSES.get(v, v)),
    })
    for ours, theirs in (("acc", "test_acc"), ("asr", "test_asr"), ("ra", "test_ra")):
        v = raw[theirs].astype(float)
        df[ours] = (v * 100).where(v >= 0)  # -1: not run
    df["source"] = source
    return df[df[["acc", "asr", "ra"]].notna().any(axis=1)].reset_index(drop=True)


def load_published(name: str = "backdoorbench") -> pd.DataFrame:
    """The reference table ``name`` with columns dataset, arch, pratio, attack, defense, acc, asr,
    ra, der (percent; der empty for 'none' and where no 'none' row exists), source."""
    if name not in SOURCES:
        raise ValueError(f"unknown published source '{name}'; valid: {', '.join(SOURCES)}")
    csv_file, html_file = SOURCES[name]
    df = _read_backdoorbench(HERE / csv_file, "bb-results.csv")
    page = _read_backdoorbench(HERE / html_file, "bb-leaderboard-html")
    keys = ["dataset", "arch", "pratio", "attack"]
    # the CSV where it has numbers, the leaderboard pages where it has none (README.md: counts)
    have = set(map(tuple, df[keys + ["defense"]].values))
    page = page[[tuple(v) not in have for v in page[keys + ["defense"]].values]]
    df = pd.concat([df, page], ignore_index=True)
    base = df[df["defense"] == "none"][keys + ["acc", "asr"]].rename(columns={"acc": "acc0", "asr": "asr0"})
    m = df.merge(base, on=keys, how="left")
    der = ((m["asr0"] - m["asr"]).clip(lower=0) - (m["acc0"] - m["acc"]).clip(lower=0) + 100.0) / 2
    df["der"] = der.where(df["defense"] != "none").values
    return df


def settings(pub: pd.DataFrame) -> set[tuple]:
    """The (dataset, arch, pratio) settings a published table covers."""
    return {(d, a, round(float(p), 6)) for d, a, p in pub[["dataset", "arch", "pratio"]].drop_duplicates().values}


def counterpart_setting(pub: pd.DataFrame, dataset, arch, pratio) -> tuple | None:
    """The published setting for one of ours, or None when the leaderboard has none."""
    try:
        key = (str(dataset), published_arch(arch), round(float(pratio), 6))
    except (TypeError, ValueError):
        return None
    return key if key in settings(pub) else None


def index(pub: pd.DataFrame) -> dict:
    """(dataset, arch, pratio, attack, defense) -> published row (a namedtuple), for ``lookup``."""
    return {(r.dataset, r.arch, round(float(r.pratio), 6), r.attack, r.defense): r for r in pub.itertuples()}


def lookup(idx: dict, setting: tuple, attack, defense):
    """The published row for (setting, attack, defense) from ``index(pub)``, or None."""
    return idx.get((*setting, norm(attack), norm(defense)))


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
