"""The grid runner on real Ray (local, CPU, tiny data): train-once, resume, retries after worker
death and exceptions, corrupt artifacts, SIGKILL mid-run, and a two-node cluster.

One local Ray session is shared by the in-process tests (start-up costs seconds); the SIGKILL
and two-node tests run ``bdgrid run`` in subprocesses with their own Ray.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import shutil

import pytest

import results
from grid.run import execute_plan, loopback_ip
from grid.spec import parse_spec
from grid.validate import validate

BIN = Path(sys.executable).parent

SPEC = """\
name: g
datasets:
  - name: synthetic
    params: {{n_train: {n}, n_test: 200}}
archs: [tiny_cnn]
attacks: {attacks}
pratios: [0.1]
seeds: {seeds}
defenses:
{defenses}
recipe: fast
epochs: 1
retries: 1
resources:
  attack: {{cpus: 1}}
"""
NONE = "  - none\n"
FT = "  - name: ft\n    params: {epochs: 1}\n"


def spec(attacks="[badnets, blended]", seeds="[0]", defenses=NONE + FT, n=600) -> str:
    return SPEC.format(attacks=attacks, seeds=seeds, defenses=defenses, n=n)


def run(out: Path, text: str):
    shutil.copy(Path(__file__).parent / "grid_faults.py", out.parent)  # the spec's folder: found as a user's plugin is
    ls, probs = parse_spec(text, "spec.yaml", out.parent)
    assert not probs and not validate(ls, 0)
    return execute_plan(ls, out, show_progress=False)


def executed(out: Path) -> list[tuple[str, str]]:
    log = out / "executed.log"
    return [tuple(ln.split()[:2]) for ln in log.read_text().splitlines()] if log.exists() else []


def kinds(entries) -> Counter:
    return Counter(k for k, _ in entries)


def fault(mode: str, d: Path) -> str:
    return f"  - name: fault\n    params: {{mode: {mode}, dir: '{d}'}}\n"


def failed_defense(tmp_path, mode: str, expect: str, extra: str = ""):
    """One cell, defenses none + the test plugin ``fault`` in ``mode``: that stage alone fails,
    with ``expect`` in its error, and none's rows are still written. Returns (out, result, the
    defense stage)."""
    out = tmp_path / "out"
    res = run(out, spec(attacks="[badnets]", defenses=NONE + fault(mode, tmp_path / "marks")) + "imports: [grid_faults]\n"
              + extra)
    assert not res.ok
    (d,) = res.plan.of_kind("defense")
    assert list(res.failed) == [d.key] and expect in res.failed[d.key]
    assert len(results.load(out)) == 2  # the rest of the grid went on
    return out, res, d


def test_two_attacks_three_defenses_train_two_models_and_rerun_is_a_noop(ray_session, tmp_path):
    out = tmp_path / "out"
    defenses = NONE + "  - name: ft\n    params: {epochs: 1}\n    sweep: {lr: [0.01, 0.001]}\n"
    res = run(out, spec(defenses=defenses))
    assert res.ok, res.failed
    c = kinds(executed(out))
    assert c["attack"] == 2  # 2 attacks x 3 defenses: two backdoored models, not six
    assert c["defense"] == 4 and c["eval"] == 6 and c["data"] == 1
    df = results.load(out)
    assert len(df) == 12 and not df.duplicated(["key", "split"]).any()
    assert sorted(df["defense"].unique()) == ["ft(lr=0.001)", "ft(lr=0.01)", "none"]
    assert set(df["split"]) == {"test", "val"}
    per = df.groupby(["attack", "defense", "split"]).size()
    assert (per == 1).all() and len(per) == 12
    none = df[df.defense == "none"]
    assert (none["acc"] == none["bd_acc"]).all() and (none["der"] == 0.5).all()
    assert (df["spec_hash"] == res.plan.spec_hash).all() and (df["grid"] == "g").all()
    curves = results.load(out, table="curves")
    assert "attack" in set(curves["phase"]) and len(curves["key"].unique()) == 6  # training curves of all evals
    state = __import__("json").loads((out / "state.json").read_text())
    assert state["finished"] and state["counts"]["attack"]["done"] == 2

    # rows say what they are, as columns
    row = df[(df.defense == "ft(lr=0.01)") & (df.split == "test")].iloc[0]
    assert (row["defense_name"], row["recipe"], row["epochs"], row["defender_ratio"], row["val_ratio"]) == (
        "ft", "fast", 1, 0.05, 0.2)
    assert __import__("json").loads(row["dataset_params"])["n_train"] == 600 and row["torch_version"]
    assert row["wall_s"] > 0 and (none["wall_s"] == 0).all()  # each its own stage's time: none has no defense
    assert row["weights_changed"] > 0 and none["weights_changed"].isna().all()  # fine-tuning moved the weights
    # the purified model of a row, exported as a plain state_dict
    from typer.testing import CliRunner

    import torch

    from defense.models import create_model
    from grid.cli import app

    r = CliRunner().invoke(app, ["export-model", str(tmp_path / "ft.pt"), "--out", str(out), "--key",
                                 row["defense_key"]])
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "ft.pt", weights_only=True)
    model = create_model("tiny_cnn", num_classes=10, in_channels=3, image_size=32)
    model.load_state_dict(state)  # every tensor of the architecture, nothing else
    from grid.store import ArtifactStore

    stored = ArtifactStore(out / "artifacts").get("defense", row["defense_key"])["state"]
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    assert row["model_key"] != row["defense_key"]

    before = len(executed(out))
    again = run(out, spec(defenses=defenses))
    assert again.ok and not again.done  # resume: everything was done, nothing ran
    assert len(executed(out)) == before
    assert len(results.load(out)) == 12


def test_truncated_artifact_is_detected_and_recomputed(ray_session, tmp_path):
    out = tmp_path / "out"
    res = run(out, spec(attacks="[badnets]", defenses=NONE))
    assert res.ok
    (attack,) = res.plan.of_kind("attack")
    art = next((out / "artifacts" / "attack").rglob(f"{attack.key}.bdg"))
    art.write_bytes(art.read_bytes()[:1000])  # a partial write / truncated copy
    # a new defense needs the backdoored model again: the corrupt file must not be used
    res2 = run(out, spec(attacks="[badnets]", defenses=NONE + FT))
    assert res2.ok, res2.failed
    assert res2.recomputed_corrupt == [attack.key]
    assert kinds(executed(out))["attack"] == 2 and attack.key in res2.done
    assert res2.plan.stages[attack.key].key == attack.key
    from grid.store import ArtifactStore

    assert ArtifactStore(out / "artifacts").verify("attack", attack.key)
    assert len(results.load(out)) == 4


def test_dead_worker_is_retried_and_grid_completes(ray_session, tmp_path):
    out = tmp_path / "out"
    res = run(out, spec(attacks="[badnets]", defenses=NONE + fault("die_once", tmp_path / "marks"))
              + "imports: [grid_faults]\n")
    assert (tmp_path / "marks" / "died").exists()  # the first defense worker did die
    assert res.ok, res.failed
    assert kinds(executed(out))["defense"] == 1  # the retry ran it to the end once
    assert len(results.load(out)) == 4


def test_worker_that_always_dies_is_tried_one_plus_system_retries_times(ray_session, tmp_path):
    """Ray re-runs a dead worker's task SYSTEM_RETRIES times, apart from the spec's retries (which
    count exceptions); the driver must not retry it again on top."""
    from grid.run import SYSTEM_RETRIES

    failed_defense(tmp_path, "die_always", "WorkerCrashedError")
    assert len((tmp_path / "marks" / "kills").read_text().split()) == 1 + SYSTEM_RETRIES  # not (1 + 3) * (1 + 1)


@pytest.mark.slow
def test_stage_over_its_timeout_is_cancelled_and_failed(ray_session, tmp_path):
    """Its own clock: the backdoored model is trained first without a timeout, so under the
    timeout only the data load (well under a second) and the hanging stage run, and the
    timeout (30 s) is far above any real stage's time however loaded the machine is."""
    out = tmp_path / "out"
    assert run(out, spec(attacks="[badnets]", defenses=NONE)).ok
    t0 = time.time()
    out, res, d = failed_defense(tmp_path, "hang", "timed out after 30s", "timeout: 30\n")
    assert time.time() - t0 < 600  # not the hour the stage would block
    assert "attempts: 2" in (out / "failures" / f"defense-{d.key}.txt").read_text()  # 1 try + retries: 1
    assert set(res.failed) == {d.key}  # no other stage timed out


def test_progress_tells_queued_from_running(ray_session, tmp_path):
    """4 attack stages of 1 CPU on 2 CPUs: the state never shows more than 2 running; the ones
    waiting for a CPU are shown queued."""
    import json
    import threading

    out = tmp_path / "out"
    seen, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                seen.append(json.loads((out / "state.json").read_text())["counts"].get("attack", {}))
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)

    th = threading.Thread(target=poll)
    th.start()
    try:
        res = run(out, spec(seeds="[0, 1]", defenses=NONE, n=1200))
    finally:
        stop.set()
        th.join()
    assert res.ok
    assert seen and max(c.get("running", 0) for c in seen) <= 2, seen
    assert max(c.get("queued", 0) for c in seen) >= 1, seen
    final = json.loads((out / "state.json").read_text())["counts"]["attack"]
    assert final["done"] == 4 and final["queued"] == 0 and final["running"] == 0


def test_failing_stage_is_marked_failed_rest_goes_on_and_rerun_retries(ray_session, tmp_path):
    out, res, d = failed_defense(tmp_path, "fail", "injected failure")
    tb = (out / "failures" / f"defense-{d.key}.txt").read_text()
    assert "Traceback" in tb and "injected failure" in tb and "attempts: 2" in tb  # 1 try + retries: 1
    assert "\x1b[" not in tb  # plain text, no terminal colour codes
    log = (out / "logs" / f"defense-{d.key}.log").read_text()  # what it said before failing is kept
    assert "about to fail" in log
    assert len(res.skipped) == 1  # its eval
    df = results.load(out)
    assert list(df["defense"].unique()) == ["none"] and len(df) == 2  # the rest of the grid went on
    (tmp_path / "marks").mkdir(exist_ok=True)
    (tmp_path / "marks" / "fixed").touch()  # the user fixed the cause; the same spec again
    res2 = run(out, spec(attacks="[badnets]", defenses=NONE + fault("fail", tmp_path / "marks")) + "imports: [grid_faults]\n")
    assert res2.ok and d.key in res2.done
    assert kinds(executed(out))["attack"] == 1  # the backdoored model was not retrained
    assert not (out / "failures" / f"defense-{d.key}.txt").exists()
    assert len(results.load(out)) == 4


# ----------------------------------------------------------------------------- subprocess tests

def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session we started (the driver and the Ray it started)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) == sid:
                os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow
def test_resume_after_sigkill(ray_session, tmp_path):
    out = tmp_path / "out"
    text = spec(seeds="[0, 1]", defenses=NONE + FT).replace("epochs: 1", "epochs: 2")
    (tmp_path / "spec.yaml").write_text(text)
    p = subprocess.Popen([str(BIN / "bdgrid"), "run", str(tmp_path / "spec.yaml"), "--out", str(out), "-q"],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and kinds(executed(out))["attack"] < 1:
            time.sleep(0.3)
    finally:
        _kill_session(p.pid)
        p.wait()
    first = executed(out)
    assert kinds(first)["attack"] >= 1, first
    assert kinds(first)["eval"] < 8  # killed mid-run, not after it finished
    res = run(out, text)
    assert res.ok, res.failed
    second = executed(out)[len(first):]
    stored = {(k, key) for k, key in first if k != "data"}
    redone = stored & set(second)
    assert not redone, f"finished stages recomputed: {redone}"
    assert kinds(first)["attack"] + kinds(second)["attack"] == 4  # each backdoored model trained once
    df = results.load(out)
    assert len(df) == 4 * 2 * 2  # one row per (cell, defense, split): 4 cells x {none, ft} x {test, val}
    assert not df.duplicated(["attack", "seed", "defense", "split"]).any()


LOOP = loopback_ip()  # every process of the simulated cluster talks over loopback only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_cluster(tmp_path):
    """A head and a second node on this machine (`ray start`), then `bdgrid run --address`."""
    import tempfile

    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # one auth mode for every process of the cluster
    # a short temp dir: Ray's unix sockets live under it and their paths must stay < 108 chars
    ray_tmp = tempfile.mkdtemp(prefix="bdr", dir="/tmp")
    common = ["--block", "--disable-usage-stats", f"--temp-dir={ray_tmp}"]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--node-ip-address={LOOP}", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", *common],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection((LOOP, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        worker = subprocess.Popen([str(BIN / "ray"), "start", f"--address={LOOP}:{port}",
                                   f"--node-ip-address={LOOP}", "--num-cpus=1", *common],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        (tmp_path / "spec.yaml").write_text(spec(seeds="[0, 1]", defenses=NONE))
        out = tmp_path / "out"
        # wait for both nodes, then run the grid against the cluster
        r = None
        for _ in range(60):
            probe = subprocess.run([str(BIN / "python"), "-c",
                                    f"import ray; ray.init(address='{LOOP}:{port}', _node_ip_address='{LOOP}', "
                                    f"log_to_driver=False); "
                                    f"print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"],
                                   env=env, capture_output=True, text=True, timeout=60)
            alive = probe.stdout.strip().splitlines()[-1].split() if probe.stdout.strip() else []
            if len(alive) == 2:
                break
            time.sleep(1)
        assert alive == [LOOP, LOOP], probe.stdout + probe.stderr  # two nodes, both on loopback
        # both nodes on this machine see one folder: --shared-fs, which bdgrid checks from each node
        r = subprocess.run([str(BIN / "bdgrid"), "run", str(tmp_path / "spec.yaml"), "--out", str(out), "-q",
                            "--address", f"{LOOP}:{port}", "--shared-fs"], env=env, capture_output=True, text=True,
                           timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "| BadNets" in r.stdout or "badnets" in r.stdout.lower()
        df = results.load(out)
        assert len(df) == 2 * 2 * 2  # 4 cells x none x 2 splits
        nodes = {ln.split()[4] for ln in (out / "executed.log").read_text().splitlines()}
        assert len(nodes) == 2, nodes  # stages ran on both nodes
    finally:
        for p in procs:  # SIGKILL the sessions we started (their processes only; never `ray stop`)
            _kill_session(p.pid)
            p.wait()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_dead_address_fails_fast(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app

    (tmp_path / "spec.yaml").write_text(spec(attacks="[badnets]", defenses=NONE))
    t0 = time.time()
    r = CliRunner().invoke(app, ["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "o"),
                                 "--address", f"127.0.0.1:{_free_port()}"])
    assert r.exit_code == 2 and "cannot reach a Ray cluster" in r.output
    assert time.time() - t0 < 30
