"""BackdoorBench records in and out: import (records written as BackdoorBench writes them, by
tests/backdoorbench_record.py), safety, export round trip, plain checkpoints."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorbench_record as bbr  # noqa: E402

from defense.external.backdoorbench import (  # noqa: E402
    evaluate_record, export_defense_result, export_record, load_defense_result, load_record, record_key)
from defense.external.checkpoints import load_checkpoint  # noqa: E402
from defense.external.safe_load import RecordProblem, safe_torch_load  # noqa: E402
from defense.models import create_model  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # BackdoorBench's CIFAR-10 values


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return bbr.build(tmp_path_factory.mktemp("bb"))


def direct_predictions(record: Path, images: np.ndarray) -> np.ndarray:
    """What BackdoorBench's evaluation does, written out: its PreActResNet18 weights (module.
    stripped), ToTensor + Normalize with the CIFAR-10 mean/std, argmax."""
    rec = safe_torch_load(record / "attack_result.pt")
    sd = {k.removeprefix("module."): v for k, v in rec["model"].items()}
    model = create_model("preact_resnet18")
    model.load_state_dict(sd)
    model.eval()
    x = torch.from_numpy(images).float() / 255
    x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    with torch.no_grad():
        return model(x).argmax(1).numpy()


@pytest.mark.parametrize("attack", ["badnet", "wanet"])
def test_import_matches_a_direct_computation(records, attack):
    rec = records[attack]
    imp = load_record(rec, records["data_root"], {"download": False})
    assert (imp.arch, imp.dataset, imp.target) == ("preact_resnet18", "cifar10", 0)
    prov = imp.provenance
    assert prov["source"] == "backdoorbench" and prov["record"] == str(rec.resolve())
    assert prov["attack_bb"] == attack and prov["pratio"] == 0.1
    assert prov["attack"] == {"badnet": "badnets", "wanet": "wanet"}[attack]
    assert imp.key == record_key(rec) and len(imp.key) == 64
    # the backdoor test set: every non-target test image, read from the record's own PNGs
    yte, xte = records["yte"], records["xte"]
    nontarget = np.where(yte != 0)[0]
    assert imp.poisoned.bd_idx.tolist() == nontarget.tolist()
    assert imp.poisoned.bd_true.tolist() == yte[nontarget].tolist()
    files = [rec / "bd_test_dataset" / str(yte[i]) / f"{i}.png" for i in nontarget]
    png = np.stack([np.asarray(Image.open(f)).transpose(2, 0, 1) for f in files])
    assert torch.equal(imp.poisoned.bd_test.x, torch.from_numpy(png))
    m = evaluate_record(imp)
    pred_clean, pred_bd = direct_predictions(rec, xte), direct_predictions(rec, png)
    assert m["acc"] == pytest.approx(float((pred_clean == yte).mean()), abs=1e-6)
    assert m["asr"] == pytest.approx(float((pred_bd == 0).mean()), abs=1e-6)
    assert m["ra"] == pytest.approx(float((pred_bd == yte[nontarget]).mean()), abs=1e-6)


def test_key_changes_with_any_record_file(records, tmp_path):
    import shutil

    copy_ = tmp_path / "r"
    shutil.copytree(records["badnet"], copy_)
    assert record_key(copy_) == record_key(records["badnet"])  # content, not location
    f = next((copy_ / "bd_test_dataset").rglob("*.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    assert record_key(copy_) != record_key(records["badnet"])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_record_whose_pickle_would_run_code_is_refused(records, tmp_path):
    rec_dir = tmp_path / "record" / "evil"
    rec_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    good = safe_torch_load(records["badnet"] / "attack_result.pt")
    torch.save({**good, "bd_test": _RunsCode(marker)}, rec_dir / "attack_result.pt")
    with pytest.raises(RecordProblem) as e:
        load_record(rec_dir, records["data_root"], {"download": False})
    assert not marker.exists()  # nothing ran
    msg = str(e.value)
    assert f"{os.system.__module__}.system" in msg and str(rec_dir) in msg and "\n" not in msg


def test_unknown_model_name_is_a_clear_problem(records, tmp_path):
    rec_dir = tmp_path / "record" / "resnext"
    rec_dir.mkdir(parents=True)
    good = safe_torch_load(records["badnet"] / "attack_result.pt")
    torch.save({**good, "model_name": "resnext29"}, rec_dir / "attack_result.pt")
    with pytest.raises(RecordProblem, match=r"model_name 'resnext29' has no bdgrid architecture") as e:
        load_record(rec_dir, records["data_root"], {"download": False})
    assert str(rec_dir) in str(e.value) and "preactresnet18" in str(e.value)
    torch.save({k: v for k, v in good.items() if k != "bd_test"}, rec_dir / "attack_result.pt")
    with pytest.raises(RecordProblem, match=r"missing keys \['bd_test'\]"):
        load_record(rec_dir, records["data_root"])
    with pytest.raises(RecordProblem, match="file not found"):
        load_record(tmp_path / "nowhere", records["data_root"])


def test_round_trip_keeps_acc_asr_ra(badnets_model, tmp_path):
    """A bdgrid model exported as a BackdoorBench record and imported again measures the same."""
    from defense.trial import evaluate

    d = badnets_model
    model, poisoned, test, cfg = d["model"], d["poisoned"], d["test"], d["cfg"]
    bd, bd_idx, bd_true = poisoned.backdoor_test(model)
    pidx = poisoned.poison_idx
    bd_train = (poisoned.train.subset(pidx), pidx, d["train"].y[pidx])
    with pytest.warns(UserWarning, match="model_name 'bdgrid.tiny_cnn'.*BackdoorBench's scripts cannot build"):
        dest = export_record(model, cfg.arch, cfg.dataset, bd, bd_idx, bd_true, len(test), tmp_path / "record" / "rt",
                             attack=cfg.attack, pratio=cfg.pratio, target=cfg.target, seed=cfg.seed,
                             dataset_params=cfg.dataset_params, bd_train=bd_train, n_train=len(d["train"]))
    # BackdoorBench's layout: the dict save_attack_result writes, the poisoned training images as PNGs
    rec = safe_torch_load(dest / "attack_result.pt")  # what we write loads with weights_only=True
    assert set(rec) >= {"model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train",
                        "bd_test"}
    tr = rec["bd_train"]
    assert int(tr["poison_indicator"].sum()) == len(pidx) == len(list((dest / "bd_train_dataset").rglob("*.png")))
    i = int(pidx[0])
    png = np.array(Image.open(dest / "bd_train_dataset" / str(int(d["train"].y[i])) / f"{i}.png"))
    assert torch.equal(torch.from_numpy(png.transpose(2, 0, 1)), poisoned.train.x[i])
    with pytest.raises(RecordProblem, match="exists; not overwriting"):
        export_record(model, cfg.arch, cfg.dataset, bd, bd_idx, bd_true, len(test), dest)
    imp = load_record(dest)
    idx = torch.arange(len(test))
    before = evaluate(model, test, poisoned, idx, cfg.target, "cpu")
    after = evaluate_record(imp)
    for m in ("acc", "asr", "ra"):
        assert after[m] == pytest.approx(before[m], abs=1e-6)
    assert before["asr"] > 0.5  # a real backdoor went through, not a trivially equal 0
    assert imp.provenance["attack"] == "badnets" and imp.provenance["pratio"] == cfg.pratio
    # the purified-model file: BackdoorBench's defense_result.pt, read back identically
    purified = copy.deepcopy(model)
    f = export_defense_result(purified, cfg.arch, cfg.dataset, tmp_path / "record" / "rt" / "defense" / "ft")
    back = load_defense_result(f, cfg.dataset)
    assert evaluate_record(imp, back) == after


def test_plain_checkpoint(badnets_model, tmp_path):
    model = badnets_model["model"]
    f = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": torch.nn.DataParallel(model).state_dict()}, f)
    loaded, key = load_checkpoint(f, "tiny_cnn", "synthetic")
    x = badnets_model["test"].x[:64].float() / 255
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert len(key) == 64
    with pytest.raises(RecordProblem, match="do not fit this architecture"):
        load_checkpoint(f, "preact_resnet18", "synthetic")
    with pytest.raises(RecordProblem, match="unknown architecture 'tiny_cn'.*did you mean 'tiny_cnn'"):
        load_checkpoint(f, "tiny_cn", "synthetic")


# ------------------------------------------------------------------ the published leaderboard


def _compare_rows(tmp_path, rows: list[dict]) -> tuple[dict, list[str]]:
    import results
    from results.tables import render

    for i, r in enumerate(rows):
        results.write_stage(tmp_path, "eval", f"k{i}", [dict(dict(target=0, split="test", seed=0), **r)])
    md, notes = render(results.load(tmp_path), "md", metrics=("acc", "asr", "ra"), compare_with="backdoorbench")
    cells = {}
    for line in md.splitlines()[2:]:
        if line.startswith("| "):
            c = [v.strip() for v in line.split("|")[1:-1]]
            cells[c[1]] = c[2:]
    return cells, notes


def test_compare_finds_every_published_defense_for_cifar10_preactresnet18_badnets(tmp_path):
    from results.published import load_published
    from results.tables import DISPLAY

    pub = load_published("backdoorbench")
    mine = pub[(pub.dataset == "cifar10") & (pub.arch == "preact_resnet18") & (pub.pratio == 0.1)
               & (pub.attack == "badnets")]
    # all 16 of the leaderboard's columns have numbers for this row: 10 from its CSV, CLP, i-BAU, D-BR,
    # D-ST, DDE and MBNS only from its page (empty in the CSV); SS only in the CSV (N/A on the page)
    assert set(mine.defense) == {"none", "ft", "fp", "nad", "nc", "anp", "ac", "spectral", "abl", "dbd", "clp",
                                 "dbr", "dst", "dde", "ibau", "mbns"}
    assert set(mine[mine.source == "bb-leaderboard-html"].defense) == {"clp", "ibau", "dbr", "dst", "dde", "mbns"}
    rows = [dict(dataset="cifar10", arch="preact_resnet18", pratio=0.1, attack="badnets", defense=d,
                 acc=0.5, asr=0.5, ra=0.5) for d in mine.defense]
    cells, notes = _compare_rows(tmp_path, rows)
    assert len(cells) == len(mine)
    for r in mine.itertuples():
        c = cells[DISPLAY.get(r.defense, r.defense)]
        for j, m in enumerate(("acc", "asr", "ra")):
            assert c[3 * j + 1] == f"{getattr(r, m):.2f}", (r.defense, m)  # theirs, as published
            assert c[3 * j + 2] == f"{50 - getattr(r, m):+.1f}"  # ours - theirs
    assert not any("across settings" in n for n in notes)
    assert any("cifar10 / preact_resnet18 / pratio 0.1" in n for n in notes)


def test_compare_matches_each_rows_own_setting(tmp_path):
    """A GTSRB 5% row of an imported BackdoorBench VGG19-BN finds that setting, not CIFAR-10's."""
    from results.published import index, load_published, lookup

    pub = load_published("backdoorbench")
    r = lookup(index(pub), ("gtsrb", "vgg19_bn", 0.05), "blended", "ft")
    cells, notes = _compare_rows(tmp_path, [dict(dataset="gtsrb", arch="bb_vgg19_bn", pratio=0.05, attack="blended",
                                                 defense="ft", acc=0.9, asr=0.1, ra=0.8)])
    assert cells["FT"][1] == f"{r.acc:.2f}" and cells["FT"][4] == f"{r.asr:.2f}"
    assert not any("across settings" in n for n in notes) and not any("head" in n for n in notes)


# ------------------------------------------------------------------ defending imported models


@pytest.fixture(scope="module")
def exported(badnets_model, tmp_path_factory):
    d = badnets_model
    cfg = d["cfg"]
    bd, bd_idx, bd_true = d["poisoned"].backdoor_test(d["model"])
    with pytest.warns(UserWarning, match="bdgrid.tiny_cnn"):
        return export_record(d["model"], cfg.arch, cfg.dataset, bd, bd_idx, bd_true, len(d["test"]),
                             tmp_path_factory.mktemp("exp") / "record" / "badnets_0_1", attack=cfg.attack,
                             pratio=cfg.pratio, target=cfg.target, seed=cfg.seed, dataset_params=cfg.dataset_params)


@pytest.mark.parametrize("defense,params", [("none", {}), ("ft", {"epochs": 2}),
                                            ("tsbd", {"max_un_epochs": 3, "ft_epochs": 1, "un_threshold": 0.95})])
def test_defend_an_imported_model_as_bdgrid_defends_its_own(badnets_model, exported, defense, params):
    from defense.data.splits import defender_subset
    from defense.external.imported import run_imported

    imp = load_record(exported)
    # the defender's data are bdgrid's protocol on the same clean training set: identical subsets
    assert torch.equal(imp.train.x, badnets_model["train"].x)
    assert torch.equal(defender_subset(imp.train, 0.05, 0)[1], defender_subset(badnets_model["train"], 0.05, 0)[1])
    weights = {k: v.clone() for k, v in imp.model.state_dict().items()}
    r = run_imported(imp, defense, params, seed=0)
    assert r["bd_asr"] > 0.5 and 0 <= r["asr"] <= 1 and 0 <= r["acc"] <= 1
    assert r["provenance"]["source"] == "backdoorbench" and r["key"] == imp.key
    changed = any(not torch.equal(v, r["model"].state_dict()[k]) for k, v in weights.items())
    assert changed == (defense != "none")
    assert all(torch.equal(v, imp.model.state_dict()[k]) for k, v in weights.items())  # imported model untouched
    if defense == "none":
        assert (r["acc"], r["asr"], r["der"]) == (r["bd_acc"], r["bd_asr"], 0.5)


def test_checkpoint_with_a_folder_of_backdoor_images(badnets_model, exported, tmp_path):
    """A plain checkpoint with its triggered test images as a folder measures what the record does."""
    from defense.external.imported import import_checkpoint

    d = badnets_model
    f = tmp_path / "model.pt"
    torch.save(d["model"].state_dict(), f)
    imp = import_checkpoint(f, "tiny_cnn", "synthetic", "badnets", dataset_params=d["cfg"].dataset_params,
                            backdoor_test=exported / "bd_test_dataset")
    ref = load_record(exported)
    assert evaluate_record(imp) == evaluate_record(ref)
    rebuilt = import_checkpoint(f, "tiny_cnn", "synthetic", "badnets", dataset_params=d["cfg"].dataset_params)
    assert evaluate_record(rebuilt) == evaluate_record(ref)  # bdgrid's attack rebuilt with the same seed
    assert rebuilt.provenance["source"] == "checkpoint" and rebuilt.key != ref.key


def test_find_and_inspect_records_without_loading_data(records, tmp_path):
    from defense.external.backdoorbench import find_records, inspect_record

    root = records["badnet"].parent
    assert find_records(root / "*_0_1") == [records["badnet"], records["wanet"]]
    assert find_records(records["wanet"] / "attack_result.pt") == [records["wanet"]]
    with pytest.raises(RecordProblem, match="no record folder"):
        find_records(tmp_path / "*")
    info = inspect_record(records["wanet"])
    assert (info["arch"], info["dataset"], info["key"]) == ("preact_resnet18", "cifar10", record_key(records["wanet"]))
    assert info["provenance"]["attack"] == "wanet" and info["provenance"]["target"] == 0


def test_torchvision_model_names_import_as_backdoorbench_builds_them(records, tmp_path):
    """BackdoorBench's 'resnet18' is torchvision's resnet18(num_classes=10): imported as bb_resnet18
    with the record's weights, it predicts what that torchvision model predicts."""
    import torchvision

    rec_dir = tmp_path / "record" / "r18"
    rec_dir.mkdir(parents=True)
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    good = safe_torch_load(records["badnet"] / "attack_result.pt")
    torch.save({**good, "model_name": "resnet18", "model": tv.state_dict()}, rec_dir / "attack_result.pt")
    import shutil

    shutil.copytree(records["badnet"] / "bd_test_dataset", rec_dir / "bd_test_dataset")
    imp = load_record(rec_dir, records["data_root"], {"download": False})
    assert imp.arch == "bb_resnet18"
    x = (imp.test.x.float() / 255 - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    with torch.no_grad():
        assert torch.equal(imp.model(x).argmax(1), tv(x).argmax(1))


def test_trial_from_a_backdoorbench_record_on_the_command_line(records):
    """`bdgrid trial --from-backdoorbench RECORD`: the record's numbers as the import measures them
    (its own test split), and a clear message, no traceback, for a folder that is not a record."""
    import json

    from typer.testing import CliRunner

    from defense.external.imported import run_imported
    from grid.cli import app

    rec = records["badnet"]
    r = CliRunner().invoke(app, ["trial", "--from-backdoorbench", str(rec), "--data-root", str(records["data_root"]),
                                 "--data-param", "download=false", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = run_imported(load_record(rec, records["data_root"], {"download": False}), "none")
    assert (got["bd_acc"], got["bd_asr"]) == (pytest.approx(want["bd_acc"]), pytest.approx(want["bd_asr"]))
    assert got["provenance"]["source"] == "backdoorbench" and got["model_key"] == want["key"]
    r = CliRunner().invoke(app, ["trial", "--from-backdoorbench", str(rec.parent), "--data-root",
                                 str(records["data_root"])])
    assert r.exit_code == 2 and "Traceback" not in r.output and "error" in r.output
