"""A grid whose run folder fills up mid-run (a real small tmpfs in a private mount namespace), then
a rerun after space is freed (issue 17): one clear message and exit 1, no traceback, no temporary
file left, every finished stage kept, and the rerun completes with the rows a run on a roomy disk
gives, to the last bit.

Sizes, measured with this spec (``bdgrid run`` into a plain folder): the backdoored model's
artifact is about 0.97 MB, FT's purified model 0.42 MB, each result/curve file 12-17 KB. A 1.2 MB
tmpfs holds the attack and the `none` eval but not FT's model, so the disk fills in the middle
of the grid, in a worker, while Ray runs it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import results

ROOT = Path(__file__).resolve().parents[1]
SPEC = """\
name: g
datasets:
  - name: synthetic
    params: {n_train: 400, n_test: 200}
archs: [tiny_cnn]
attacks: [badnets]
pratios: [0.1]
seeds: [0]
defenses: [none, ft]
recipe: fast
epochs: 1
retries: 1
"""
METRICS = ["acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra"]


def _bdgrid(*args: str) -> str:
    return f"{sys.executable} -m grid.cli " + " ".join(args)


def _rows(out: Path):
    df = results.load(out)
    return df.sort_values(["defense", "split"]).reset_index(drop=True)[["defense", "split"] + METRICS]


@pytest.mark.slow
def test_full_disk_mid_grid_then_rerun_after_freeing_space_gives_the_exact_rows(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("no unshare here: cannot make a private tmpfs")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount here: {probe.stderr.strip()}")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = tmp_path / "ref"
    r = subprocess.run(_bdgrid("run", str(spec), "--out", str(ref), "-q"), shell=True, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = mnt / "run"
    # One namespace for both runs so the tmpfs lives across them; each step's output is fenced by
    # a marker line so the test can read them apart.
    script = " ; ".join([
        f"mount -t tmpfs -o size=1200k tmpfs {mnt}",
        "echo '=== first'", _bdgrid("run", str(spec), "--out", str(out), "-q") + " 2>&1", "echo \"=== rc $?\"",
        f"echo \"=== tmp $(find {mnt} -name '*.tmp' | wc -l)\"",
        f"cp -r {out} {tmp_path}/after_full",  # what the full disk held, for the checks below
        f"mount -o remount,size=8m {mnt}",
        "echo '=== second'", _bdgrid("run", str(spec), "--out", str(out), "-q") + " 2>&1", "echo \"=== rc $?\"",
        f"cp -r {out} {tmp_path}/after_rerun",
    ])
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=900)
    text = r.stdout
    first, second = text.split("=== second")
    first_out, rc1 = first.split("=== rc ")
    assert rc1.split()[0] == "1", text  # the run says it did not finish
    assert "Traceback" not in first_out, first_out
    assert "disk is full" in first_out or "No space left" in first_out, first_out
    assert first.split("=== tmp ")[1].split()[0] == "0", "a temporary file was left on the full disk"
    # what finished before the disk filled is kept: the backdoored model and the `none` evaluation
    full = tmp_path / "after_full"
    assert list((full / "artifacts" / "attack").rglob("*.bdg"))
    assert set(results.load(full)["defense"]) == {"none"}

    second_out, rc2 = second.split("=== rc ")
    assert rc2.split()[0] == "0", second_out
    kinds = [ln.split()[0] for ln in (tmp_path / "after_rerun" / "executed.log").read_text().splitlines()]
    assert kinds.count("attack") == 1  # the backdoored model kept on the full disk was reused
    got, want = _rows(tmp_path / "after_rerun"), _rows(ref)
    assert got.shape == want.shape and set(got["defense"]) == {"none", "ft"}
    for c in METRICS:
        assert got[c].tolist() == want[c].tolist(), c  # the exact numbers of a run on a roomy disk
