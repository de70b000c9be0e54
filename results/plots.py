"""Figures from the results dataset, as PNG (300 dpi) and PDF, sized for a paper.

* ``acc-asr``: clean accuracy against attack success rate, one colour per defense, one marker
  per attack, mean over seeds with ± std error bars; the good corner is bottom right.
* ``tsbd-n``: TSBD ACC and ASR against the neuron ratio n (TSBD.md Stage 1c), one panel per
  attack, mean ± std band over seeds. TSBD rows are found by method name (``defense_name``,
  else ``defense``), so the points of a sweep (labelled ``tsbd(n=0.1)``, ...) all count. n is
  read from the defense's ``params`` JSON (key ``n``), or from an ``n`` column.
* ``curves``: per-epoch values from the ``curves`` table, one row of panels per phase
  (attack training, unlearning, fine-tuning), one panel per metric, one line per
  (attack, defense), mean over seeds.

Figures use the Agg backend (no display needed), 8 pt text and a 7 in (two-column) or
3.5 in (one-column) width, so they stay legible when placed at their natural size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from results.tables import DISPLAY, _order, method_names, norm, select

KINDS = ("acc-asr", "tsbd-n", "curves")
ONE_COL, TWO_COL = 3.5, 7.0  # inches: NeurIPS/ICML column and text widths
MARKERS = "osD^vP*Xh<>"
SKIP_METRICS = ("seconds", "images")  # per-epoch wall time and image count: logged, flat lines as panels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
                         "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2,
                         "lines.markersize": 4, "axes.spines.top": False, "axes.spines.right": False,
                         "pdf.fonttype": 42})  # TrueType in PDFs, as camera-ready checks require
    return plt


def _label(v) -> str:
    return DISPLAY.get(norm(v), str(v))


def _save(fig, dest: Path, name: str) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        p = dest / f"{name}.{ext}"
        fig.savefig(p, dpi=300, bbox_inches="tight")
        out.append(p)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


class NothingToPlot(ValueError):
    """The selected rows hold nothing this kind of plot can show."""


def acc_asr(df: pd.DataFrame, dest: Path, filters: dict | None = None, split: str = "test") -> list[Path]:
    plt = _plt()
    sel = select(df, filters, split)
    sel = sel.dropna(subset=["acc", "asr"]) if not sel.empty else sel
    if sel.empty:
        raise NothingToPlot("no rows with both ACC and ASR to plot")
    # One point per (defense, its params, attack): a sweep (e.g. TSBD over n) shows as a cloud of
    # one colour instead of a single mean over different configurations.
    sel = sel.assign(acc=sel["acc"] * 100, asr=sel["asr"] * 100, params=sel["params"].fillna("{}"))
    g = sel.groupby(["defense", "params", "attack"])[["acc", "asr"]].agg(["mean", "std"]).reset_index()
    defenses = [k[0] for k in _order(((d,) for d in g["defense"]), ["defense"])]
    attacks = [k[0] for k in _order(((a,) for a in g["attack"]), ["attack"])]
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(ONE_COL, 2.8))
    for i, d in enumerate(defenses):
        for j, a in enumerate(attacks):
            for _, r in g[(g["defense"] == d) & (g["attack"] == a)].iterrows():
                ax.errorbar(r[("acc", "mean")], r[("asr", "mean")], xerr=r[("acc", "std")], yerr=r[("asr", "std")],
                            fmt=MARKERS[j % len(MARKERS)], color=colors(i % 10), ecolor=colors(i % 10),
                            elinewidth=0.6, capsize=1.5, markeredgecolor="black", markeredgewidth=0.3)
    handles = [plt.Line2D([], [], color=colors(i % 10), marker="o", ls="", label=_label(d)) for i, d in enumerate(defenses)]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[j % len(MARKERS)], ls="", label=_label(a))
                for j, a in enumerate(attacks)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xlabel("Clean accuracy ACC (%)")
    ax.set_ylabel("Attack success rate ASR (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3, lw=0.5)
    ax.set_title("ACC vs ASR (better: bottom right)")
    return _save(fig, dest, "acc-asr")


def _neuron_ratio(df: pd.DataFrame, key: str = "n") -> pd.Series:
    from_params = df["params"].map(lambda s: json.loads(s).get(key) if isinstance(s, str) and s.startswith("{") else None) \
        if "params" in df.columns else pd.Series(None, index=df.index)
    if key in df.columns:
        from_params = from_params.where(from_params.notna(), df[key])
    n = pd.to_numeric(from_params, errors="coerce")
    if key == "n" and "chosen_n" in df.columns:  # n: auto rows say "auto" in params; the n used is chosen_n
        n = n.where(n.notna(), pd.to_numeric(df["chosen_n"], errors="coerce"))
    return n


def tsbd_n(df: pd.DataFrame, dest: Path, filters: dict | None = None, split: str = "test",
           defense: str = "tsbd", key: str = "n") -> list[Path]:
    plt = _plt()
    sel = select(df, filters, split)
    if not sel.empty:
        # by method name: the rows of a sweep are labelled 'tsbd(n=0.1)', 'tsbd(n=0.3)', ...
        sel = sel[method_names(sel).map(norm) == norm(defense)]
    if sel.empty:
        raise NothingToPlot(f"no '{defense}' rows to plot against {key}")
    sel = sel.assign(n=_neuron_ratio(sel, key)).dropna(subset=["n"])
    if sel.empty:
        raise NothingToPlot(f"no '{defense}' row records its neuron ratio ('{key}' in params)")
    attacks = [k[0] for k in _order(((a,) for a in sel["attack"]), ["attack"])]
    ncol = min(4, len(attacks))
    nrow = -(-len(attacks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(TWO_COL if ncol > 1 else ONE_COL, 1.9 * nrow), squeeze=False,
                             sharey=True)
    for ax, a in zip(axes.flat, attacks):
        g = sel[sel["attack"] == a].groupby("n")[["acc", "asr"]].agg(["mean", "std"]).sort_index() * 100
        for m, c, lab in (("acc", "tab:blue", "ACC"), ("asr", "tab:red", "ASR")):
            mean, std = g[(m, "mean")], g[(m, "std")].fillna(0)
            ax.plot(g.index, mean, marker="o", color=c, label=lab)
            ax.fill_between(g.index, mean - std, mean + std, color=c, alpha=0.2, lw=0)
        ax.set_title(_label(a))
        ax.set_xlabel("neuron ratio n")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    axes[0][0].set_ylabel("%")
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    return _save(fig, dest, "tsbd-n")


def curves(cdf: pd.DataFrame, dest: Path, filters: dict | None = None, metrics: Sequence[str] | None = None) -> list[Path]:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    sel = select(cdf, filters, split=None)
    if sel.empty:
        raise NothingToPlot("no per-epoch curves recorded (table 'curves')")
    if metrics:
        sel = sel[sel["metric"].isin(list(metrics))]
        if sel.empty:
            raise NothingToPlot(f"no curves for metric(s) {', '.join(metrics)}")
    if not metrics:
        sel = sel[~sel["metric"].isin(SKIP_METRICS)]
    known = ["attack", "unlearn", "finetune"]
    phases = sorted(dict.fromkeys(sel["phase"].fillna("?")), key=lambda p: (known.index(p) if p in known else 99, p))
    per_phase = {ph: list(dict.fromkeys(sel[sel["phase"].fillna("?") == ph]["metric"])) for ph in phases}
    ncol = max(len(v) for v in per_phase.values())
    fig, axes = plt.subplots(len(phases), ncol, figsize=(TWO_COL, 1.8 * len(phases)), squeeze=False)
    sel = sel.assign(line=sel["attack"].fillna("?").map(_label) + " / " + sel["defense"].fillna("?").map(_label))
    lines = sorted(sel["line"].unique())
    colors = plt.get_cmap("tab10")
    for i, ph in enumerate(phases):
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(per_phase[ph]):
                ax.axis("off")
                continue
            m = per_phase[ph][j]
            part = sel[(sel["phase"].fillna("?") == ph) & (sel["metric"] == m)]
            for k, ln in enumerate(lines):
                g = part[part["line"] == ln].groupby("epoch")["value"].mean().sort_index()
                if len(g):
                    ax.plot(g.index, g.values, color=colors(k % 10), label=ln)
            ax.set_title(f"{ph}: {m}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, lw=0.5)
    if len(lines) > 1:  # one legend for every line of every panel (phases draw different lines)
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return _save(fig, dest, "curves")


def plot(out_dir: str | Path, kind: str, dest: str | Path | None = None, filters: dict | None = None,
         split: str = "test", metrics: Sequence[str] | None = None) -> list[Path]:
    """Draw ``kind`` from the results under ``out_dir``; files go to ``dest`` (default
    ``<out>/figures``). Returns the written paths."""
    from results.compact import maybe_compact
    from results.reader import load, load_report
    from results.tables import columns_needed

    dest = Path(dest) if dest else Path(out_dir) / "figures"
    if kind in ("acc-asr", "tsbd-n"):
        maybe_compact(out_dir)  # many small per-stage files: folded into parts first (results.compact)
        # only what the figure reads: the table's columns, the neuron ratio and its key in extra
        read, extra = columns_needed(filters=filters)
        df = load_report(out_dir, columns=[*read, "chosen_n"], extra=[*extra, "n"], split=split)[0]
        return (acc_asr if kind == "acc-asr" else tsbd_n)(df, dest, filters, split)
    if kind == "curves":
        return curves(load(out_dir, table="curves"), dest, filters, metrics)
    raise ValueError(f"unknown plot kind '{kind}'; valid: {', '.join(KINDS)}")
