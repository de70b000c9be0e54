"""`bdgrid verify`: every artifact and result file of a real (tiny) run checked; damage reported
without changing anything; `--repair` sets it aside and recomputes it, with the numbers back."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import results
from grid.cli import app

SPEC = """\
name: v
datasets: [{name: synthetic, params: {n_train: 600, n_test: 200}}]
archs: [tiny_cnn]
attacks: [badnets]
defenses: [none, {name: ft, params: {epochs: 1}}]
recipe: fast
epochs: 1
"""


def test_verify_reports_damage_without_changing_anything_and_repair_recomputes_it(ray_session, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    before = results.load(out).set_index(["key", "split"]).sort_index()
    assert CliRunner().invoke(app, ["verify", "--out", str(out)]).exit_code == 0

    ft = before[before["defense"] == "ft"].reset_index().iloc[0]
    victim = out / "results" / f"eval-{ft['key']}.parquet"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x10  # one bit inside the data
    victim.write_bytes(bytes(blob))
    art = next((out / "artifacts" / "defense").rglob("*.bdg"))
    art.write_bytes(art.read_bytes()[:500])  # a truncated purified model
    damaged = {p: p.read_bytes() for p in (victim, art)}

    r = CliRunner().invoke(app, ["verify", "--out", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 1, r.output
    assert "damaged artifact defense" in r.output and f"damaged result file {victim}" in r.output
    assert all(p.read_bytes() == b for p, b in damaged.items())  # nothing changed without --repair

    r = CliRunner().invoke(app, ["verify", "--out", str(out), "--repair"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "repaired: 2 stage(s) recomputed" in r.output  # the defense and its eval (data is a load)
    assert (out / "damaged" / "results" / victim.name).exists()  # set aside, not deleted
    after = results.load(out).set_index(["key", "split"]).sort_index()
    for col in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr"):
        assert after[col].tolist() == pytest.approx(before[col].tolist(), abs=0), col  # the exact numbers back
    assert CliRunner().invoke(app, ["verify", "--out", str(out)]).exit_code == 0


def test_a_runs_model_exported_as_a_backdoorbench_record_imports_back_with_the_same_numbers(ray_session, tmp_path):
    from defense.external.backdoorbench import load_record
    from defense.external.imported import run_imported

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "-q"]).exit_code == 0
    df = results.load(out)
    none = df[(df["defense"] == "none") & (df["split"] == "test")].iloc[0]
    ft = df[(df["defense"] == "ft") & (df["split"] == "test")].iloc[0]
    r = CliRunner().invoke(app, ["export-model", str(tmp_path / "rec"), "--out", str(out), "--key", none["model_key"],
                                 "--format", "backdoorbench"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rec" / "attack_result.pt").exists() and (tmp_path / "rec" / "bd_test_dataset").is_dir()
    got = run_imported(load_record(tmp_path / "rec"), "none")  # BackdoorBench's layout read back by bdgrid
    for k in ("acc", "asr", "ra"):
        assert got[f"bd_{k}"] == pytest.approx(float(none[f"bd_{k}"]), abs=1e-6), k
    r = CliRunner().invoke(app, ["export-model", str(tmp_path / "def"), "--out", str(out), "--key", ft["defense_key"],
                                 "--format", "backdoorbench"])
    assert r.exit_code == 0 and (tmp_path / "def" / "defense_result.pt").exists(), r.output
    # the whole run at once: one record per backdoored model, each purified model under its record
    r = CliRunner().invoke(app, ["export-model", str(tmp_path / "all"), "--out", str(out), "--all",
                                 "--format", "backdoorbench"])
    assert r.exit_code == 0, r.output
    (rec,) = (tmp_path / "all").iterdir()
    assert rec.name == f"badnets_0_1_tiny_cnn_synthetic_seed{int(none['seed'])}"
    again = run_imported(load_record(rec), "none")
    assert all(again[f"bd_{k}"] == got[f"bd_{k}"] for k in ("acc", "asr", "ra"))
    from defense.external.safe_load import safe_torch_load

    one, two = (safe_torch_load(p) for p in (rec / "defense" / "ft" / "defense_result.pt", tmp_path / "def" / "defense_result.pt"))
    assert one["model"].keys() == two["model"].keys() and all(one["model"][k].equal(two["model"][k]) for k in one["model"])
    assert "--all" in CliRunner().invoke(app, ["export-model", str(tmp_path / "x"), "--out", str(out), "--all"]).output
