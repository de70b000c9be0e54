"""``bdgrid table`` and ``bdgrid plot`` on a fixture run directory (Parquet written directly)."""
from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

import results
from grid.cli import app

runner = CliRunner()
BASE = dict(dataset="synthetic", arch="tiny_cnn", pratio=0.1, target=0, split="test")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    i = 0
    for a in ("badnets", "blended"):
        for s in (0, 1):
            i += 1
            results.write_stage(d, "eval", f"none{i}", [dict(BASE, attack=a, defense="none", seed=s,
                                                             acc=0.93 - 0.01 * s, asr=0.98)])
            results.write_stage(d, "eval", f"ft{i}", [dict(BASE, attack=a, defense="ft", seed=s, acc=0.90, asr=0.30,
                                                           der=0.80)])
            for n in (0.05, 0.1, 0.3):
                results.write_stage(d, "eval", f"tsbd{i}-{n}", [dict(BASE, attack=a, defense="tsbd", seed=s,
                                                                     params={"n": n, "m": 0.7}, acc=0.92 - 0.1 * n,
                                                                     asr=max(0.0, 0.6 - 2 * n), der=0.9)])
            hist = [dict(phase=ph, epoch=e, loss=1.0 / e, train_acc=1 - 1.0 / (e + 1), seconds=0.1)
                    for ph, n_ep in (("unlearn", 4), ("finetune", 6)) for e in range(1, n_ep + 1)]
            results.write_stage(d, "defense", f"c{i}", [dict(BASE, attack=a, defense="tsbd", seed=s, **h) for h in hist],
                                table="curves")
    return d


def test_table_markdown(run_dir):
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--filter", "defense=none,ft"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| Attack | No defense ACC |")
    assert lines[2] == "| BadNets | 92.5 ± 0.7 | 98.0 ± 0.0 | 90.0 ± 0.0 | 30.0 ± 0.0 | 80.0 ± 0.0 |"


def test_table_latex_to_file_and_csv(run_dir, tmp_path):
    out = tmp_path / "t.tex"
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--format", "latex", "--metrics", "acc,asr",
                            "--filter", "params.n=0.1", "--output", str(out)])
    assert r.exit_code == 0, r.output
    tex = out.read_text()
    assert tex.startswith("\\begin{table}") and "\\caption{" in tex and "\\label{tab:bdgrid}" in tex
    assert "\\begin{tabular}" in tex and "\\toprule" in tex
    assert "BadNets & 91.0 $\\pm$ 0.0 & 40.0 $\\pm$ 0.0" in tex  # only the n=0.1 TSBD rows: 0.92-0.01, 0.6-0.2
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--format", "csv", "--rows", "attack", "--cols", "defense"])
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == "attack,defense,metric,mean,std,n,best,tuned_on_attack"


def test_table_compare_backdoorbench(run_dir):
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--compare", "backdoorbench", "--filter", "defense=none,ft"])
    assert r.exit_code == 0, r.output
    assert "| BadNets | No defense | 92.5 ± 0.7 | 91.32 | +1.2 |" in r.stdout


def test_table_user_errors(run_dir, tmp_path):
    r = runner.invoke(app, ["table", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no results" in r.output
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--format", "docx"])
    assert r.exit_code == 2 and "unknown format" in r.output
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--filter", "attack"])
    assert r.exit_code == 2 and "column=value" in r.output
    r = runner.invoke(app, ["table", "--out", str(run_dir), "--filter", "attack=nope"])
    assert r.exit_code == 1 and "No results match" in r.output


@pytest.mark.parametrize("kind", ["acc-asr", "tsbd-n", "curves"])
def test_plot_writes_png_and_pdf(run_dir, tmp_path, kind):
    r = runner.invoke(app, ["plot", "--out", str(run_dir), "--kind", kind, "--dest", str(tmp_path)])
    assert r.exit_code == 0, r.output
    png, pdf = tmp_path / f"{kind}.png", tmp_path / f"{kind}.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    with Image.open(png) as im:
        w, h = im.size
        # 300 dpi at a one- or two-column width (3.5 in / 7 in, before tight cropping)
        assert 800 < w < 2400 and h > 300
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20  # something was drawn, not a blank page


def test_plot_says_when_there_is_nothing_to_draw(run_dir, tmp_path):
    empty = tmp_path / "empty"
    results.write_stage(empty, "eval", "k", [dict(BASE, attack="badnets", defense="none", seed=0, acc=0.9, asr=0.9)])
    r = runner.invoke(app, ["plot", "--out", str(empty), "--kind", "curves"])
    assert r.exit_code == 1 and "no per-epoch curves" in r.output
    r = runner.invoke(app, ["plot", "--out", str(empty), "--kind", "tsbd-n"])
    assert r.exit_code == 1 and "no 'tsbd' rows" in r.output
    r = runner.invoke(app, ["plot", "--out", str(run_dir), "--kind", "pie"])
    assert r.exit_code == 2 and "unknown plot kind" in r.output


@pytest.fixture()
def sweep_dir(tmp_path):
    """Rows as a grid writes a swept TSBD: the label in ``defense``, the method in ``defense_name``
    (kept in ``extra``); plus a no-defense row."""
    d = tmp_path / "sweep"
    results.write_stage(d, "eval", "none", [dict(BASE, attack="badnets", defense="none", defense_name="none", seed=0,
                                                 acc=0.93, asr=0.98)])
    for n in (0.1, 0.3):
        results.write_stage(d, "eval", f"tsbd-{n}", [dict(BASE, attack="badnets", defense=f"tsbd(n={n})",
                                                          defense_name="tsbd", seed=0, params={"n": n, "m": 0.7},
                                                          acc=0.92 - 0.1 * n, asr=0.6 - n)])
    return d


def test_plot_tsbd_n_on_sweep_rows(sweep_dir, tmp_path, monkeypatch):
    import results.plots as plots

    drawn = {}
    save = plots._save

    def spy(fig, dest, name):  # the n values on the x axis, read before the figure is closed
        drawn[name] = sorted({float(x) for ax in fig.axes for line in ax.get_lines() for x in line.get_xdata()})
        return save(fig, dest, name)

    monkeypatch.setattr(plots, "_save", spy)
    r = runner.invoke(app, ["plot", "--out", str(sweep_dir), "--kind", "tsbd-n", "--dest", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tsbd-n.png").stat().st_size > 1000
    assert drawn["tsbd-n"] == [0.1, 0.3]


def test_table_filter_defense_by_method_name(sweep_dir):
    r = runner.invoke(app, ["table", "--out", str(sweep_dir), "--filter", "defense=tsbd", "--metrics", "acc"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "| Attack | tsbd(n=0.1) ACC | tsbd(n=0.3) ACC |"  # both points, not 'none'
    r = runner.invoke(app, ["table", "--out", str(sweep_dir), "--filter", "defense=tsbd(n=0.1)", "--metrics", "acc"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "| Attack | tsbd(n=0.1) ACC |"
    r = runner.invoke(app, ["table", "--out", str(sweep_dir), "--filter", "nope=1"])
    assert r.exit_code == 2 and "defense_name" in r.output
