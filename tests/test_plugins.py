"""A grid over the user's own dataset, model, attack and defense, brought in by the spec's
``imports:`` (examples/my_plugin.py + examples/plugin.yaml, run as a user would)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import results
from grid.spec import parse_spec
from grid.validate import validate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIN = Path(sys.executable).parent


def _problems(text: str, base: Path) -> list[str]:
    ls, problems = parse_spec(text, "spec.yaml", base)
    assert not problems
    return [p.render("spec.yaml") for p in validate(ls)]


def _example(imports) -> str:
    doc = yaml.safe_load((EXAMPLES / "plugin.yaml").read_text())
    doc["imports"] = imports
    return yaml.safe_dump(doc, sort_keys=False)


def test_plugin_names_are_unknown_without_imports_and_a_bad_import_is_reported(tmp_path):
    shutil.copy(EXAMPLES / "my_plugin.py", tmp_path / "my_plugin_v.py")
    # without the import: each of the four names is reported where it is used
    probs = _problems(_example([]), tmp_path)
    for where, name in [("datasets[0]", "stripes"), ("archs[0]", "mlp"), ("attacks[0]", "corner_checker"),
                        ("defenses[1]", "reinit_head")]:
        assert any(where in p and name in p for p in probs), (where, probs)
    # a module that is not there, and one that raises on import: both listed, with the cause
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    probs = _problems(_example(["no_such_plugin", "broken_plugin", "my_plugin_v"]), tmp_path)
    assert any("imports[0]" in p and "cannot import 'no_such_plugin'" in p and "ModuleNotFoundError" in p
               for p in probs), probs
    assert any("imports[1]" in p and "boom at import" in p for p in probs), probs
    # the spec's folder is searched: the copy next to the spec registers every name, nothing else wrong
    assert not [p for p in probs if "imports[" not in p], probs


@pytest.mark.slow
def test_grid_runs_the_users_dataset_model_attack_and_defense(tmp_path):
    """`bdgrid run` on the example plugin (smaller): Ray workers import it from the spec's
    folder; the plugin attack is implanted in the plugin model on the plugin data, and the
    plugin defense ran on that model with the defender's clean data."""
    shutil.copy(EXAMPLES / "my_plugin.py", tmp_path / "my_plugin.py")
    doc = yaml.safe_load((EXAMPLES / "plugin.yaml").read_text())
    doc.update(datasets=[{"name": "stripes", "params": {"n_train": 4000, "n_test": 1000}}], archs=["mlp"],
               attacks=[{"name": "corner_checker", "params": {"size": 4}}],
               defenses=["none", {"name": "reinit_head", "params": {"epochs": 10}}], epochs=8)
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    r = subprocess.run([str(BIN / "bdgrid"), "run", str(tmp_path / "plugin.yaml"), "--out", str(out),
                        "--num-cpus", "2"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path.parent)  # not the spec's folder: the import must not depend on the cwd
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = results.load(out)
    df = df[df.split == "test"].set_index("defense")
    assert set(df["dataset"]) == {"stripes"} and set(df["arch"]) == {"mlp"} and set(df["attack"]) == {"corner_checker"}
    assert df.loc["none", "acc"] >= 0.85 and df.loc["none", "asr"] >= 0.9  # implanted
    # the head was re-initialised and learnt again from the defender's 200 clean images: that
    # only reaches this accuracy on the right model's features and the right data (chance: 0.25)
    assert df.loc["reinit_head", "acc"] >= 0.8
    assert (df.loc["reinit_head", "acc"], df.loc["reinit_head", "asr"]) != (df.loc["none", "acc"], df.loc["none", "asr"])
