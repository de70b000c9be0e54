"""A dry run of a ~10k-stage grid with an ``s3://`` artifact root against a local one (issue 18's
goal: within 2x of local). The S3 is a local moto server (``moto[server]``, the test extra)
started here on a free port; each side is a ``bdgrid run --dry-run`` subprocess, the sides
alternating over ``--reps`` repetitions; wall time and the child's CPU time are printed per run
and as medians, with the s3/local ratio.

    python bench/s3_dry_run.py [--reps 3] [--seeds 125]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
name: big
datasets: [synthetic]
archs: [tiny_cnn]
attacks: [badnets, blended]
pratios: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]
seeds: {seeds}
defenses: [none, ft]
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=125, help="2 attacks x 10 rates x seeds cells, 4 stages each")
    a = ap.parse_args()
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true", "OMP_NUM_THREADS": "1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bdg")
    d = Path(tempfile.mkdtemp(prefix="s3dry"))
    (d / "spec.yaml").write_text(SPEC.format(seeds=list(range(a.seeds))))
    sides = {"local": str(d / "art"), "s3": "s3://bdg/art"}
    got: dict = {k: [] for k in sides}
    for rep in range(a.reps):
        for side in (sides if rep % 2 == 0 else reversed(list(sides))):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "grid.cli", "run", str(d / "spec.yaml"), "--dry-run",
                                "--out", str(d / "out"), "--artifacts", sides[side]], env=env, capture_output=True,
                               text=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            assert r.returncode == 0, r.stderr
            got[side].append((wall, cpu))
            print(f"rep {rep} {side:5s}: wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    print(f"stages: {1 + 80 * a.seeds} (1 data + per cell 1 attack, 1 defense, 2 evals)")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in got.items()}
    for k, (w, c) in med.items():
        print(f"median {k:5s}: wall {w:.2f} s, cpu {c:.2f} s")
    print(f"s3/local: wall {med['s3'][0] / med['local'][0]:.2f}x, cpu {med['s3'][1] / med['local'][1]:.2f}x")
    server.stop()


if __name__ == "__main__":
    main()
