"""Published reference numbers shipped with bdgrid (``results/published/*.csv``).

Each CSV holds one setting (dataset, arch, poisoning ratio) in percent, with a ``source``
column and a header comment naming where the numbers come from. DER is derived here from a
defense row and the 'none' row of the same attack with the same formula as ``defense.metrics``
(DER = (max(0, dASR) - max(0, dACC) + 1) / 2), so it is never typed in by hand.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent / "published"

# --compare name -> CSV file
SOURCES = {"backdoorbench": "backdoorbench_cifar10_preactresnet18_10pct.csv"}


def norm(name) -> str:
    """'i-BAU' -> 'ibau', 'Input-aware' -> 'inputaware': names compared loosely across sources."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def load_published(name: str = "backdoorbench") -> pd.DataFrame:
    """The reference table ``name`` with columns dataset, arch, pratio, attack, defense, acc, asr,
    ra, der (percent; der empty for 'none'), source."""
    if name not in SOURCES:
        raise ValueError(f"unknown published source '{name}'; valid: {', '.join(SOURCES)}")
    df = pd.read_csv(HERE / SOURCES[name], comment="#")
    df["attack"] = df["attack"].map(norm)
    df["defense"] = df["defense"].map(norm)
    base = df[df["defense"] == "none"].set_index(["dataset", "arch", "pratio", "attack"])
    ders = []
    for _, r in df.iterrows():
        k = (r["dataset"], r["arch"], r["pratio"], r["attack"])
        if r["defense"] == "none" or k not in base.index:
            ders.append(float("nan"))
            continue
        b = base.loc[k]
        ders.append((max(0.0, b["asr"] - r["asr"]) - max(0.0, b["acc"] - r["acc"]) + 100.0) / 2)
    df["der"] = ders
    return df
