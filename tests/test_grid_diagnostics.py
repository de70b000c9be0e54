"""What a defense says reaches the grid's user: its diagnostics land in the result rows' ``extra``
JSON (``results.load(...)["diagnostics"]``), and the warnings it raises in a Ray worker are
printed by the driver (prefixed with the stage label) and kept in ``<out>/warnings.log``.

One tiny grid on a local Ray: TSBD whose clean unlearning cannot reach un_threshold 0.05 in 3
epochs, in two configs that share one prepare stage (Stages 1a/1b).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import results
from grid.run import execute_plan
from grid.spec import parse_spec
from grid.stages import row_diagnostics
from grid.validate import validate

SPEC = """\
name: diag
datasets:
  - name: synthetic
    params: {n_train: 600, n_test: 200}
archs: [tiny_cnn]
attacks: [badnets]
pratios: [0.1]
seeds: [0]
defenses:
  - none
  - {name: tsbd, params: {n: 0.1, max_un_epochs: 3, un_threshold: 0.05, ft_epochs: 0}}
  - {name: tsbd, params: {n: 0.2, max_un_epochs: 3, un_threshold: 0.05, ft_epochs: 0}}
recipe: fast
epochs: 1
"""
WARNING = "clean unlearning ran all 3 epochs without reaching un_threshold 0.050"


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """Run the grid once (local Ray, 2 CPUs); (out folder, what the driver printed)."""
    import ray
    from rich.console import Console

    from grid.run import connect

    out = tmp_path_factory.mktemp("diag") / "out"
    ls, probs = parse_spec(SPEC, "spec.yaml", out.parent)
    assert not probs and not validate(ls, 0)
    buf = io.StringIO()
    started = connect(None, num_cpus=2)
    try:
        res = execute_plan(ls, out, show_progress=False, console=Console(file=buf, width=400))
    finally:
        if started:
            ray.shutdown()
    assert res.ok, res.failed
    return out, buf.getvalue()


def _tsbd_rows(out: Path):
    df = results.load(out)
    return df[df["defense_name"] == "tsbd"]


def test_tsbd_diagnostics_reach_every_row_that_shares_the_prepare(grid_run):
    out, _ = grid_run
    rows = _tsbd_rows(out)
    assert len(rows) == 4 and rows["key"].nunique() == 2  # 2 configs x 2 splits
    for diag in rows["diagnostics"]:
        assert diag["unlearn_reached_threshold"] is False
        assert diag["unlearn_epochs"] == 3
        assert diag["n_neurons"] > 0
        assert "unlearn_curve" not in diag  # curves are in the curves table, not in every row
    for said in rows["warnings"]:
        assert any(WARNING in w for w in said)
    # the raw column holds the same JSON, for readers that skip the expansion
    raw = json.loads(rows["extra"].iloc[0])
    assert raw["diagnostics"]["unlearn_reached_threshold"] is False


def test_undefended_rows_and_curves_carry_no_diagnostics(grid_run):
    out, _ = grid_run
    df = results.load(out)
    none = df[df["defense_name"] == "none"]
    assert len(none) == 2 and none["diagnostics"].isna().all()
    curves = results.load(out, table="curves")
    assert not curves["extra"].dropna().str.contains("diagnostics").any()


def test_worker_warning_is_printed_once_by_the_driver_and_logged(grid_run):
    out, printed = grid_run
    lines = [ln for ln in printed.splitlines() if WARNING in ln]
    # raised once, in the one shared prepare stage; printed with that stage's label
    assert len(lines) == 1, printed
    assert lines[0].startswith("warning prepare[") and "tsbd]" in lines[0]
    logged = (out / "warnings.log").read_text()
    assert logged.count(WARNING) == 1 and logged.startswith("prepare[")
    # the ctx.log lines (per-epoch progress) are kept per stage, not printed
    prep_logs = list((out / "logs").glob("prepare-*.log"))
    assert len(prep_logs) == 1 and "tsbd unlearn epoch 3" in prep_logs[0].read_text()
    assert "tsbd unlearn epoch" not in printed


def test_row_diagnostics_keeps_per_neuron_lists_out():
    diag = {"threshold": None, "n_pruned": 0, "mask_scores": {"bn1": [0.5] * 16},
            "mask_quantiles": [0.0, 0.1, 0.5, 0.9, 1.0], "ranking": list(range(51)),
            "unlearn_curve": [{"epoch": 1}], "zeroed": {"conv": {"neurons": 2, "weights": list(range(60))}}}
    slim = row_diagnostics(diag)
    assert slim == {"threshold": None, "n_pruned": 0, "mask_quantiles": [0.0, 0.1, 0.5, 0.9, 1.0],
                    "zeroed": {"conv": {"neurons": 2}}}
