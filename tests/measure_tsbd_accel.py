"""Measurement behind TSBD_ACCEL_TOL in tests/test_speed_paths.py: TSBD on the suite's backdoored
fixture (conftest.py, 2 threads), plain fp32 path vs its GPU path on the CPU (bf16 autocast,
``DefenseContext(accel_on_cpu=True)``), per defender seed. Not a test (pytest does not collect it).

    PYTHONPATH=. python tests/measure_tsbd_accel.py badnets 0,1,2 0.3 [ft_epochs]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest  # noqa: E402,F401  (2 torch threads, as the suite)
from conftest import backdoored_model  # noqa: E402
from defense.data.splits import defender_subset  # noqa: E402
from defense.methods import DefenseContext  # noqa: E402
from defense.methods.tsbd import TSBDParams, defend  # noqa: E402
from defense.metrics import attack_metrics  # noqa: E402


def main(attack: str, seeds: str, n: str, ft: str = "20") -> None:
    d = backdoored_model(attack)
    bd, _, bd_true = d["poisoned"].backdoor_test()
    print("before", attack_metrics(d["model"], d["test"], bd, bd_true, d["cfg"].target), flush=True)
    for s in (int(x) for x in seeds.split(",")):
        clean, _ = defender_subset(d["train"], 0.125, s)
        for on in (False, True):
            p = TSBDParams(un_threshold=0.2, n=float(n), bf16=True, ft_epochs=int(ft))
            c0, w0 = time.process_time(), time.perf_counter()
            out = defend(d["model"], clean, p, DefenseContext(device="cpu", seed=s, accel_on_cpu=on))
            m = attack_metrics(out.model, d["test"], bd, bd_true, d["cfg"].target)
            print(f"{attack} seed {s} accel {on}: acc {m['acc']:.4f} asr {m['asr']:.4f} "
                  f"unlearn_epochs {out.diagnostics['unlearn_epochs']} zeroed {out.diagnostics['weights_zeroed']} "
                  f"cpu {time.process_time() - c0:.1f}s wall {time.perf_counter() - w0:.1f}s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
