"""A grid whose results (``--out s3://``) and artifacts live in S3, on local Ray and on a two-node
Ray cluster whose worker node cannot see the driver's disk and is killed mid-run.

The S3 is a local moto server (``moto[server]``, the ``test`` extra) on a free loopback port;
credentials and endpoint reach bdgrid only through the standard AWS variables, as a user's
would. The cluster is a head and a worker started with ``ray start`` on loopback, each with its
own temp dir; the worker runs in its own mount namespace (``unshare -m -r``) with a tmpfs over
this test's folder, so the driver's run folder and any local artifact path are invisible to it.
Where the kernel refuses unprivileged namespaces the cluster test is skipped with that reason.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from grid.run import loopback_ip

BIN = Path(sys.executable).parent
LOOP = loopback_ip()
ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
name: s3grid
datasets:
  - name: synthetic
    params: {n_train: 1000, n_test: 200}
archs: [tiny_cnn]
attacks: [badnets, blended]
pratios: [0.1]
seeds: [0]
defenses:
  - none
  - name: ft
    params: {epochs: 1}
recipe: fast
epochs: 1
retries: 0
resources:
  attack: {cpus: 1}
  defense: {cpus: 1}
  eval: {cpus: 1}
"""
N_STORED = 2 + 2  # artifacts: 2 attacks (backdoored models) + 2 ft defenses; none stores nothing


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket ``bdg``: {"env": the AWS variables, "endpoint": host:port}."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing-secret-value")
    client.create_bucket(Bucket="bdg")
    yield {"env": env, "client": client, "endpoint": f"127.0.0.1:{port}"}
    server.stop()


def keys_under(client, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket="bdg", Prefix=prefix, **kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def bdgrid(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "grid.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def base_env(s3, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # the repository first, as the workers of a cluster would import it
    return {**env, **s3["env"], "BDGRID_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def rows_of(folder: Path):
    import results

    df = results.load(folder)
    cols = ["key", "split", "attack", "defense", "acc", "asr", "ra", "der", "bd_acc", "bd_asr"]
    return df[cols].sort_values(["key", "split"]).reset_index(drop=True)


def mirror_path(uri: str, cache: Path) -> Path:
    """Where a driver with BDGRID_CACHE=cache mirrors ``uri`` (``grid.remote_out``)."""
    from unittest import mock

    from grid.remote_out import mirror_dir

    with mock.patch.dict(os.environ, {"BDGRID_CACHE": str(cache)}):
        return mirror_dir(uri)


def plan_of(spec_file: Path):
    from grid.plan import build_plan
    from grid.spec import load_spec

    ls, probs = load_spec(str(spec_file))
    assert not probs
    return build_plan(ls)


def test_mirror_follows_writes_and_deletions_both_ways(s3, tmp_path):
    """Two machines (two caches) on one s3:// out: what one pushes the other pulls, deletions
    included (a compaction or a set-aside removes files); temporaries and locks stay local."""
    from unittest import mock

    from grid.remote_out import RemoteOut

    uri = "s3://bdg/mirror"
    with mock.patch.dict(os.environ, {**s3["env"], "BDGRID_CACHE": str(tmp_path / "a")}):
        a = RemoteOut(uri)
        a.pull()
    with mock.patch.dict(os.environ, {**s3["env"], "BDGRID_CACHE": str(tmp_path / "b")}):
        b = RemoteOut(uri)
    with mock.patch.dict(os.environ, s3["env"]):
        (a.local / "results").mkdir()
        (a.local / "results" / "eval-1.parquet").write_bytes(b"one")
        (a.local / "results" / ".eval-2.parquet.123.tmp").write_bytes(b"half")
        (a.local / "artifacts").mkdir()
        (a.local / "artifacts" / "x.bdg").write_bytes(b"store")  # the artifact store is never mirrored
        assert a.push() == 1 and a.push() == 0
        assert keys_under(s3["client"], "mirror/") == ["mirror/results/eval-1.parquet"]
        b.pull()
        assert (b.local / "results" / "eval-1.parquet").read_bytes() == b"one"
        (a.local / "results" / "eval-1.parquet").unlink()
        (a.local / "results" / "all.parquet").write_bytes(b"compacted")
        assert a.push() == 2
        b.pull()
        assert sorted(p.name for p in (b.local / "results").iterdir()) == ["all.parquet"]
        # b's driver wrote a file and died before pushing: a pull keeps it (the next run pushes it)
        (b.local / "state.json").write_text("b's newer state")
        (a.local / "state.json").write_text("a")
        a.push()
        (b.local / "state.json").write_text("b's newest state")
        b.pull()
        assert (b.local / "state.json").read_text() == "a"  # both changed: the remote's wins
        (b.local / "state.json").write_text("unpushed")
        b.pull()
        assert (b.local / "state.json").read_text() == "unpushed"  # only this side changed: kept
        b.push()
        a.pull()
        assert (a.local / "state.json").read_text() == "unpushed"


def test_remote_store_answers_exists_from_one_listing(s3, caplog):
    """A resume or dry run asks `exists` for every stage: on S3 one listing per stage kind answers
    them all (no HEAD per stage); what this process writes or deletes is seen at once."""
    import logging
    from unittest import mock

    from grid.store import ArtifactStore

    with mock.patch.dict(os.environ, s3["env"]):
        writer = ArtifactStore("s3://bdg/store")
        keys = [f"{i:02x}" * 32 for i in range(5)]
        for k in keys[:3]:
            writer.put("attack", k, {"w": k})
        reader = ArtifactStore("s3://bdg/store")
        caplog.set_level(logging.INFO, logger="werkzeug")
        caplog.clear()
        got = [reader.exists("attack", k) for k in keys * 20]
        requests = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
        assert got == [True, True, True, False, False] * 20
        assert len(requests) == 1 and "list-type=2" in requests[0], requests  # 100 questions, one listing
        reader.delete("attack", keys[0])
        reader.put("attack", keys[4], {"w": 4})
        assert not reader.exists("attack", keys[0]) and reader.exists("attack", keys[4])
        assert reader.get("attack", keys[4]) == {"w": 4}


@pytest.fixture(scope="module")
def local_s3_run(s3, tmp_path_factory):
    """`bdgrid run SPEC --out s3://bdg/local` on a local Ray: the reference rows of the grid."""
    d = tmp_path_factory.mktemp("s3local")
    (d / "spec.yaml").write_text(SPEC)
    uri = "s3://bdg/local"  # the endpoint comes from AWS_ENDPOINT_URL, as a user's would
    env = base_env(s3, d / "cache")
    r = bdgrid(["run", str(d / "spec.yaml"), "--out", uri, "-q", "--num-cpus", "2"], env)
    return {"dir": d, "uri": uri, "env": env, "run": r}


@pytest.mark.slow
def test_run_and_table_with_s3_out_and_artifacts(s3, local_s3_run):
    """Measured: 60-90 s on the 2-core machine (Ray start, 4 trainings of 1 epoch on 400 images)."""
    r, env, uri, d = local_s3_run["run"], local_s3_run["env"], local_s3_run["uri"], local_s3_run["dir"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "testing-secret-value" not in r.stdout + r.stderr  # a secret is never printed
    keys = keys_under(s3["client"], "local/")
    plan = plan_of(d / "spec.yaml")
    stored = {s.key for s in plan.stages.values() if s.kind in ("attack", "defense", "prepare", "resource")}
    in_s3 = {Path(k).stem for k in keys if k.startswith("local/artifacts/") and k.endswith(".bdg")}
    assert len(stored) == N_STORED and stored <= in_s3, (stored, in_s3)  # artifacts default beside the results
    assert any(k.startswith("local/results/") for k in keys) and "local/state.json" in keys
    assert "local/executed.log" in keys and "local/spec.yaml" in keys
    assert not any(Path(k).name.startswith(".") for k in keys)  # no temporaries, no lock

    # another machine (an empty cache): table, status and a rerun read everything from S3
    env2 = {**env, "BDGRID_CACHE": str(d / "cache2")}
    t = bdgrid(["table", "--out", uri], env2, timeout=300)
    assert t.returncode == 0, t.stderr
    assert "BadNets" in t.stdout and "Blended" in t.stdout and "|" in t.stdout
    st = bdgrid(["status", "--out", uri], env2, timeout=300)
    assert st.returncode == 0 and "finished" in st.stdout, st.stdout + st.stderr
    v = bdgrid(["verify", "--out", uri], env2, timeout=300)  # every artifact read back from S3 and checked
    assert v.returncode == 0 and "all intact" in v.stdout and f"checked {N_STORED} artifact(s)" in v.stdout, v.stdout
    p = bdgrid(["plot", "--out", uri, "--kind", "acc-asr"], env2, timeout=300)
    assert p.returncode == 0, p.stderr
    assert any(k.startswith("local/figures/") and k.endswith(".png") for k in keys_under(s3["client"], "local/"))
    again = bdgrid(["run", str(d / "spec.yaml"), "--out", uri, "-q", "--num-cpus", "2"], env2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " 0 run," in again.stdout and "0 failed" in again.stdout, again.stdout  # resumed from S3: nothing recomputed
    # every stage in the driver's executed.log, once (this one run computed them all)
    mirror = mirror_path(uri, d / "cache2")
    assert not (mirror / "artifacts").exists()  # the artifact store is read in place, never mirrored
    logged = [tuple(ln.split()[:2]) for ln in (mirror / "executed.log").read_text().splitlines()]
    assert sorted(k for _, k in logged) == sorted(plan.stages), logged


@pytest.mark.slow  # 30-35 s: five CLI subprocesses, each importing torch
def test_s3_out_refusals_before_any_compute(s3, tmp_path):
    """What cannot use an s3:// --out says so, without a traceback and before Ray starts."""
    (tmp_path / "spec.yaml").write_text(SPEC)
    env = base_env(s3, tmp_path / "cache")
    r = bdgrid(["run", str(tmp_path / "spec.yaml"), "--out", "s3://nobucket/x"], env, timeout=300)
    said = " ".join(r.stderr.split())  # rich wraps lines at the terminal's width
    assert r.returncode == 2 and "cannot write to s3://nobucket/x" in said and "Traceback" not in said, r.stderr
    r = bdgrid(["run", str(tmp_path / "spec.yaml"), "--out", "s3://bdg"], env, timeout=300)
    assert r.returncode == 2 and "prefix inside the bucket" in " ".join(r.stderr.split()), r.stderr
    r = bdgrid(["table", "--out", "s3://nobucket/x"], env, timeout=300)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in said and "no run at s3://nobucket/x" in said, r.stderr
    tune = "tune:\n  defense: ft\n  space:\n    lr: {type: float, low: 0.001, high: 0.1, log: true}\n  n_trials: 2\n  tune_on: [{attack: badnets}]\n"
    (tmp_path / "tune.yaml").write_text(SPEC + tune)
    r = bdgrid(["tune", str(tmp_path / "tune.yaml"), "--out", "s3://bdg/t"], env, timeout=300)
    assert r.returncode == 2 and "needs a local" in " ".join(r.stderr.split()), r.stderr
    assert not any(p.name.startswith("s3:") for p in ROOT.iterdir())  # no local folder named after the URI


# ----------------------------------------------------------------------------- two nodes


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session this test started (never `ray stop`: other Rays may run)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _unshare_ok(where: Path) -> str:
    """'' when an unprivileged mount namespace with a tmpfs over ``where`` works here, else why not."""
    try:
        r = subprocess.run(["unshare", "-m", "-r", "sh", "-c", f"mount -t tmpfs bdg {where} && echo ok"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare cannot run: {e}"
    return "" if r.stdout.strip() == "ok" else f"unshare -m -r + tmpfs not permitted: {r.stderr.strip()[:200]}"


def _alive_nodes(address: str, env: dict) -> list[str]:
    code = (f"import ray; ray.init(address='{address}', _node_ip_address='{LOOP}', log_to_driver=False); "
            f"print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))")
    try:
        p = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return []
    return p.stdout.strip().splitlines()[-1].split() if p.stdout.strip() else []


def _wait_for(cond, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_s3_worker_killed_mid_run(s3, local_s3_run, tmp_path):
    why = _unshare_ok(tmp_path)
    if why:
        print(f"SKIP: {why}")
        pytest.skip(why)
    (tmp_path / "spec.yaml").write_text(SPEC)
    env = {**base_env(s3, tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}  # one auth mode for every process
    node_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # the nodes get no credentials
    port = _free_port(LOOP)
    address = f"{LOOP}:{port}"
    tmp_head = tempfile.mkdtemp(prefix="bdh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    tmp_work = tempfile.mkdtemp(prefix="bdw", dir="/tmp")
    common = ["--block", "--disable-usage-stats", "--num-cpus=1"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--node-ip-address={LOOP}", f"--port={port}",
             "--include-dashboard=false", f"--temp-dir={tmp_head}", *common],
            env=node_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: _connectable(LOOP, port), 90, "the Ray head")
        head_ids = _wait_for(lambda: _alive_nodes(address, env), 90, "the head node")
        # the worker: its own mount namespace, this test's folder (the driver's run folder, its
        # mirror, any local artifact path) hidden under an empty tmpfs
        ray_cmd = " ".join([str(BIN / "ray"), "start", f"--address={address}", f"--node-ip-address={LOOP}",
                            f"--temp-dir={tmp_work}", *common])
        worker = subprocess.Popen(["unshare", "-m", "-r", "sh", "-c",
                                   f"mount -t tmpfs private {tmp_path} && exec {ray_cmd}"],
                                  env=node_env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        procs.append(worker)
        nodes = _wait_for(lambda: (lambda ids: ids if len(ids) == 2 else None)(_alive_nodes(address, env)), 120,
                          "two alive nodes")
        (worker_id,) = set(nodes) - set(head_ids)

        # a local artifact path on two nodes: refused, and --shared-fs proves the worker cannot see it
        art = tmp_path / "art"
        r = bdgrid(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "o1"), "--artifacts", str(art),
                    "--address", address, "-q"], env, timeout=300)
        said = " ".join(r.stderr.split())  # rich wraps lines at the terminal's width
        assert r.returncode == 2 and "the Ray cluster has 2 nodes" in said and "--shared-fs" in said, r.stderr
        r = bdgrid(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "o1"), "--artifacts", str(art),
                    "--address", address, "--shared-fs", "-q"], env, timeout=300)
        said = " ".join(r.stderr.split())
        assert r.returncode == 2 and worker_id[:12] in said and "cannot read it" in said, r.stderr
        assert head_ids[0][:12] not in said  # the head sees its own folder
        assert not (tmp_path / "o1" / "executed.log").exists()  # refused before any compute

        # the grid on both nodes, results and artifacts in S3; the worker node dies mid-run
        uri = "s3://bdg/cluster"
        mirror = mirror_path(uri, tmp_path / "cache")
        driver = subprocess.Popen([str(BIN / "python"), "-m", "grid.cli", "run", str(tmp_path / "spec.yaml"),
                                   "--out", uri, "--address", address, "-q"], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(driver)

        def worker_busy():  # a Ray worker process of the worker node is executing a stage
            if driver.poll() is not None:
                o, e = driver.communicate()
                raise AssertionError(f"the driver ended before the worker was killed:\n{o[-3000:]}\n{e[-3000:]}")
            # Ray titles a busy worker process ray::<task name>, and bdgrid names a task by its stage
            # label, e.g. ray::attack[synthetic tiny_cnn badnets p=0.1 s=0] (the node's agents are
            # ray::DashboardAgent, ray::RuntimeEnvAgent; an idle worker ray::IDLE)
            return [t for t in _titles(worker.pid) if re.match(r"ray::(data|attack|defense|eval)\[", t)]

        busy = _wait_for(worker_busy, 400, "a stage running on the worker node", step=0.2)
        print(f"killing the worker node while it runs {busy}")
        _kill_session(worker.pid)
        worker.wait(timeout=60)
        stdout, stderr = driver.communicate(timeout=600)
        print(f"driver stderr after the worker node was killed:\n{stderr[-2000:]}")  # shown with -s
        assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "raylet" not in stderr and "Traceback" not in stderr, stderr[-3000:]  # -q: no Ray crash dump
        assert "testing-secret-value" not in stdout + stderr

        # exactly the rows of the local run, every artifact in S3, every stage in the driver's log
        got = rows_of(mirror)
        ref = rows_of(mirror_path(local_s3_run["uri"], local_s3_run["dir"] / "cache"))
        assert len(got) == 2 * 2 * 2  # 2 cells x {none, ft} x {test, val}
        assert got.equals(ref), (got.compare(ref) if got.shape == ref.shape else (got, ref))
        plan = plan_of(tmp_path / "spec.yaml")
        stored = {s.key for s in plan.stages.values() if s.kind in ("attack", "defense", "prepare", "resource")}
        in_s3 = {Path(k).stem for k in keys_under(s3["client"], "cluster/artifacts/") if k.endswith(".bdg")}
        assert stored <= in_s3, stored - in_s3
        logged = {ln.split()[1] for ln in (mirror / "executed.log").read_text().splitlines()}
        assert logged == set(plan.stages), set(plan.stages) - logged
        nodes_seen = {ln.split()[4] for ln in (mirror / "executed.log").read_text().splitlines()}
        assert head_ids[0][:12] in nodes_seen

        t = bdgrid(["table", "--out", uri], {**env, "BDGRID_CACHE": str(tmp_path / "cache3")}, timeout=300)
        assert t.returncode == 0 and "BadNets" in t.stdout, t.stderr
    finally:
        for p in procs:
            _kill_session(p.pid)
            p.wait()
        import shutil

        for d in (tmp_head, tmp_work):
            shutil.rmtree(d, ignore_errors=True)


def _titles(sid: int) -> list[str]:
    """The process titles (Ray sets ``ray::<task>`` on a busy worker) of a session's processes."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getsid(int(pid)) == sid:
                    out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return out


def _connectable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
