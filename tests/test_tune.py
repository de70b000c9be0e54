"""bdgrid tune: real Optuna storage (journal file, PostgreSQL), real Ray, tiny synthetic models.

One Ray session serves the whole module (Ray start-up is slow); subprocess drivers join it
with ``--address``. The backdoored model (tiny_cnn, 1500/500 synthetic, 3 epochs: its quality does
not matter here) is trained once by the tuner itself (a Ray task), then copied into the model
cache of every other study, as the grid's artifact store would provide it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent / "bdgrid"
DATA = {"n_train": 1500, "n_test": 500}
BASE = {"dataset_params": DATA, "epochs": 3}
_STATE: dict = {}


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    # Ray workers inherit the environment at start: let them import the test plugins module
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    import test_tune_plugins  # noqa: F401  (register tune_probe / synthetic_garbled here too)

    if ray.is_initialized():
        ray.shutdown()
    from grid.run import connect, loopback_ip

    connect(None, num_cpus=2)  # the same local Ray `bdgrid tune` starts
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {loopback_ip()}  # never the machine's other address
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_state(ray_address, tmp_path_factory):
    """The tuner trains the missing backdoored model (a Ray task) and caches its checkpoint."""
    from grid import tune
    from grid.tune_spec import parse_spec

    tmp = tmp_path_factory.mktemp("model")
    spec = parse_spec(dict(study="m", defense="tune_probe", imports=["test_tune_plugins"],
                           space={"n": {"low": 0.0, "high": 0.3}}, out=str(tmp), base=BASE,
                           tune_on=[{"attack": "badnets"}]))
    cell = spec.cells()[0]
    states = tune.ensure_models(spec, [cell])
    ckpt = tune.model_path(spec, cell)
    assert ckpt.exists() and not list(ckpt.parent.glob("*.tmp"))
    again = tune.ensure_models(spec, [cell])  # loaded from the checkpoint, not retrained
    assert all(torch.equal(again[cell.key()][k], v) for k, v in states[cell.key()].items())
    _STATE["badnets"] = states[cell.key()]
    return states[cell.key()]


def make_spec(tmp: Path, study: str = "s", **kw):
    from grid.tune_spec import parse_spec

    raw = dict(study=study, defense="tune_probe", imports=["test_tune_plugins"],
               params={"count_dir": str(tmp / "count")},
               space={"n": {"type": "float", "low": 0.0, "high": 0.3},
                      "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
               objectives=["acc", "asr"], sampler="tpe", n_trials=8, parallelism=2, out=str(tmp / "out"),
               base=BASE, tune_on=[{"attack": "badnets"}])
    for k, v in kw.items():
        if k == "params":
            raw["params"] = {**raw["params"], **v}
        else:
            raw[k] = v
    spec = parse_spec(raw)
    seed_models(spec)
    return spec


def seed_models(spec) -> None:
    """Put the module's badnets model into the tuner's model cache for every cell of the spec.
    ``synthetic_garbled`` has the same training split as ``synthetic`` (only its reported test
    split differs), so the same weights are exactly what training on it would give."""
    from grid.tune import model_path

    state = _STATE["badnets"]
    for c in spec.cells("tune_on") + spec.cells("report_on"):
        assert c.attack == "badnets" and c.dataset_params == DATA and c.epochs == 3
        p = model_path(spec, c)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, p)


def n_prepare_calls(tmp: Path) -> int:
    d = tmp / "count"
    return len(list(d.iterdir())) if d.exists() else 0


def states(spec) -> dict:
    from grid.tune_study import counts, open_study

    return counts(open_study(spec))


# ----------------------------------------------------------------------------- in-process studies

def test_small_study_records_all_trials_and_shares_prepare(model_state, ray_address, tmp_path):
    import results
    from grid import tune, tune_best, tune_study
    from grid.spec import read_params_from  # the grid's reader of params_from files

    spec = make_spec(tmp_path)
    s = tune.run_study(spec)
    assert s["counts"]["complete"] == 8 and s["counts"]["running"] == 0 and s["counts"]["fail"] == 0
    assert sorted(s["told"]) == list(range(8))
    # Stages "1a/1b" (prepare) ran once for the one model: only n and lr were tuned
    assert s["n_prepare"] == 1 and n_prepare_calls(tmp_path) == 1
    assert len(list((spec.out_dir() / "prepared").glob("*.pt"))) == 1  # checkpointed for resume/evaluation

    study = tune_study.open_study(spec)
    rows = results.load(spec.out_dir(), table="trials")
    assert len(rows) == 8 and set(rows["split"]) == {"val"} and set(rows["tuned_on"]) == {"badnets"}
    by_trial = {json.loads(e)["trial"]: r for e, (_, r) in zip(rows["extra"], rows.iterrows())}
    for t in study.trials:
        assert by_trial[t.number]["acc"] == pytest.approx(t.values[0])
        assert by_trial[t.number]["asr"] == pytest.approx(t.values[1])
    # the Pareto set is non-dominated and the chosen trial is on it
    best = tune_best.load_best(s["best"])
    pareto = {p["trial"] for p in best["pareto"]}
    assert best["trial"] in pareto and best["tuned_on"] == ["badnets"] and best["defense"] == "tune_probe"
    for t in study.trials:
        if t.number in pareto:
            continue
        assert any(study.trials[p].values[0] >= t.values[0] and study.trials[p].values[1] <= t.values[1]
                   for p in pareto)
    assert set(best["params"]) == {"count_dir", "n", "lr"}

    class D:  # what the grid spec's defense entry holds
        name, params_from = "tune_probe", s["best"]

    class L:
        base_dir = Path("/")

    params, problem = read_params_from(L, D)
    assert problem is None and params == best["params"]

    paths = tune.write_plots(spec, study)
    names = {p.name for p in paths}
    assert {"history-acc.png", "history-asr.png", "pareto.png"} <= names
    assert any(n.startswith("importance-") for n in names)
    assert all(p.stat().st_size > 1000 for p in paths)

    # a rerun of a finished study asks nothing more (resume never double-counts)
    again = tune.run_study(spec)
    assert again["told"] == [] and again["counts"]["complete"] == 8


def test_prepare_runs_once_per_distinct_shared_value(model_state, ray_address, tmp_path):
    from grid import tune, tune_study

    spec = make_spec(tmp_path, space={"n": {"type": "categorical", "choices": [0.0, 0.2]},
                                      "lr_un": {"type": "categorical", "choices": [1e-3, 3e-3]}},
                     sampler="grid", n_trials=4, objectives=["der"])
    s = tune.run_study(spec)
    assert s["counts"]["complete"] == 4
    assert s["n_prepare"] == 2 and n_prepare_calls(tmp_path) == 2  # one per lr_un value, not per trial
    seen = sorted((t.params["n"], t.params["lr_un"]) for t in tune_study.open_study(spec).trials)
    assert seen == [(0.0, 1e-3), (0.0, 3e-3), (0.2, 1e-3), (0.2, 3e-3)]


def test_objectives_never_read_the_reported_test_split(model_state, ray_address, tmp_path):
    """Garble every image and label of the reported test split: the tuning objectives stay
    bit-for-bit the same; the final (reported) evaluation does change, so the garbling bites."""
    from defense.data import load_dataset
    from defense.data.splits import val_test_indices
    from grid import tune, tune_study, tune_tasks

    kw = dict(space={"n": {"type": "categorical", "choices": [0.0, 0.25]}}, sampler="grid", n_trials=2,
              objectives=["acc", "asr"], params={"epochs": 1})
    clean = make_spec(tmp_path / "a", study="clean", **kw)
    garbled = make_spec(tmp_path / "b", study="garbled", base={**BASE, "dataset": "synthetic_garbled"}, **kw)

    # what a trial task receives holds validation indices only
    inp = tune_tasks.build_inputs(garbled.cells()[0], _STATE["badnets"])
    val_idx, test_idx = val_test_indices(DATA["n_test"], 0.2, seed=0)
    assert torch.equal(inp.val_idx, val_idx) and not set(inp.val_idx.tolist()) & set(test_idx.tolist())
    _, test = load_dataset("synthetic", **DATA)
    assert torch.equal(inp.val.x, test.x[val_idx]) and torch.equal(inp.val.y, test.y[val_idx])

    values = {}
    for spec in (clean, garbled):
        tune.run_study(spec)
        values[spec.study] = {t.params["n"]: t.values for t in tune_study.open_study(spec).trials}
    assert values["clean"] == values["garbled"] and len(values["clean"]) == 2, values

    rep = {spec.study: tune.evaluate_on_test(spec, {"tuned": {"n": 0.0, "epochs": 0}})[0] for spec in (clean, garbled)}
    # the reported split really is garbage there: random labels give chance-level accuracy
    assert rep["garbled"]["acc"] < 0.2 and rep["garbled"]["bd_acc"] < 0.2
    assert (rep["clean"]["acc"], rep["clean"]["bd_acc"]) != (rep["garbled"]["acc"], rep["garbled"]["bd_acc"])


def test_failed_trial_is_recorded_and_bounded(model_state, ray_address, tmp_path):
    from grid import tune, tune_study

    spec = make_spec(tmp_path, space={"n": {"type": "categorical", "choices": [0.0, 0.5]}}, sampler="grid",
                     n_trials=2, max_failures=1, params={"fail_above": 0.3, "epochs": 0})
    s = tune.run_study(spec)
    assert s["counts"]["complete"] == 1 and s["counts"]["fail"] == 1 and len(s["failed"]) == 1
    t = tune_study.open_study(spec).trials[s["failed"][0]]
    assert t.params["n"] == 0.5 and "fail_above" in t.user_attrs["bdgrid_fail_reason"]


@pytest.mark.skipif(not os.environ.get("BDGRID_TEST_PG_URL"),
                    reason="BDGRID_TEST_PG_URL unset (.ci/run starts PostgreSQL and sets it)")
def test_postgresql_storage(model_state, ray_address, tmp_path):
    import optuna
    from grid import tune

    url = os.environ["BDGRID_TEST_PG_URL"]
    name = f"bdgrid-test-{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path, study=name, storage=url, n_trials=3, params={"epochs": 0})
    try:
        s = tune.run_study(spec)
        assert s["counts"]["complete"] == 3
        study = optuna.load_study(study_name=name, storage=url)  # read back through a fresh connection
        assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3
        assert study.user_attrs["defense"] == "tune_probe"
    finally:
        optuna.delete_study(study_name=name, storage=url)


# ----------------------------------------------------------------------------- separate driver processes

def write_spec_file(spec, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(spec.model_dump_json())))
    return path


def driver(spec_file: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([str(BIN), "tune", str(spec_file), "--address", address, "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def summary_of(p: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_drivers_on_one_journal_lose_no_trial(model_state, ray_address, tmp_path):
    from grid import tune_study

    spec = make_spec(tmp_path, n_trials=6, sampler="random", params={"epochs": 0, "sleep_s": 0.5})
    f = write_spec_file(spec, tmp_path / "tune.yaml")
    a, b = driver(f, ray_address), driver(f, ray_address)
    sa, sb = summary_of(a), summary_of(b)
    study = tune_study.open_study(spec)
    complete = {t.number for t in study.trials if t.state.name == "COMPLETE"}
    assert not set(sa["told"]) & set(sb["told"])  # each trial told by exactly one driver
    assert set(sa["told"]) | set(sb["told"]) == complete  # and every told trial is in the storage
    assert len(complete) >= 6 and states(spec)["running"] == 0
    assert len(study.trials) == len(complete)  # nothing lost, nothing left half-done


@pytest.mark.slow
def test_killed_study_resumes_without_losing_or_double_counting(model_state, ray_address, tmp_path):
    from grid import tune, tune_study

    spec = make_spec(tmp_path, n_trials=6, sampler="random", params={"epochs": 0, "sleep_s": 4.0})
    f = write_spec_file(spec, tmp_path / "tune.yaml")
    p = driver(f, ray_address)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some trials are done and others in flight
        time.sleep(1)
        if Path(spec.storage_url()).exists():
            c = states(spec)
            if c["complete"] >= 2 and c["running"] >= 1:
                break
        assert p.poll() is None, p.communicate()[1][-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    study = tune_study.open_study(spec)
    done_before = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}
    orphans = {t.number: t.params for t in study.trials if t.state.name == "RUNNING"}
    assert len(done_before) >= 2 and orphans

    assert n_prepare_calls(tmp_path) == 1
    s = tune.run_study(spec)  # the rerun (same spec, same journal)
    assert s["n_prepare"] == 0 and n_prepare_calls(tmp_path) == 1  # Stages "1a/1b" read back from disk
    study = tune_study.open_study(spec)
    by_number = {t.number: t for t in study.trials}
    assert sorted(s["recovered"]) == sorted(orphans)
    for n, vals in done_before.items():  # no COMPLETE trial lost or changed
        assert by_number[n].state.name == "COMPLETE" and by_number[n].values == vals
    for n in orphans:  # killed trials failed, their parameters re-run
        assert by_number[n].state.name == "FAIL"
        retry = [t for t in study.trials if t.user_attrs.get("bdgrid_retry_of") == n]
        assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == orphans[n]
    assert states(spec)["complete"] == 6  # exactly the target: none double-counted
    assert len(s["told"]) == 6 - len(done_before)


def test_tune_on_grid_cells_reuses_the_grid_store(model_state, ray_address, tmp_path):
    """`grid:` in a tune spec: cells from the grid's expansion, models from its artifact store
    (trained there by the grid runner when missing, then reused, never retrained)."""
    import yaml

    from grid import tune
    from grid.plan import build_plan
    from grid.run import artifact_root
    from grid.spec import load_spec
    from grid.store import ArtifactStore
    from grid.tune_spec import SpecError, load_spec as load_tune

    (tmp_path / "g.yaml").write_text(yaml.safe_dump(dict(
        name="g", datasets=[{"name": "synthetic", "params": DATA}], archs=["tiny_cnn"], attacks=["badnets", "blended"],
        pratios=[0.1], seeds=[0], defenses=["none"], recipe="fast", epochs=2)))
    raw = dict(study="g", defense="tune_probe", imports=["test_tune_plugins"], grid="g.yaml",
               grid_out=str(tmp_path / "gout"), params={"epochs": 0}, space={"n": {"low": 0.0, "high": 0.3}},
               sampler="random", n_trials=2, out=str(tmp_path / "tune"), tune_on=[{"attack": "badnets"}])
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    spec = load_tune(tmp_path / "t.yaml")
    [cell] = spec.cells()
    assert (cell.attack, cell.epochs, cell.recipe, cell.dataset_params) == ("badnets", 2, "fast", DATA)

    s = tune.run_study(spec)
    assert s["counts"]["complete"] == 2
    ls, _ = load_spec(tmp_path / "g.yaml")
    store = ArtifactStore(artifact_root(ls, tmp_path / "gout"))
    keys = {st.info["attack"]: st.key for st in build_plan(ls).of_kind("attack")}
    assert store.exists("attack", keys["badnets"]) and not store.exists("attack", keys["blended"])
    f = Path(store.path("attack", keys["badnets"]))
    mtime = f.stat().st_mtime_ns
    states = tune.ensure_models(spec, [cell])
    stored = store.get("attack", keys["badnets"])["state"]
    assert all(torch.equal(states[cell.key()][k], v) for k, v in stored.items())
    assert f.stat().st_mtime_ns == mtime  # reused, not retrained

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**raw, "tune_on": [{"attack": "wanet"}, {"atack": "x"}]}))
    with pytest.raises(SpecError) as e:
        load_tune(tmp_path / "bad.yaml")
    text = "\n".join(e.value.problems)
    assert "tune_on[0]: {'attack': 'wanet'} matches no cell" in text
    assert "tune_on[1].atack: not a cell axis of a grid (did you mean 'attack'?)" in text
