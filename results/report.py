"""``bdgrid report``: one self-contained HTML page for a run folder, opened with no network.

What a researcher checks before trusting a table, on one page: the paper tables (ACC/ASR/DER,
and RA), the ACC-ASR and TSBD-n figures and the training/defense curves (PNG, embedded as data
URIs), failed stages with their tracebacks' first lines, the warnings the defenses raised, each
defense's diagnostics (TSBD: unlearning epochs, whether the threshold was reached, neurons
zeroed), the sanity marks of the tables, provenance (spec, versions, commit) and where the time
went per stage kind (``executed.log``). Nothing is fetched: no script, font or image comes from
elsewhere, so the file can be mailed or archived with a paper's artefacts.
"""
from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

import pandas as pd

from results.reader import load, load_report, run_failures
from results.tables import HTML_CSS, render

PAGE_CSS = ("body{font:14px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#111}"
            "h1{font-size:22px}h2{font-size:17px;margin-top:1.6em;border-bottom:1px solid #ccc}"
            "img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:8px;overflow-x:auto;"
            "font-size:12px}table.kv td,table.kv th{padding:2px 10px;text-align:left;vertical-align:top}"
            ".warn{color:#8a5a00}.fail{color:#a00}.wide{overflow-x:auto}")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>' \
           f'{html.escape(alt)}</figcaption></figure>'


def _figures(out: Path, df: pd.DataFrame, tmp: Path) -> list[str]:
    """The figures from the rows already read (only the curves table is read here)."""
    from results.plots import NothingToPlot, acc_asr, curves, tsbd_n

    parts = []
    for draw, caption in ((lambda d: acc_asr(df, d), "Clean accuracy against attack success rate (mean ± std over seeds)"),
                          (lambda d: tsbd_n(df, d), "TSBD: ACC and ASR against the neuron ratio n"),
                          (lambda d: curves(load(out, table="curves"), d), "Training, unlearning and fine-tuning curves")):
        try:
            paths = draw(tmp / str(len(parts)))
        except (NothingToPlot, ValueError, KeyError):
            continue  # nothing of that kind in this run (e.g. no TSBD sweep)
        png = next((p for p in paths if p.suffix == ".png"), None)
        if png is not None:
            parts.append(_img(png, caption))
    return parts


def _diagnostics(df: pd.DataFrame) -> str:
    """One row per defended (cell, defense) on the test split with its flat diagnostics."""
    if "diagnostics" not in df.columns:
        return "<p>No defense diagnostics recorded.</p>"
    rows = []
    sel = df[(df["split"] == "test") & df["diagnostics"].notna()]
    for _, r in sel.iterrows():
        d = r["diagnostics"] if isinstance(r["diagnostics"], dict) else {}
        flat = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rows.append({"attack": r.get("attack"), "seed": r.get("seed"), "defense": r.get("defense"), **flat})
    if not rows:
        return "<p>No defense diagnostics recorded.</p>"
    t = pd.DataFrame(rows)
    return t.to_html(index=False, classes="bdgrid-table", border=0, na_rep="", float_format=lambda x: f"{x:.4g}")


def _stage_times(out: Path) -> str:
    f = out / "executed.log"
    if not f.exists():
        return "<p>No executed.log (no stage has run in this folder).</p>"
    rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
    t = pd.DataFrame([(r[0], float(r[3])) for r in rows if len(r) >= 4], columns=["stage", "seconds"])
    g = t.groupby("stage")["seconds"].agg(["count", "sum", "mean", "max"]).reset_index()
    g.columns = ["stage", "runs", "total s", "mean s", "max s"]
    return g.to_html(index=False, classes="bdgrid-table", border=0, float_format=lambda x: f"{x:.1f}")


def _provenance(out: Path, df: pd.DataFrame) -> str:
    items = []
    for col in ("grid", "spec_hash", "version", "git_commit", "torch_version", "python_version", "device", "recipe"):
        if col in df.columns and df[col].notna().any():
            items.append((col, ", ".join(sorted(map(str, df[col].dropna().unique()))[:6])))
    kv = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    spec = out / "spec.source.yaml"
    src = f"<h3>Spec</h3><pre>{html.escape(spec.read_text())}</pre>" if spec.exists() else ""
    return f'<table class="kv">{kv}</table>{src}'


def build(out: str | Path) -> str:
    """The report of run folder ``out`` as one HTML string."""
    out = Path(out)
    df, rep = load_report(out)
    failures = run_failures(out)
    e = html.escape
    body = [f"<h1>bdgrid run report: {e(str(out.resolve().name))}</h1>"]
    state = out / "state.json"
    if state.exists():
        st = json.loads(state.read_text())
        counts = st.get("counts") or {}
        done = {k: v.get("done", 0) + v.get("cached", 0) for k, v in counts.items()}
        body.append(f"<p>The last driver in this folder: {st.get('cells', '?')} cells; stages done per kind: "
                    + ", ".join(f"{k} {v}/{counts[k].get('total', 0)}" for k, v in done.items())
                    + f"; elapsed {st.get('elapsed_s', 0):.0f} s.</p>")
    if df.empty:
        body.append("<p>No results yet.</p>")
    else:
        for title, metrics in (("Paper table: ACC, ASR, DER", ("acc", "asr", "der")), ("Robust accuracy", ("ra",))):
            text, _ = render(df, "html", metrics=metrics, failures=failures)
            body.append(f"<h2>{e(title)}</h2><div class='wide'>{text}</div>")
    with tempfile.TemporaryDirectory() as tmp:
        figs = _figures(out, df, Path(tmp)) if not df.empty else []
    body.append("<h2>Figures</h2>" + ("".join(figs) or "<p>No figures: nothing to plot yet.</p>"))
    body.append("<h2>Failures</h2>" + ("".join(
        f'<p class="fail">{e(f.get("stage", ""))}: {e(f.get("error", ""))}<br><code>{e(f.get("file", ""))}</code></p>'
        for f in failures) or "<p>None.</p>"))
    if rep.damaged:
        body.append("<p class='fail'>Damaged result files left out: " + e(", ".join(str(p) for p, _ in rep.damaged))
                    + "</p>")
    warn = out / "warnings.log"
    body.append("<h2>Warnings raised by the defenses</h2>" + (
        f"<pre class='warn'>{e(warn.read_text())}</pre>" if warn.exists() and warn.read_text().strip() else "<p>None.</p>"))
    body.append("<h2>Defense diagnostics</h2><div class='wide'>" + (_diagnostics(df) if not df.empty else "<p>None.</p>")
                + "</div>")
    body.append("<h2>Time per stage kind</h2>" + _stage_times(out))
    body.append("<h2>Provenance</h2>" + (_provenance(out, df) if not df.empty else "<p>None.</p>"))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>bdgrid report</title><style>{PAGE_CSS}{HTML_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write(out: str | Path, dest: str | Path | None = None) -> Path:
    from results.writer import atomic_write

    dest = Path(dest) if dest else Path(out) / "report.html"
    atomic_write(dest, build(out).encode())
    return dest


__all__ = ["build", "write"]
