"""``bdgrid report`` opened in a real browser: headless Chromium renders every table and figure of
the page, takes a screenshot of real size, and the page asks nothing of the network.

Chromium comes from the distribution (``.ci/run`` installs ``chromium-headless-shell``); without
it the test is skipped locally and fails in CI, so a missing browser is never silent there.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import results
from grid.cli import app

BASE = dict(dataset="synthetic", arch="tiny_cnn", pratio=0.1, target=0)
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for b in BROWSERS:
        if shutil.which(b):
            return shutil.which(b)
    if os.environ.get("CI"):
        pytest.fail("no headless Chromium in CI: .ci/run installs chromium-headless-shell")
    pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell; .ci/run installs it)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as a grid leaves it: rows of two attacks x (none, ft, a TSBD sweep) x two seeds
    with diagnostics, curves, a warning, a failed stage and the spec."""
    import json

    d = tmp_path_factory.mktemp("run")
    i = 0
    for a in ("badnets", "blended"):
        for s in (0, 1):
            for split in ("test", "val"):
                i += 1
                common = dict(BASE, attack=a, seed=s, split=split, bd_acc=0.93, bd_asr=0.98, bd_ra=0.01, recipe="fast")
                results.write_stage(d, "eval", f"n{i}", [dict(common, defense="none", defense_name="none", acc=0.93,
                                                              asr=0.98, ra=0.01, der=0.5)])
                results.write_stage(d, "eval", f"f{i}", [dict(common, defense="ft", defense_name="ft", acc=0.90,
                                                              asr=0.4, ra=0.5, der=0.78)])
                for n in (0.1, 0.3):
                    diag = {"unlearn_epochs": 12, "unlearn_reached_threshold": True, "neurons_zeroed": int(100 * n)}
                    results.write_stage(d, "eval", f"t{i}-{n}", [dict(
                        common, defense=f"tsbd(n={n})", defense_name="tsbd", params={"n": n}, acc=0.92 - 0.05 * n,
                        asr=0.3 - n * 0.8, ra=0.8, der=0.9, diagnostics=diag)])
            hist = [dict(phase=ph, epoch=e, loss=1.0 / e, acc=1 - 1.0 / (e + 1)) for ph, n_ep in
                    (("attack", 5), ("unlearn", 4), ("finetune", 6)) for e in range(1, n_ep + 1)]
            results.write_stage(d, "eval", f"c{a}{s}", [dict(BASE, attack=a, defense="tsbd(n=0.1)", seed=s, **h)
                                                       for h in hist], table="curves")
    (d / "warnings.log").write_text("defense[synthetic tiny_cnn badnets tsbd]: tsbd: unlearning never reached ...\n")
    (d / "executed.log").write_text("attack k1 1 12.5 n\nattack k2 1 13.0 n\ndefense k3 1 4.0 n\neval k4 1 0.5 n\n")
    (d / "spec.source.yaml").write_text("name: report-test\n")
    failure = {"stage": "defense[synthetic tiny_cnn blended anp]", "error": "RuntimeError: boom",
               "file": str(d / "failures" / "defense-x.txt"), "info": {"attack": "blended", "defense": "anp"}}
    (d / "state.json").write_text(json.dumps({"grid": "g", "cells": 4, "finished": True, "elapsed_s": 42.0,
                                              "counts": {"eval": {"total": 20, "done": 19, "failed": 1}},
                                              "failures": [failure]}))
    return d


def test_report_is_self_contained_and_says_everything(run_dir):
    r = CliRunner().invoke(app, ["report", "--out", str(run_dir)])
    assert r.exit_code == 0, r.output
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing to fetch
    assert "default-src 'none'" in page  # and the page may not fetch anything even if it tried
    for needle in ("Paper table", "TSBD", "BadNets", "failed", "defense-x.txt", "unlearning never reached",
                   "unlearn_epochs", "neurons_zeroed", "Time per stage kind", "name: report-test", "± "):
        assert needle in page, needle
    assert page.count("data:image/png;base64,") == 3  # acc-asr, tsbd-n, curves


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    exe = browser()
    page = run_dir / "report.html"
    if not page.exists():
        CliRunner().invoke(app, ["report", "--out", str(run_dir)])
    # a script that reports what rendered; inserted in a copy so the report itself stays script-free
    probe = tmp_path / "probe.html"
    check = ("<script>document.title=JSON.stringify({tables:document.querySelectorAll('table').length,"
             "imgs:[...document.images].map(i=>i.naturalWidth),rows:document.querySelectorAll('tbody tr').length})"
             "</script>")
    probe.write_text(page.read_text().replace("default-src 'none'; img-src data:; style-src 'unsafe-inline'",
                                              "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                              "script-src 'unsafe-inline'").replace("</body>", check + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]
    dom = subprocess.run([exe, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import json

    title = re.search(r"<title>(.*?)</title>", dom.stdout, re.S).group(1)
    got = json.loads(title.replace("&quot;", '"'))
    assert got["tables"] >= 4 and got["rows"] >= 6, got  # paper table, RA table, diagnostics, times
    assert len(got["imgs"]) == 3 and all(w > 300 for w in got["imgs"]), got  # every figure decoded
    shot = tmp_path / "report.png"
    r = subprocess.run([exe, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from PIL import Image

    im = Image.open(shot)
    assert im.size == (1200, 2400)
    assert len(im.convert("L").resize((120, 240)).getcolors(maxcolors=256 * 256)) > 20  # not a blank page
    Path(os.environ.get("BDGRID_REPORT_SHOT", tmp_path / "keep.png")).write_bytes(shot.read_bytes())
