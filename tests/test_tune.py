"""bdgrid tune over the grid engine: real Optuna storage (journal file, PostgreSQL), real Ray, tiny
synthetic models.

One Ray session serves the whole module (Ray start-up is slow); subprocess drivers join it with
``--address``. Every spec of the module points ``artifacts:`` at one shared folder, so the
backdoored model (tiny_cnn, 1500/500 synthetic, 3 epochs: its quality does not matter here) is
trained once by the first test that needs it and found by content key in every later one, as a
grid's store provides it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent / "bdgrid"
DATA = {"n_train": 1500, "n_test": 500}


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
def artifacts(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shared") / "artifacts")


def grid_dict(name: str, artifacts: str, attacks=("badnets",), dataset: str = "synthetic", tune: dict | None = None,
              **kw) -> dict:
    d = dict(name=name, datasets=[{"name": dataset, "params": DATA}], archs=["tiny_cnn"], attacks=list(attacks),
             pratios=[0.1], seeds=[0], recipe="fast", epochs=3, imports=["test_tune_plugins"], artifacts=artifacts)
    d.update(kw)
    if tune is not None:
        d["tune"] = tune
    return d


def probe_tune(tmp: Path, **kw) -> dict:
    t = dict(defense="tune_probe", params={"count_dir": str(tmp / "count")},
             space={"n": {"type": "float", "low": 0.0, "high": 0.3},
                    "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
             objectives=["acc", "asr"], sampler="tpe", n_trials=8, parallelism=2, tune_on=[{"attack": "badnets"}])
    for k, v in kw.items():
        t[k] = {**t["params"], **v} if k == "params" else v
    return t


def write_spec(path: Path, d: dict):
    """The spec file, loaded and validated as `bdgrid tune` does (no problem allowed)."""
    from grid.spec import load_spec
    from grid.validate import every_problem

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    ls, problems = load_spec(path)
    problems = every_problem(ls, problems)
    assert not problems, [p.render(ls.file) for p in problems]
    return ls


def tune_in_process(ls, out: Path) -> dict:
    from grid.run import open_runner
    from grid.tune.driver import Tuning, run_study, tune_plan

    tu = Tuning(ls, out.resolve())
    plan = tune_plan(tu)
    runner = open_runner(ls, tu.out, plan, show_progress=False)
    try:
        s = run_study(tu, runner, plan, say=lambda m: None)
    finally:
        res = runner.close()
    s["res"], s["tuning"] = res, tu
    return s


def n_prepare_calls(tmp: Path) -> int:
    d = tmp / "count"
    return len(list(d.iterdir())) if d.exists() else 0


def executed(out: Path) -> Counter:
    """(kind, key) -> how many times the stage ran, from <out>/executed.log."""
    f = out / "executed.log"
    lines = f.read_text().splitlines() if f.exists() else []
    return Counter((ln.split()[0], ln.split()[1]) for ln in lines)


def kinds(c: Counter) -> Counter:
    out: Counter = Counter()
    for (kind, _), n in c.items():
        out[kind] += n
    return out


# ----------------------------------------------------------------------------- in-process studies

def test_small_study_records_all_trials_and_shares_prepare(ray_address, artifacts, tmp_path):
    import results
    from grid.spec import DefenseSpec, read_params_from
    from grid.tune.driver import choose
    from grid.tune.plots import write_plots

    ls = write_spec(tmp_path / "t.yaml", grid_dict("s", artifacts, tune=probe_tune(tmp_path)))
    s = tune_in_process(ls, tmp_path / "out")
    tu = s["tuning"]
    assert s["counts"]["complete"] == 8 and s["counts"]["running"] == 0 and s["counts"]["fail"] == 0
    assert sorted(s["told"]) == list(range(8))
    # Stages "1a/1b" (prepare) ran once for the one model: only n and lr were tuned
    assert n_prepare_calls(tmp_path) == 1 and kinds(executed(tu.out))["prepare"] == 1
    study = tu.open()
    # trial 0 is the defense's defaults: every study has its baseline
    assert study.trials[0].params == {"n": 0.1, "lr": 0.01} and study.trials[0].user_attrs["bdgrid_default"]
    assert study.metric_names == ["acc", "asr"]  # named for optuna-dashboard

    rows = results.load(tu.dir, table="trials")
    assert len(rows) == 8 and set(rows["split"]) == {"val"} and set(rows["tuned_on"]) == {"badnets"}
    for t in study.trials:
        r = rows[rows["trial"] == t.number].iloc[0]
        assert r["acc"] == pytest.approx(t.values[0]) and r["asr"] == pytest.approx(t.values[1])
        assert r["acc_lo"] <= r["acc"] <= r["acc_hi"] and r["n_clean"] == 100  # 20% of 500 test images
    # a trial's eval scored the validation split only: its rows in the run's results are val rows
    evals = set(rows["eval_key"])
    res = results.load(tu.out)
    assert set(res[res["key"].isin(evals)]["split"]) == {"val"}

    doc, path = choose(tu, study)
    pareto = {p["trial"] for p in doc["pareto"]}
    assert doc["trial"] in pareto and doc["tuned_on"] == ["badnets"] and doc["defense"] == "tune_probe"
    for t in study.trials:  # the Pareto set is non-dominated
        if t.number not in pareto:
            assert any(study.trials[p].values[0] >= t.values[0] and study.trials[p].values[1] <= t.values[1]
                       for p in pareto)
    lo, hi = doc["interval"]["acc"]
    assert lo <= doc["values"]["acc"] <= hi and doc["interval"]["n_images"] == 100
    assert set(doc["params"]) == {"count_dir", "n", "lr"}
    params, problem = read_params_from(ls, DefenseSpec(name="tune_probe", params_from=str(path)))
    assert problem is None and params == doc["params"]

    paths = write_plots(ls.spec.tune, study, tu.dir / "plots")
    names = {p.name for p in paths}
    assert {"history-acc.png", "history-asr.png", "pareto.png", "importance-acc.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)

    # a rerun of a finished study asks nothing more and runs no stage
    again = tune_in_process(ls, tmp_path / "out")
    assert again["told"] == [] and again["counts"]["complete"] == 8 and not again["res"].done


def test_prepare_runs_once_per_distinct_shared_value(ray_address, artifacts, tmp_path):
    t = probe_tune(tmp_path, space={"n": {"type": "categorical", "choices": [0.0, 0.2]},
                                    "lr_un": {"type": "categorical", "choices": [1e-3, 3e-3]}},
                   sampler="grid", n_trials=4, objectives=["der"], default_first=False)
    s = tune_in_process(write_spec(tmp_path / "t.yaml", grid_dict("p", artifacts, tune=t)), tmp_path / "out")
    assert s["counts"]["complete"] == 4
    assert n_prepare_calls(tmp_path) == 2  # one per lr_un value, not per trial
    seen = sorted((x.params["n"], x.params["lr_un"]) for x in s["tuning"].open().trials)
    assert seen == [(0.0, 1e-3), (0.0, 3e-3), (0.2, 1e-3), (0.2, 3e-3)]


def test_objectives_never_read_the_reported_test_split(ray_address, artifacts, tmp_path):
    """Garble every image and label of the reported test split: the tuning objectives stay
    bit-for-bit the same; the reported evaluation does change, so the garbling bites."""
    import results
    from grid.run import execute_plan
    from grid.tune.driver import report_evals, tune_plan

    t = probe_tune(tmp_path, space={"n": {"type": "categorical", "choices": [0.0, 0.25]}}, sampler="grid",
                   n_trials=2, params={"epochs": 1}, default_first=False)
    values, reported = {}, {}
    for ds in ("synthetic", "synthetic_garbled"):
        ls = write_spec(tmp_path / f"{ds}.yaml", grid_dict(ds, artifacts, dataset=ds, tune=t))
        s = tune_in_process(ls, tmp_path / ds)
        values[ds] = {x.params["n"]: x.values for x in s["tuning"].open().trials}
        plan = tune_plan(s["tuning"])
        [(_, _, key)] = report_evals(s["tuning"], plan, {"tuned": {"n": 0.0, "epochs": 0}})
        execute_plan(ls, tmp_path / ds, plan=plan, show_progress=False)
        df = results.load(tmp_path / ds)
        reported[ds] = df[(df["key"] == key) & (df["split"] == "test")].iloc[0]
    assert values["synthetic"] == values["synthetic_garbled"] and len(values["synthetic"]) == 2, values
    # the reported split really is garbage there: random labels give chance-level accuracy
    assert reported["synthetic_garbled"]["acc"] < 0.2 and reported["synthetic_garbled"]["bd_acc"] < 0.2
    assert reported["synthetic"]["bd_acc"] != reported["synthetic_garbled"]["bd_acc"]


def test_failed_trial_is_recorded_and_bounded(ray_address, artifacts, tmp_path):
    t = probe_tune(tmp_path, space={"n": {"type": "categorical", "choices": [0.0, 0.5]}}, sampler="grid",
                   n_trials=2, max_failures=1, params={"fail_above": 0.3, "epochs": 0}, default_first=False)
    s = tune_in_process(write_spec(tmp_path / "t.yaml", grid_dict("f", artifacts, retries=0, tune=t)), tmp_path / "o")
    assert s["counts"]["complete"] == 1 and s["counts"]["fail"] == 1 and len(s["failed"]) == 1
    x = s["tuning"].open().trials[s["failed"][0]]
    assert x.params["n"] == 0.5 and "fail_above" in x.user_attrs["bdgrid_fail_reason"]
    # the grid's failure file, in plain text
    [f] = (tmp_path / "o" / "failures").glob("defense-*.txt")
    assert "fail_above" in f.read_text() and "\x1b[" not in f.read_text()


def test_dead_worker_is_retried_by_the_grid_retry_path(ray_address, artifacts, tmp_path):
    t = probe_tune(tmp_path, space={"n": {"type": "categorical", "choices": [0.1]}}, sampler="grid", n_trials=1,
                   params={"die_once_dir": str(tmp_path / "die"), "epochs": 0}, default_first=False)
    s = tune_in_process(write_spec(tmp_path / "t.yaml", grid_dict("d", artifacts, retries=1, tune=t)), tmp_path / "o")
    assert (tmp_path / "die" / "died").exists()  # the first attempt's worker died
    assert s["counts"]["complete"] == 1 and not s["res"].failed
    assert kinds(executed(tmp_path / "o"))["defense"] == 1  # the dead attempt logged nothing; the retry ran it


@pytest.mark.skipif(not os.environ.get("BDGRID_TEST_PG_URL"),
                    reason="BDGRID_TEST_PG_URL unset (.ci/run starts PostgreSQL and sets it)")
def test_postgresql_storage(ray_address, artifacts, tmp_path):
    import optuna

    url = os.environ["BDGRID_TEST_PG_URL"]
    name = f"bdgrid-test-{uuid.uuid4().hex[:8]}"
    t = probe_tune(tmp_path, study=name, storage=url, n_trials=3, params={"epochs": 0})
    try:
        s = tune_in_process(write_spec(tmp_path / "t.yaml", grid_dict("pg", artifacts, tune=t)), tmp_path / "o")
        assert s["counts"]["complete"] == 3
        study = optuna.load_study(study_name=name, storage=url)  # read back through a fresh connection
        assert len([x for x in study.trials if x.state.name == "COMPLETE"]) == 3
        assert study.user_attrs["defense"] == "tune_probe"
    finally:
        optuna.delete_study(study_name=name, storage=url)


# ----------------------------------------------------------------------------- one engine: reuse across commands

def test_run_then_tune_trains_nothing_and_params_from_reuses_the_prepare(ray_address, tmp_path):
    """`bdgrid run` then `bdgrid tune` over the same cells: no attack or resource stage again;
    a grid using the tune's best.yaml: no prepare stage again."""
    import results
    from grid.run import execute_plan
    from grid.spec import load_spec
    from grid.tune.driver import choose

    art = str(tmp_path / "artifacts")  # its own store: the counts below start from nothing
    out = tmp_path / "run"
    t = probe_tune(tmp_path, n_trials=3, params={"epochs": 0}, sampler="random")
    ls = write_spec(tmp_path / "g.yaml", grid_dict("g", art, attacks=("badnets", "blended"), out=str(out),
                                                   defenses=["none", {"name": "tune_probe",
                                                                      "params": {"count_dir": str(tmp_path / "count"),
                                                                                 "epochs": 0}}], tune=t))
    res = execute_plan(ls, out, show_progress=False)
    assert res.ok
    ran = kinds(executed(out))
    assert ran["attack"] == 2 and ran["prepare"] == 2
    s = tune_in_process(ls, out)
    assert s["counts"]["complete"] == 3
    after = kinds(executed(out))
    assert after["attack"] == 2 and after["resource"] == ran["resource"]  # zero model trainings in the tune
    assert after["prepare"] == 2  # the tune's Stages 1a/1b are the grid's
    _, best = choose(s["tuning"])
    g2 = grid_dict("g2", art, out=str(out), defenses=[{"name": "tune_probe", "params_from": str(best),
                                                       "label": "tuned"}])
    ls2 = write_spec(tmp_path / "g2.yaml", g2)
    assert execute_plan(ls2, out, show_progress=False).ok
    assert kinds(executed(out))["prepare"] == 2 and kinds(executed(out))["attack"] == 2
    df = results.load(out)
    tuned = df[(df["defense"] == "tuned") & (df["split"] == "test")]
    assert len(tuned) == 1 and set(tuned["tuned_on"]) == {"badnets"}  # params_from rows say what they were tuned on
    saved = yaml.safe_load((out / "spec.yaml").read_text())  # the run folder keeps the resolved spec
    assert saved["spec"]["name"] == "g2" and saved["spec"]["recipe"] == "fast" and saved["spec_hash"]
    assert load_spec(tmp_path / "g2.yaml")[0].spec.defenses[0].params_from == str(best)


def test_trial_grid_and_tune_agree_on_the_model(ray_address, tmp_path):
    """One cell through `bdgrid trial`, a one-cell grid and a one-cell tune: the same backdoored-model
    key and the same before-defense numbers."""
    import results
    from defense.trial import TrialConfig, run_trial
    from grid.plan import build_plan, trial_model_key
    from grid.run import execute_plan

    art = str(tmp_path / "artifacts")
    cfg = TrialConfig(dataset_params=DATA, epochs=3)  # every other field at its default
    ls = write_spec(tmp_path / "g.yaml", dict(name="one", datasets=[{"name": "synthetic", "params": DATA}],
                                              archs=["tiny_cnn"], attacks=["badnets"], epochs=3, artifacts=art,
                                              imports=["test_tune_plugins"],
                                              tune=probe_tune(tmp_path, n_trials=1, params={"epochs": 0})))
    [grid_key] = [s.key for s in build_plan(ls).of_kind("attack")]
    assert trial_model_key(cfg) == grid_key
    assert execute_plan(ls, tmp_path / "g", show_progress=False).ok
    df = results.load(tmp_path / "g")
    none = df[(df["defense"] == "none") & (df["split"] == "test")].iloc[0]
    s = tune_in_process(ls, tmp_path / "t")  # the same artifact store: the tune trains nothing
    assert kinds(executed(tmp_path / "t"))["attack"] == 0 and s["counts"]["complete"] == 1
    import torch

    torch.set_num_threads(1)  # as the grid's stage task (cpus: 1): the same float order
    trial = run_trial(cfg)
    for k in ("acc", "asr", "ra"):
        assert trial[f"bd_{k}"] == pytest.approx(float(none[f"bd_{k}"]), abs=1e-9), k


@pytest.mark.slow
@pytest.mark.parametrize("attack", [{"name": "inputaware", "params": {"mask_epochs": 1, "width": 8}},
                                    {"name": "lf", "params": {"steps": 5, "ref_epochs": 1}}],
                         ids=["inputaware", "lf"])
def test_tuner_scores_the_bytes_the_grid_scores(ray_address, tmp_path, attack):
    """For attacks with trained resources, the backdoor validation images a tuning trial scores are
    byte-identical to those of the grid's own eval of that cell (sha256 digest in every row)."""
    import results
    from grid.run import execute_plan

    art = str(tmp_path / "artifacts")
    ls = write_spec(tmp_path / "g.yaml", grid_dict("b", art, attacks=(attack,), epochs=1,
                                                   tune=probe_tune(tmp_path, n_trials=1, params={"epochs": 0},
                                                                   tune_on=[{"attack": attack["name"]}])))
    assert execute_plan(ls, tmp_path / "o", show_progress=False).ok
    tune_in_process(ls, tmp_path / "o")
    df = results.load(tmp_path / "o")
    val = df[df["split"] == "val"]
    digests = set(val["bd_digest"])
    assert len(digests) == 1 and len(val) >= 2, val[["defense", "bd_digest"]]
    assert set(df[df["split"] == "test"]["bd_digest"]) != digests  # the test split's images are others
    assert kinds(executed(tmp_path / "o"))["attack"] == 1


# ----------------------------------------------------------------------------- separate driver processes

def driver(spec_file: Path, out: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([str(BIN), "tune", str(spec_file), "--out", str(out), "--address", address, "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def summary_of(p: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_drivers_on_one_journal_lose_no_trial(ray_address, artifacts, tmp_path):
    t = probe_tune(tmp_path, n_trials=6, sampler="random", params={"epochs": 0, "sleep_s": 0.5},
                   storage=str(tmp_path / "shared.journal"))
    f = tmp_path / "t.yaml"
    ls = write_spec(f, grid_dict("two", artifacts, tune=t))
    a, b = driver(f, tmp_path / "a", ray_address), driver(f, tmp_path / "b", ray_address)
    sa, sb = summary_of(a), summary_of(b)
    from grid.tune.driver import Tuning

    study = Tuning(ls, tmp_path / "a").open()
    complete = {x.number for x in study.trials if x.state.name == "COMPLETE"}
    assert not set(sa["told"]) & set(sb["told"])  # each trial told by exactly one driver
    assert set(sa["told"]) | set(sb["told"]) == complete  # and every told trial is in the storage
    assert len(complete) >= 6 and not [x for x in study.trials if x.state.name == "RUNNING"]
    assert len(study.trials) == len(complete)  # nothing lost, nothing left half-done


@pytest.mark.slow
def test_killed_study_resumes_without_losing_or_double_counting(ray_address, artifacts, tmp_path):
    from grid.tune.driver import Tuning

    t = probe_tune(tmp_path, n_trials=6, sampler="random", params={"epochs": 0, "sleep_s": 4.0})
    f = tmp_path / "t.yaml"
    ls = write_spec(f, grid_dict("kill", artifacts, tune=t))
    out = tmp_path / "out"
    tu = Tuning(ls, out.resolve())
    p = driver(f, out, ray_address)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some trials are done and others in flight
        time.sleep(1)
        if Path(tu.storage).exists():
            st = Counter(x.state.name for x in tu.open().trials)
            if st["COMPLETE"] >= 2 and st["RUNNING"] >= 1:
                break
        assert p.poll() is None, p.communicate()[1][-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    study = tu.open()
    done_before = {x.number: x.values for x in study.trials if x.state.name == "COMPLETE"}
    orphans = {x.number: x.params for x in study.trials if x.state.name == "RUNNING"}
    assert len(done_before) >= 2 and orphans
    assert n_prepare_calls(tmp_path) == 1

    s = tune_in_process(ls, out)  # the rerun (same spec, same journal, same run folder)
    assert n_prepare_calls(tmp_path) == 1  # Stages "1a/1b" read back from the store
    ran = executed(out)
    assert all(n == 1 for (kind, _), n in ran.items() if kind != "data"), ran  # no finished stage ran twice
    study = tu.open()
    by_number = {x.number: x for x in study.trials}
    assert sorted(s["recovered"]) == sorted(orphans)
    for n, vals in done_before.items():  # no COMPLETE trial lost or changed
        assert by_number[n].state.name == "COMPLETE" and by_number[n].values == vals
    for n in orphans:  # killed trials failed, their parameters re-run
        assert by_number[n].state.name == "FAIL"
        retry = [x for x in study.trials if x.user_attrs.get("bdgrid_retry_of") == n]
        assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == orphans[n]
    assert sum(x.state.name == "COMPLETE" for x in study.trials) == 6  # exactly the target: none double-counted
    assert len(s["told"]) == 6 - len(done_before)
