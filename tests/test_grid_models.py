"""Models trained elsewhere as cells of a grid (``models:`` in a spec, ``grid.models``): two
BackdoorBench records (BadNet and WaNet layouts, written as BackdoorBench writes them by
tests/backdoorbench_record.py) and one plain checkpoint, defended with none, ft and tsbd in one
grid on real Ray; rows with their provenance; before-defense numbers equal to a direct
computation on the record's own files; resume and adding a defense never import again; a bad
``models:`` entry is one line with its line number.

Everything is tiny: CIFAR-format clean data of 600/200 synthetic images and tiny_cnn models
trained for 2 epochs (so that their predictions vary and the equalities below are not 0 == 0).
"""
from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorbench_record as bbr  # noqa: E402

import results  # noqa: E402
from defense.external.safe_load import safe_torch_load  # noqa: E402
from grid.plan import build_plan  # noqa: E402
from grid.run import execute_plan  # noqa: E402
from grid.spec import parse_spec  # noqa: E402
from grid.validate import validate  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # bdgrid's and BackdoorBench's CIFAR-10
TSBD = "  - name: tsbd\n    params: {max_un_epochs: 3, ft_epochs: 1, un_threshold: 0.95}\n"
FT = "  - name: ft\n    params: {epochs: 1}\n"


def _trained(trigger, xtr, ytr, seed: int) -> torch.nn.Module:
    """tiny_cnn trained 2 epochs on the clean set with 10% of it carrying ``trigger`` -> class 0."""
    from defense.data import Data, dataset_info
    from defense.models import create_model
    from defense.train import get_recipe, train

    x, y = xtr.copy(), ytr.copy()
    rng = np.random.default_rng(seed)
    for i in rng.choice(np.where(y != bbr.TARGET)[0], len(y) // 10, replace=False):
        x[i], y[i] = trigger(x[i]), bbr.TARGET
    torch.manual_seed(seed)
    model = create_model("tiny_cnn")
    train(model, Data(torch.from_numpy(x), torch.from_numpy(y), dataset_info("cifar10")), get_recipe("fast", "cifar10"),
          epochs=2, seed=seed, device="cpu")
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """<root>/data/cifar10 (CIFAR-10 python batches), <root>/record/{badnet,wanet}_0_1, <root>/model.pt."""
    from defense.data import load_dataset

    root = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2.5 CPU-s per model; two threads on a loaded 2-core machine only contend
    train, test = load_dataset("synthetic", n_train=600, n_test=200)
    xtr, ytr, xte, yte = (t.numpy() for t in (train.x, train.y, test.x, test.y))
    bbr.write_cifar10(root / "data" / "cifar10", xtr, ytr, xte, yte)
    recs = {}
    for i, (attack, trig) in enumerate((("badnet", bbr.badnet_trigger), ("wanet", bbr.warp_trigger))):
        recs[attack] = bbr.write_record(root, attack, _trained(trig, xtr, ytr, i), xtr, ytr, xte, yte,
                                        model_name="bdgrid.tiny_cnn")
    torch.save({"state_dict": _trained(bbr.badnet_trigger, xtr, ytr, 7).state_dict()}, root / "model.pt")
    torch.set_num_threads(threads)
    return {"root": root, "xte": xte, "yte": yte, **recs}


def spec_text(defenses: str = "  - none\n" + FT + TSBD) -> str:
    return ("name: imported\n"
            "models:\n"
            "  - backdoorbench: record/*_0_1        # a glob: both records\n"
            "  - checkpoint: model.pt\n"
            "    arch: tiny_cnn\n"
            "    dataset: cifar10\n"
            "    attack: badnets\n"
            "datasets:                               # where cifar10 is (relative to this file)\n"
            "  - name: cifar10\n"
            "    root: data/cifar10\n"
            "    params: {download: false}\n"
            f"defenses:\n{defenses}"
            "retries: 0\n")


def load(world, text: str):
    ls, probs = parse_spec(text, "spec.yaml", world["root"])
    assert not probs and not validate(ls, 0), validate(ls, 0)
    return ls


def executed(out: Path) -> list[tuple[str, str]]:
    log = out / "executed.log"
    return [tuple(ln.split()[:2]) for ln in log.read_text().splitlines()] if log.exists() else []


def direct(record: Path, xte: np.ndarray, yte: np.ndarray) -> dict:
    """ACC and ASR on the reported test split, written out from the record's files alone: its
    state_dict (``module.`` stripped) in a tiny_cnn, CIFAR normalisation, argmax; the backdoor
    images are its PNGs of the non-target test images of that split."""
    from defense.data.splits import val_test_indices
    from defense.models import create_model

    rec = safe_torch_load(record / "attack_result.pt")
    model = create_model("tiny_cnn")
    model.load_state_dict({k.removeprefix("module."): v for k, v in rec["model"].items()})
    model.eval()

    def pred(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).float() / 255
        x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
        with torch.no_grad():
            return model(x).argmax(1).numpy()

    _, test_idx = val_test_indices(len(yte), 0.2, seed=0)
    idx = test_idx.numpy()
    bd = [i for i in idx if yte[i] != bbr.TARGET]
    png = np.stack([np.asarray(Image.open(record / "bd_test_dataset" / str(yte[i]) / f"{i}.png")).transpose(2, 0, 1)
                    for i in bd])
    return {"acc": float((pred(xte[idx]) == yte[idx]).mean()), "asr": float((pred(png) == bbr.TARGET).mean()),
            "ra": float((pred(png) == yte[bd]).mean())}


def test_a_grid_over_two_records_and_a_checkpoint(ray_session, world, tmp_path):
    from defense.external.backdoorbench import load_record, record_key
    from defense.external.imported import import_checkpoint, run_imported
    from grid.run import paper_table

    out = tmp_path / "out"
    res = execute_plan(load(world, spec_text()), out, show_progress=False)
    assert res.ok, res.failed
    c = Counter(k for k, _ in executed(out))
    # three models imported once each, nothing trained; one clean dataset load
    assert (c["import"], c["attack"], c["data"]) == (3, 0, 1)
    assert (c["prepare"], c["defense"], c["eval"]) == (3, 6, 9)
    df = results.load(out)
    assert len(df) == 18 and not df.duplicated(["key", "split"]).any()  # 3 models x 3 defenses x 2 splits
    test = df[df.split == "test"]
    assert set(test["model"]) == {"badnet_0_1", "wanet_0_1", "model.pt"}
    assert set(test["defense"]) == {"none", "ft", "tsbd"}

    # provenance: where each model came from, with the content key of its files
    for name, attack, bb in (("badnet", "badnets", "badnet"), ("wanet", "wanet", "wanet")):
        rows = test[test.model == f"{name}_0_1"]
        assert (rows["source"] == "backdoorbench").all() and (rows["record"] == str(world[name].resolve())).all()
        assert (rows["content_hash"] == record_key(world[name])).all()
        assert (rows["attack"] == attack).all() and (rows["bb_attack"] == bb).all()
        assert (rows["pratio"] == 0.1).all() and (rows["bb_pratio"] == 0.1).all()
        assert (rows["arch"] == "tiny_cnn").all() and (rows["dataset"] == "cifar10").all() and (rows["target"] == 0).all()
        assert rows["recipe"].isna().all()  # not trained by bdgrid
        # before-defense ACC/ASR/RA measured on the record's own files equal a direct computation
        none = rows[rows.defense == "none"].iloc[0]
        want = direct(world[name], world["xte"], world["yte"])
        for m in ("acc", "asr", "ra"):
            assert none[m] == pytest.approx(want[m], abs=1e-6), (name, m)
            assert (rows[f"bd_{m}"] == none[m]).all()
        assert 0 < want["acc"] < 1 and 0 < want["asr"] < 1  # models whose predictions vary: not 0 == 0
    ck = test[test.model == "model.pt"]
    assert (ck["source"] == "checkpoint").all() and (ck["record"] == str((world["root"] / "model.pt"))).all()
    assert ck["content_hash"].str.len().eq(64).all() and (ck["attack"] == "badnets").all()

    # defended exactly as `bdgrid trial --from-backdoorbench` defends the record (the seeded 5%
    # defender subset of the clean training set, the same reported split): same ACC/ASR
    imp = load_record(world["wanet"], world["root"] / "data" / "cifar10", {"download": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the grid's one-CPU stages: the same float sums, bit for bit
    try:
        got = run_imported(imp, "ft", {"epochs": 1}, seed=0)
    finally:
        torch.set_num_threads(threads)
    ft = test[(test.model == "wanet_0_1") & (test.defense == "ft")].iloc[0]
    assert (ft["acc"], ft["asr"]) == (pytest.approx(got["acc"], abs=1e-9), pytest.approx(got["asr"], abs=1e-9))
    ckpt = import_checkpoint(world["root"] / "model.pt", "tiny_cnn", "cifar10", "badnets",
                             data_root=world["root"] / "data" / "cifar10", dataset_params={"download": False})
    want = run_imported(ckpt, "none")
    none = ck[ck.defense == "none"].iloc[0]
    assert (none["acc"], none["asr"]) == (pytest.approx(want["acc"], abs=1e-6), pytest.approx(want["asr"], abs=1e-6))

    # an imported model's row names it by model_key: export-model writes it back out
    from typer.testing import CliRunner

    from grid.cli import app

    f = tmp_path / "wanet.pt"
    r = CliRunner().invoke(app, ["export-model", str(f), "--out", str(out), "--key", ft["model_key"]])
    assert r.exit_code == 0, r.output
    assert all(torch.equal(v, imp.model.state_dict()[k]) for k, v in torch.load(f, weights_only=True).items())

    # the run's table has a row per model, labelled by the record / file name
    table = paper_table(out, res.plan)
    for name in ("badnet_0_1", "wanet_0_1", "model.pt"):
        assert f"| {name} |" in table

    # rerun: nothing runs; another defense: its stages only, no model imported again
    n = len(executed(out))
    again = execute_plan(load(world, spec_text()), out, show_progress=False)
    assert again.ok and not again.done and len(executed(out)) == n
    more = "  - none\n" + FT + TSBD + "  - name: ft\n    params: {epochs: 1, lr: 0.001}\n    label: ft-slow\n"
    res3 = execute_plan(load(world, spec_text(more)), out, show_progress=False)
    assert res3.ok, res3.failed
    new = Counter(k for k, _ in executed(out)[n:])
    assert new["import"] == 0 and (new["defense"], new["eval"]) == (3, 3)
    assert set(results.load(out).query("split == 'test'")["defense"]) == {"none", "ft", "tsbd", "ft-slow"}


def test_import_key_follows_the_content(world, tmp_path):
    """A copied record is the same model (same stage keys); one changed image is a new one."""
    def import_keys(text: str, base: Path) -> dict:
        ls, probs = parse_spec(text, "spec.yaml", base)
        assert not probs and not validate(ls, 0)
        return {s.info["model"]: s.key for s in build_plan(ls).of_kind("import")}

    text = spec_text()
    before = import_keys(text, world["root"])
    copy = tmp_path / "copy"
    shutil.copytree(world["root"], copy)
    assert import_keys(text, copy) == before
    f = next((copy / "record" / "wanet_0_1" / "bd_test_dataset").rglob("*.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    after = import_keys(text, copy)
    assert after["wanet_0_1"] != before["wanet_0_1"]
    assert after["badnet_0_1"] == before["badnet_0_1"] and after["model.pt"] == before["model.pt"]


def test_models_beside_a_trained_grid_and_dry_run(world):
    """A spec may hold its usual grid and models: both are cells; `run --dry-run` plans the imports."""
    from typer.testing import CliRunner

    from grid.cli import app

    text = spec_text().replace("datasets:", "archs: [tiny_cnn]\nattacks: [badnets]\ndatasets:", 1)
    plan = build_plan(load(world, text))
    assert plan.cells == 4 and plan.counts()["attack"] == 1 and plan.counts()["import"] == 3
    spec = world["root"] / "both.yaml"
    spec.write_text(text)
    r = CliRunner().invoke(app, ["run", str(spec), "--dry-run", "--out", str(world["root"] / "dry")])
    assert r.exit_code == 0, r.output
    assert any(ln.split("│")[1:4] == [" import  ", "     3 ", "    0 "] for ln in r.output.splitlines()
               if "import" in ln), r.output
    assert not (world["root"] / "dry").exists()


BAD = """\
name: bad
models:
  - backdoorbench: record/nothere
  - backdoorbench: record/*_9_9
  - backdoorbench: bad/resnext
  - checkpoint: missing.pt
    arch: tiny_cnn
    dataset: cifar10
    attack: badnets
  - checkpoint: model.pt
    arch: tiny_cn
    dataset: cifar10
    attack: badnet
  - backdoorbench: record/badnet_0_1
    arch: tiny_cnn
  - record/wanet_0_1
defenses: [none, tsbd]
datasets:
  - name: cifar10
    root: data/cifar10
"""


def test_bad_models_entries_are_listed_with_their_lines(world):
    """Every problem of a models: block at once, each at its line, no traceback, exit 2."""
    from typer.testing import CliRunner

    from grid.cli import app

    bad = world["root"] / "bad" / "resnext"
    bad.mkdir(parents=True, exist_ok=True)
    rec = safe_torch_load(world["badnet"] / "attack_result.pt")
    torch.save({**rec, "model_name": "resnext29"}, bad / "attack_result.pt")
    spec = world["root"] / "bad.yaml"
    spec.write_text(BAD)
    r = CliRunner().invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    for line, what in ((3, f"models[0].backdoorbench: record folder not found: {world['root'] / 'record' / 'nothere'}"),
                       (4, "models[1].backdoorbench: the glob"),
                       (5, f"models[2].backdoorbench: BackdoorBench record {bad}: model_name 'resnext29' has no bdgrid "
                           "architecture"),
                       (6, f"models[3].checkpoint: checkpoint file not found: {world['root'] / 'missing.pt'}"),
                       (11, "models[4].arch: unknown model 'tiny_cn' (did you mean 'tiny_cnn'?)"),
                       (13, "models[4].attack: unknown attack 'badnet' (did you mean 'badnets'?)"),
                       (15, "models[5].arch: 'arch' is read from the BackdoorBench record"),
                       (16, "models[6]: Value error, a models: entry is a mapping, '- backdoorbench: <record")):
        assert f"bad.yaml:{line}: {what}" in text, (line, text)
    assert "8 problems" in text


def test_the_example_spec_plans_the_records_beside_it(world):
    """examples/own-models.yaml, put beside records, a checkpoint and CIFAR data, validates and
    plans one import per model and every defense on each."""
    from grid.spec import load_spec

    spec = world["root"] / "own-models.yaml"
    shutil.copy(Path(__file__).resolve().parent.parent / "examples" / "own-models.yaml", spec)
    ls, probs = load_spec(spec)
    assert not probs and not validate(ls, 0), validate(ls, 0)
    plan = build_plan(ls)
    assert plan.cells == 3 and plan.counts()["import"] == 3 and plan.counts()["attack"] == 0
    assert plan.counts()["eval"] == 9  # none, ft, tsbd on each


def test_tune_on_an_imported_model(ray_session, world, tmp_path):
    """`tune_on: [{model: NAME}]` tunes a defense on one imported model only (issue 19's leftover):
    real Optuna journal, real Ray; the trial rows and the study name the cell by its model, the
    defaults come first as the baseline trial, and the record is imported once for all trials."""
    import optuna

    from grid.run import open_runner
    from grid.tune.driver import Tuning, run_study, tune_plan
    from grid.tune.study import open_storage

    text = spec_text("  - none\n" + FT) + (
        "tune:\n"
        "  defense: ft\n"
        "  params: {epochs: 1}\n"
        "  space: {lr: {type: float, low: 0.001, high: 0.02, log: true}}\n"
        "  objectives: [acc, asr]\n"
        "  sampler: random\n"
        "  n_trials: 2\n"
        "  tune_on: [{model: badnet_0_1}]\n")
    ls = load(world, text)
    tu = Tuning(ls, tmp_path / "out")
    assert tu.tuned_on() == ["cifar10/tiny_cnn/badnet_0_1"] and tu.attacks_tuned_on() == "badnets"
    plan = tune_plan(tu)
    runner = open_runner(ls, tu.out, plan, show_progress=False)
    try:
        run_study(tu, runner, plan, say=lambda m: None)
    finally:
        runner.close()
    study = optuna.load_study(study_name=tu.study_name, storage=open_storage(tu.storage))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and done[0].params == {"lr": 0.01} and done[0].user_attrs.get("bdgrid_default")
    assert all("cell:cifar10/tiny_cnn/badnet_0_1" in t.user_attrs for t in done)
    assert [k for k, _ in executed(tu.out)].count("import") == 1  # the other record and the checkpoint: not imported
