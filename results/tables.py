"""Paper tables from the results dataset: attack x defense pivots, mean ± std over seeds.

``pivot(df, ...)`` aggregates the rows of one split (default the reported ``test`` split) into
cells of (row labels) x (column labels) x metric, in percent: mean and sample standard
deviation (ddof=1) over the rows in the cell, which are the seeds of one configuration.
``render(df, fmt=...)`` turns that into Markdown, LaTeX (booktabs), HTML or CSV;
``markdown(df)`` is what a grid run prints at its end.

Conventions (the ones BackdoorBench and the TSBD paper use in their tables):

* columns: 'none' (no defense) first, known baselines in BackdoorBench order, TSBD last;
  rows: attacks in BackdoorBench order; anything unknown alphabetically after them.
* best value per row and metric in bold: highest ACC / RA / DER, lowest ASR, among the
  defenses (the no-defense column is the reference, not a contender). Ties at the printed
  precision are all bold.
* a cell with fewer seeds than the fullest cell shows its count, ``91.2 ± 0.3 (n=2)``.
* a missing cell is '—' and a note under the table names it. DER is not defined for 'none'
  (it compares a defended model with the undefended one), shown as '—' without a note.
* when a ``tuned_on`` column exists (hyperparameters chosen by ``bdgrid tune``), a cell whose
  attack was among those tuned on is marked † and a note lists the attacks per defense.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from results import published
from results.published import load_published, norm

METRICS = ("acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra")
LOWER_IS_BETTER = {"asr", "bd_asr"}
METRIC_LABELS = {"acc": "ACC", "asr": "ASR", "ra": "RA", "der": "DER", "bd_acc": "ACC before",
                 "bd_asr": "ASR before", "bd_ra": "RA before"}

# BackdoorBench's order of attacks and defenses (leaderboard / paper tables); TSBD last as the
# method under study.
ORDER = {
    "attack": ["badnets", "blended", "wanet", "inputaware", "lf", "ssba", "trojannn", "sig", "lc", "bpp"],
    "defense": ["none", "ft", "fp", "nad", "nc", "anp", "ibau", "clp", "rnp", "ftsam", "sau", "nwcfp", "tsbd"],
}
DISPLAY = {
    "badnets": "BadNets", "blended": "Blended", "wanet": "WaNet", "inputaware": "Input-aware", "lf": "LF",
    "ssba": "SSBA", "trojannn": "TrojanNN", "sig": "SIG", "lc": "LC", "bpp": "BppAttack", "none": "No defense", "ft": "FT",
    "fp": "FP", "nad": "NAD", "nc": "NC", "anp": "ANP", "ibau": "i-BAU", "clp": "CLP", "ftsam": "FT-SAM",
    "sau": "SAU", "tsbd": "TSBD", "rnp": "RNP", "nwcfp": "NWC-FP",
}
MISSING = "—"
SOURCE_LABELS = {"backdoorbench": "BackdoorBench"}
# Columns that, when they vary inside one cell, mean the cell mixes different experiments.
IDENTITY = ("grid", "dataset", "arch", "attack", "attack_params", "pratio", "target", "defense", "params",
            "model")  # model: an imported model's name (grid.models)


@dataclass
class Stat:
    mean: float  # percent
    std: float  # percent, NaN for one seed
    n: int


@dataclass
class Pivot:
    rows: list[str]
    cols: list[str]
    metrics: list[str]
    row_keys: list[tuple]
    col_keys: list[tuple]
    cells: dict[tuple, Stat]  # (row_key, col_key, metric) -> Stat
    digits: int = 1
    expected_n: int = 1  # counts below this are shown
    tuned: set = field(default_factory=set)  # (row_key, col_key) tuned on their own attack
    weak: set = field(default_factory=set)  # (row_key, col_key) whose backdoored model is no real start (see SANITY)
    failed: dict = field(default_factory=dict)  # (row_key, col_key) -> failure file of a stage that failed
    notes: list[str] = field(default_factory=list)


# A defense result is only meaningful on a model that has a backdoor and has learnt its task:
# below this ASR before defense (a weak or failed implant) or with clean ACC under twice chance,
# a cell is marked ‡ and its DER is not shown. Chance needs the class count; unknown datasets
# (your own) use 10 classes.
SANITY_MIN_ASR = 0.5
CLASSES = {"cifar10": 10, "cifar100": 100, "gtsrb": 43, "tiny-imagenet": 200, "mnist": 10, "synthetic": 10}
WEAK, FAILED = "‡", "failed"


# ---------------------------------------------------------------- selecting and aggregating


def _as_list(v: str | Sequence[str]) -> list[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


def parse_filters(items: Iterable[str] | None) -> dict[str, list[str]]:
    """``["dataset=cifar10", "attack=badnets,blended", "params.n=0.1"]`` -> {column: allowed values}
    (``params.KEY`` selects on a key of the JSON params)."""
    out: dict[str, list[str]] = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"a filter is column=value[,value...], got '{it}'")
        k, v = it.split("=", 1)
        out.setdefault(k.strip(), []).extend(s.strip() for s in v.split(","))
    return out


def _matches(series: pd.Series, allowed: list[str]) -> pd.Series:
    """Compare as text, and numerically where both sides are numbers (pratio=0.10 matches 0.1)."""
    txt = series.astype("string")
    hit = txt.isin(allowed)
    nums = []
    for a in allowed:
        try:
            nums.append(float(a))
        except ValueError:
            pass
    if nums:
        num = pd.to_numeric(series, errors="coerce")
        hit = hit | num.isin(nums)
    return hit.fillna(False).astype(bool)


def method_names(df: pd.DataFrame) -> pd.Series:
    """The defense method of each row. A swept defense stores its label in ``defense``
    ('tsbd(n=0.1)') and the method in ``defense_name`` (from ``extra``); rows written without
    ``defense_name`` (hand-written, older runs) only have ``defense``, which is then the method."""
    label = df["defense"] if "defense" in df.columns else pd.Series(None, index=df.index, dtype="object")
    if "defense_name" not in df.columns:
        return label
    return df["defense_name"].where(df["defense_name"].notna(), label)


def _filter_columns(df: pd.DataFrame) -> list[str]:
    """Columns a filter may name: defense_name is listed even where no row has it, since
    ``method_names`` falls back to the defense column."""
    cols = [str(c) for c in df.columns]
    return cols + ["defense_name"] if "defense_name" not in cols else cols


def _filter_hits(df: pd.DataFrame, col: str, allowed: list[str]) -> pd.Series:
    head, _, sub = col.partition(".")
    if sub and head in ("params", "attack_params", "extra") and head in df.columns and col not in df.columns:
        # params.n=0.1: a key inside the JSON column (the defense's neuron ratio, say)
        vals = df[head].map(lambda s: json.loads(s).get(sub) if isinstance(s, str) and s.startswith("{") else None)
        return _matches(vals, allowed)
    if col == "defense_name":
        return _matches(method_names(df), allowed)
    if col not in df.columns:
        raise ValueError(f"cannot filter on '{col}': no such column; columns: {', '.join(_filter_columns(df))}")
    if col == "defense":
        # defense=tsbd selects every point of a tsbd sweep (by method name), defense=tsbd(n=0.1)
        # one of them (by label): users name the method they ran, not the labels the grid made.
        return _matches(df[col], allowed) | _matches(method_names(df), allowed)
    return _matches(df[col], allowed)


def columns_needed(metrics: str | Sequence[str] = ("acc", "asr", "der"), rows: str | Sequence[str] = "attack",
                   cols: str | Sequence[str] = "defense", filters: dict | None = None) -> tuple[list[str], list[str]]:
    """(schema columns, ``extra`` keys) a table of these rows/cols/filters reads: the identity
    columns (cells average over them and say so), every metric (the weak-model mark reads
    ``bd_*``), split, method name and ``tuned_on``; a name the schema lacks is looked up in
    ``extra``. Provenance (versions, times, keys) is never decoded for a table."""
    from results.schema import schema

    names = set(schema("results").names)
    asked = [*IDENTITY, *METRICS, *_as_list(metrics), "split", "defense_name", "tuned_on", *_as_list(rows),
             *_as_list(cols), *(c.partition(".")[0] for c in (filters or {}))]
    return sorted({c for c in asked if c in names}), sorted({c for c in asked if c not in names})


def select(df: pd.DataFrame, filters: dict[str, list[str]] | None = None, split: str | None = "test") -> pd.DataFrame:
    """Rows of one split (rows without a split count as 'test') that pass every filter.
    ``defense=X`` matches a row's label or its method name (see ``method_names``)."""
    if df.empty:
        return df
    if split is not None and "split" in df.columns:
        df = df[df["split"].fillna("test").astype(str) == split]
    for col, allowed in (filters or {}).items():
        df = df[_filter_hits(df, col, allowed)]
    return df


def _sort_key(field: str, value):
    order = ORDER.get(field, [])
    n = norm(value)
    if n in order:
        return (0, order.index(n), "")
    if n == "tsbd":
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (1, math.inf, str(value))


def _order(keys: Iterable[tuple], fields: list[str]) -> list[tuple]:
    return sorted(set(keys), key=lambda k: [_sort_key(f, v) for f, v in zip(fields, k)])


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return DISPLAY.get(norm(value), str(value)) if isinstance(value, str) else str(value)


def _is_none_defense(fields: list[str], key: tuple) -> bool:
    return "defense" in fields and norm(key[fields.index("defense")]) == "none"


def pivot(df: pd.DataFrame, metrics: Sequence[str] = ("acc", "asr", "der"), rows: str | Sequence[str] = "attack",
          cols: str | Sequence[str] = "defense", filters: dict | None = None, split: str | None = "test",
          digits: int = 1, expected_n: int | None = None, failures: list[dict] | None = None) -> Pivot:
    """Aggregate ``df`` (``results.load`` output, metrics as fractions) into a Pivot in percent.
    ``failures``: the run's failed stages (``state.json``), shown as failed cells."""
    rows, cols, metrics = _as_list(rows), _as_list(cols), _as_list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(bad)}; valid: {', '.join(METRICS)}")
    sel = select(df, filters, split)
    p = Pivot(rows, cols, metrics, [], [], {}, digits=digits)
    if sel.empty:
        p.notes.append("No results match" + (f" split={split}" if split else "")
                       + (" and the filters " + ", ".join(f"{k}={','.join(v)}" for k, v in (filters or {}).items())
                          if filters else "") + ".")
        return p
    missing_cols = [c for c in rows + cols if c not in sel.columns]
    if missing_cols:
        raise ValueError(f"no column(s) {', '.join(missing_cols)} in the results")
    sel = sel.copy()
    for c in rows + cols:  # a missing label is a group of its own, not a dropped row
        sel[c] = sel[c].astype(object).where(sel[c].notna(), "?")
    groups = sel.groupby(rows + cols, dropna=False, sort=False)
    p.row_keys = _order((tuple(k[: len(rows)]) for k in groups.groups), rows)
    p.col_keys = _order((tuple(k[len(rows):]) for k in groups.groups), cols)
    mixed: dict[str, set] = {}
    for k, g in groups:
        k = tuple(k)
        rk, ck = k[: len(rows)], k[len(rows):]
        for m in metrics:
            if m == "der" and (_is_none_defense(cols, ck) or _is_none_defense(rows, rk)):
                continue  # DER compares a defended model with the undefended one: n/a for 'none'
            v = pd.to_numeric(g[m], errors="coerce").dropna() * 100 if m in g else pd.Series(dtype=float)
            if len(v):
                p.cells[(rk, ck, m)] = Stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v))
        for c in IDENTITY:
            if c in g.columns and c not in rows + cols and g[c].astype("string").nunique(dropna=False) > 1:
                mixed.setdefault(c, set()).update(g[c].astype("string").fillna("null"))
        if _weak_model(g):
            p.weak.add((rk, ck))
        if "tuned_on" in g.columns and "attack" in rows + cols:
            tuned = {norm(a) for s in g["tuned_on"].dropna().astype(str) for a in s.split(",") if a.strip()}
            if norm(k[(rows + cols).index("attack")]) in tuned:
                p.tuned.add((rk, ck))
    ns = [s.n for s in p.cells.values()]
    p.expected_n = expected_n or (max(ns) if ns else 1)
    _mark_failures(p, failures or [])
    _add_notes(p, sel, mixed)
    return p


def _weak_model(g: pd.DataFrame) -> bool:
    """The rows' backdoored model: ASR before defense under SANITY_MIN_ASR, or clean ACC under
    twice chance (mean over the group's seeds)."""
    if "bd_asr" not in g or "bd_acc" not in g:
        return False
    asr, acc = pd.to_numeric(g["bd_asr"], errors="coerce").mean(), pd.to_numeric(g["bd_acc"], errors="coerce").mean()
    k = CLASSES.get(str(g["dataset"].iloc[0]), 10) if "dataset" in g else 10
    return bool((asr == asr and asr < SANITY_MIN_ASR) or (acc == acc and acc < 2.0 / k))


def _mark_failures(p: Pivot, failures: list[dict]) -> None:
    """Cells of stages that failed (``{"info": stage identity, "file": failure file}``): a field
    the failed stage does not have (an attack stage has no defense) matches every value."""
    fields = p.rows + p.cols
    for f in failures:
        info = f.get("info") or {}
        if not any(k in info for k in fields):
            continue
        want = tuple(info.get(k) for k in fields)
        keys = [rk + ck for rk in p.row_keys for ck in p.col_keys] or []
        hits = [k for k in keys if all(w is None or str(w) == str(v) for w, v in zip(want, k))]
        if not hits and None not in want:  # nothing of that cell finished: it still gets its place
            hits = [want]
            rk, ck = want[: len(p.rows)], want[len(p.rows):]
            if rk not in p.row_keys:
                p.row_keys.append(rk)
            if ck not in p.col_keys:
                p.col_keys.append(ck)
        for k in hits:
            p.failed[(k[: len(p.rows)], k[len(p.rows):])] = f.get("file", "")


def _add_notes(p: Pivot, sel: pd.DataFrame, mixed: dict[str, set]) -> None:
    missing = []
    for rk in p.row_keys:
        for ck in p.col_keys:
            if (rk, ck) in p.failed:
                continue
            ms = [m for m in p.metrics if (rk, ck, m) not in p.cells
                  and not (m == "der" and (_is_none_defense(p.cols, ck) or _is_none_defense(p.rows, rk)))]
            if ms:
                what = ", ".join(f"{f}={v}" for f, v in zip(p.rows + p.cols, rk + ck))
                missing.append(f"({what})" + ("" if len(ms) == len(p.metrics) else f" [{', '.join(ms)}]"))
    if missing:
        p.notes.append(f"{MISSING} no result for: " + "; ".join(missing) + ".")
    low = sorted({s.n for s in p.cells.values() if s.n < p.expected_n})
    if low:
        p.notes.append(f"(n=k): only k seeds in that cell; the others have {p.expected_n}.")
    if mixed:
        p.notes.append("Cells average over differing " + "; ".join(
            f"{c} ({', '.join(sorted(v)[:4])}{', ...' if len(v) > 4 else ''})" for c, v in sorted(mixed.items()))
            + ": filter them (--filter) or add them to --rows/--cols.")
    if p.failed:
        files = sorted({f for f in p.failed.values() if f})
        p.notes.append(f"{FAILED}: the stage failed; its traceback: " + "; ".join(files) + " (rerun `bdgrid run` to retry).")
    if p.weak:
        what = sorted({", ".join(f"{f}={v}" for f, v in zip(p.rows, rk)) for rk, _ in p.weak})
        p.notes.append(f"{WEAK} not a meaningful starting point: before any defense the model's ASR is below "
                       f"{100 * SANITY_MIN_ASR:.0f}% (no real backdoor) or its clean ACC is under twice chance; "
                       f"DER is not shown there ({'; '.join(what)}).")
    if "tuned_on" in sel.columns and sel["tuned_on"].notna().any():
        per = (sel.dropna(subset=["tuned_on"]).groupby("defense")["tuned_on"]
               .agg(lambda s: sorted({a.strip() for x in s.astype(str) for a in x.split(",") if a.strip()})))
        p.notes.append("† hyperparameters tuned on this attack (not held out). Tuned on: " + "; ".join(
            f"{_label(d)}: {', '.join(_label(a) for a in attacks)}" for d, attacks in per.items()) + ".")
    p.notes.append(f"Mean ± std over seeds, in %, split={sel['split'].dropna().iloc[0] if 'split' in sel and sel['split'].notna().any() else 'test'}; "
                   "bold: best defense per row (highest ACC/RA/DER, lowest ASR).")


# ---------------------------------------------------------------- cell text and best values


def fmt_stat(s: Stat | None, digits: int, expected_n: int) -> str:
    if s is None:
        return MISSING
    txt = f"{s.mean:.{digits}f}"
    if s.n > 1 and not math.isnan(s.std):
        txt += f" ± {s.std:.{digits}f}"
    if s.n < expected_n:
        txt += f" (n={s.n})"
    return txt


def best_cols(p: Pivot, rk: tuple, metric: str) -> set:
    """Column keys holding the best value of ``metric`` in row ``rk`` (at printed precision),
    among defenses; empty when fewer than two contenders (nothing to compare)."""
    vals = {}
    for ck in p.col_keys:
        s = p.cells.get((rk, ck, metric))
        if s is None or _is_none_defense(p.cols, ck):
            continue
        vals[ck] = round(s.mean, p.digits)
    if len(vals) < 2:
        return set()
    target = min(vals.values()) if metric in LOWER_IS_BETTER else max(vals.values())
    return {ck for ck, v in vals.items() if v == target}


# ---------------------------------------------------------------- a format-neutral text table


@dataclass
class TextTable:
    stub: list[str]  # headers of the label columns
    groups: list[tuple[str, list[str]]]  # (group header, sub-headers)
    body: list[tuple[list[str], list[tuple[str, bool]]]]  # (labels, [(text, bold)])
    notes: list[str]


def _shown(p: Pivot, ck: tuple) -> list[str]:
    """The metrics a column shows: no DER under 'no defense' (it would be a column of dashes)."""
    return [m for m in p.metrics if not (m == "der" and _is_none_defense(p.cols, ck))]


def to_text_table(p: Pivot) -> TextTable:
    stub = [c.capitalize() for c in p.rows]
    cols = [ck for ck in p.col_keys if _shown(p, ck)]
    groups = [(" / ".join(_label(v) for v in ck), [METRIC_LABELS[m] for m in _shown(p, ck)]) for ck in cols]
    body = []
    for rk in p.row_keys:
        best = {m: best_cols(p, rk, m) for m in p.metrics}
        cells = []
        for ck in cols:
            for m in _shown(p, ck):
                s = p.cells.get((rk, ck, m))
                txt = fmt_stat(s, p.digits, p.expected_n)
                if s is None and (rk, ck) in p.failed:
                    txt = FAILED
                elif (rk, ck) in p.weak and m == "der":
                    txt = WEAK  # a rating against a model without a backdoor would mislead
                elif s is not None and (rk, ck) in p.weak:
                    txt += f" {WEAK}"
                if s is not None and (rk, ck) in p.tuned:
                    txt += " †"
                cells.append((txt, ck in best[m] and (rk, ck) not in p.weak))
        body.append(([_label(v) for v in rk], cells))
    return TextTable(stub, groups, body, p.notes)


def _flat_headers(t: TextTable) -> list[str]:
    if len(t.groups) == 1 and not t.groups[0][0]:
        return t.groups[0][1]
    return [f"{g} {s}".strip() for g, subs in t.groups for s in subs]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def text_markdown(t: TextTable) -> str:
    head = t.stub + _flat_headers(t)
    lines = ["| " + " | ".join(map(_md_escape, head)) + " |",
             "|" + "|".join([":---"] * len(t.stub) + ["---:"] * (len(head) - len(t.stub))) + "|"]
    for labels, cells in t.body:
        txt = [f"**{c}**" if b else c for c, b in cells]
        lines.append("| " + " | ".join(map(_md_escape, labels + txt)) + " |")
    out = "\n".join(lines)
    if t.notes:
        out += "\n\n" + "\n".join(f"- {n}" for n in t.notes)
    return out + "\n"


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def tex_escape(s: str) -> str:
    out = "".join(_TEX.get(ch, ch) for ch in s)
    return (out.replace("±", r"$\pm$").replace("—", "---").replace("†", r"$^\dagger$")
            .replace("Δ", r"$\Delta$"))


def text_latex(t: TextTable, caption: str | None = None, label: str = "tab:bdgrid") -> str:
    """A ``table`` float with caption and label around a booktabs ``tabular`` (for ``\\input``;
    needs ``\\usepackage{booktabs}``). Notes become ``%`` comments after it, so the file still
    compiles as is."""
    ns = len(t.stub)
    spec = "l" * ns + "".join(" " + "r" * len(subs) for _, subs in t.groups)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\caption{%s}" % (tex_escape(caption) if caption else
                                 r"Defense results (\%): mean $\pm$ std over seeds; best defense per row in bold."),
             r"\label{%s}" % label, r"\begin{tabular}{" + spec + "}", r"\toprule"]
    if not (len(t.groups) == 1 and not t.groups[0][0]):
        head, rules, c = ["" for _ in t.stub], [], ns + 1
        for g, subs in t.groups:
            head.append(r"\multicolumn{%d}{c}{%s}" % (len(subs), tex_escape(g)))
            rules.append(r"\cmidrule(lr){%d-%d}" % (c, c + len(subs) - 1))
            c += len(subs)
        lines += [" & ".join(head) + r" \\", " ".join(rules)]
    lines.append(" & ".join([tex_escape(s) for s in t.stub]
                            + [tex_escape(s) for _, subs in t.groups for s in subs]) + r" \\")
    lines.append(r"\midrule")
    for labels, cells in t.body:
        txt = [r"\textbf{%s}" % tex_escape(c) if b else tex_escape(c) for c, b in cells]
        lines.append(" & ".join([tex_escape(x) for x in labels] + txt) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += ["% " + n.replace("\n", " ") for n in t.notes]
    return "\n".join(lines) + "\n"


def text_html(t: TextTable) -> str:
    e = html.escape
    grouped = not (len(t.groups) == 1 and not t.groups[0][0])
    out = [f"<style>{HTML_CSS}</style>", '<table class="bdgrid-table">', "<thead>"]
    if grouped:
        out.append("<tr>" + "".join(f"<th rowspan=\"2\">{e(s)}</th>" for s in t.stub)
                   + "".join(f"<th colspan=\"{len(subs)}\">{e(g)}</th>" for g, subs in t.groups) + "</tr>")
        out.append("<tr>" + "".join(f"<th>{e(s)}</th>" for _, subs in t.groups for s in subs) + "</tr>")
    else:
        out.append("<tr>" + "".join(f"<th>{e(s)}</th>" for s in t.stub + t.groups[0][1]) + "</tr>")
    out += ["</thead>", "<tbody>"]
    for labels, cells in t.body:
        out.append("<tr>" + "".join(f"<th>{e(x)}</th>" for x in labels)
                   + "".join(f"<td><b>{e(c)}</b></td>" if b else f"<td>{e(c)}</td>" for c, b in cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    out += [f'<p class="bdgrid-note">{e(n)}</p>' for n in t.notes]
    return "\n".join(out) + "\n"


# A paper-like table in any page the fragment lands in: booktabs-style rules, numbers right-aligned
# in tabular figures, labels left.
HTML_CSS = (".bdgrid-table{border-collapse:collapse;font:13px/1.4 system-ui,sans-serif;margin:0.5em 0}"
            ".bdgrid-table thead{border-top:2px solid #222;border-bottom:1px solid #222}"
            ".bdgrid-table tbody{border-bottom:2px solid #222}"
            ".bdgrid-table th,.bdgrid-table td{padding:3px 10px}"
            ".bdgrid-table td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
            ".bdgrid-table tbody th{text-align:left;font-weight:normal}"
            ".bdgrid-table thead th{text-align:center}"
            ".bdgrid-table tbody tr:nth-child(even){background:#f6f6f6}"
            ".bdgrid-note{font:12px system-ui,sans-serif;color:#444;margin:0.2em 0}")


def pivot_csv(p: Pivot) -> str:
    """Tidy CSV: one line per (row labels, column labels, metric) with mean, std, n in percent,
    for spreadsheets and plotting; missing cells are left out (the notes go to the caller)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(p.rows + p.cols + ["metric", "mean", "std", "n", "best", "tuned_on_attack"])
    for rk in p.row_keys:
        best = {m: best_cols(p, rk, m) for m in p.metrics}
        for ck in p.col_keys:
            for m in p.metrics:
                s = p.cells.get((rk, ck, m))
                if s is None:
                    continue
                std = "" if math.isnan(s.std) else round(s.std, 6)
                w.writerow(list(rk) + list(ck) + [m, round(s.mean, 6), std, s.n, int(ck in best[m]),
                                                  int((rk, ck) in p.tuned)])
    return buf.getvalue()


# ---------------------------------------------------------------- comparison with published numbers


def _cell_setting(k: dict, df: pd.DataFrame | None) -> tuple:
    """(dataset, arch, pratio) of one cell: from its key where the table splits on the column,
    else the single value the selected rows hold (None when they hold several or none)."""
    out = []
    for col in ("dataset", "arch", "pratio"):
        if col in k:
            out.append(k[col])
            continue
        vals = df[col].dropna().unique() if df is not None and col in df.columns else []
        out.append(vals[0] if len(vals) == 1 else None)
    return tuple(out)


def compare(p: Pivot, source: str = "backdoorbench", df: pd.DataFrame | None = None) -> TextTable:
    """Ours beside published numbers: one line per (attack, defense) cell we have, and per metric
    the columns ours / published / Δ (ours − published, percentage points). Each cell is matched
    with the published row of its own setting (dataset, arch, pratio); a cell whose setting the
    source does not cover is compared with ``DEFAULT_SETTING`` and flagged in the notes."""
    if not ({"attack", "defense"} <= set(p.rows + p.cols)):
        raise ValueError("--compare needs 'attack' and 'defense' among --rows/--cols")
    pub = load_published(source)
    idx = published.index(pub)
    metrics = [m for m in p.metrics if m in ("acc", "asr", "ra", "der")]
    fields = p.rows + p.cols
    body, notes = [], list(n for n in p.notes if not n.startswith("Mean"))
    used, across, archs = set(), set(), set()
    for rk in p.row_keys:
        for ck in p.col_keys:
            k = dict(zip(fields, rk + ck))
            if not any((rk, ck, m) in p.cells for m in metrics):
                continue
            ours = _cell_setting(k, df)
            setting = published.counterpart_setting(pub, *ours)
            if setting is None:
                setting = published.DEFAULT_SETTING
                across.add(ours)
            else:
                archs.add(str(ours[1]))
            used.add(setting)
            r = published.lookup(idx, setting, k["attack"], k["defense"])
            cells = []
            for m in metrics:
                s = p.cells.get((rk, ck, m))
                theirs = getattr(r, m) if r is not None else math.nan
                theirs = math.nan if published.is_missing(theirs) else float(theirs)
                mark = " †" if s is not None and (rk, ck) in p.tuned else ""
                cells.append((fmt_stat(s, p.digits, p.expected_n) + mark, False))
                cells.append((MISSING if math.isnan(theirs) else f"{theirs:.2f}", False))
                cells.append((MISSING if s is None or math.isnan(theirs) else f"{s.mean - theirs:+.{p.digits}f}", False))
            body.append(([_label(v) for v in rk + ck], cells))
    shown = "; ".join(f"{d} / {a} / pratio {pr:g}" for d, a, pr in sorted(used)) or "none"
    notes.append(f"Published: {source} ({shown}), in %; Δ = ours − published (points); "
                 f"{MISSING}: not published in results/published.")
    for d, a, pr in sorted(across, key=str):
        ours = ", ".join(f"{c}={v}" for c, v in zip(("dataset", "arch", "pratio"), (d, a, pr)) if v is not None)
        notes.append(f"Warning: no published setting for our rows with {ours or 'mixed settings'}; compared with "
                     f"{'/'.join(map(str, published.DEFAULT_SETTING))}: the comparison is across settings.")
    for a in sorted(archs & set(published.ARCH_NOTES)):
        notes.append(f"Note: {published.ARCH_NOTES[a]}")
    groups = [(METRIC_LABELS[m], ["ours", SOURCE_LABELS.get(source, source), "Δ"]) for m in metrics]
    return TextTable([f.capitalize() for f in fields], groups, body, notes)


# ---------------------------------------------------------------- entry points

FORMATS = ("md", "latex", "csv", "html")


def render(df: pd.DataFrame, fmt: str = "md", metrics: Sequence[str] = ("acc", "asr", "der"),
           rows: str | Sequence[str] = "attack", cols: str | Sequence[str] = "defense", filters: dict | None = None,
           split: str | None = "test", digits: int = 1, compare_with: str | None = None,
           expected_n: int | None = None, failures: list[dict] | None = None) -> tuple[str, list[str]]:
    """The table as text in ``fmt`` and its notes (already inside the text for md/latex/html)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    p = pivot(df, metrics, rows, cols, filters, split, digits, expected_n, failures)
    if compare_with:
        t = compare(p, compare_with, select(df, filters, split))
        if fmt == "csv":
            return _text_csv(t), t.notes
    else:
        if fmt == "csv":
            return pivot_csv(p), p.notes
        t = to_text_table(p)
    if not t.body:  # nothing selected: say so in the format's own way, no empty table
        notes = t.notes or ["No results."]
        text = {"md": "\n".join(f"- {n}" for n in notes), "latex": "\n".join(f"% {n}" for n in notes),
                "html": "\n".join(f"<p>{html.escape(n)}</p>" for n in notes)}[fmt]
        return text + "\n", notes
    return {"md": text_markdown, "latex": text_latex, "html": text_html}[fmt](t), t.notes


def _text_csv(t: TextTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.stub + _flat_headers(t))
    for labels, cells in t.body:
        w.writerow(labels + [c.replace(" ", "") if c != MISSING else "" for c, _ in cells])
    return buf.getvalue()


def markdown(df: pd.DataFrame, metrics: Sequence[str] = ("acc", "asr", "der"), rows: str | Sequence[str] = "attack",
             cols: str | Sequence[str] = "defense", **kw) -> str:
    """Markdown attack x defense table with notes; what ``bdgrid run`` prints at its end."""
    return render(df, "md", metrics, rows, cols, **kw)[0]


paper_table = markdown
