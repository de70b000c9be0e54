"""The fast recipe and the GPU code paths, checked on the CPU.

- The ``fast`` recipe implants the backdoor (ASR >= 0.9 on synthetic) at a useful ACC.
- Its CUDA-only options (bf16 autocast, channels_last, torch.compile, cuDNN autotuning) are
  exact no-ops on the CPU: the same weights come out, bit for bit, as with them switched off.
- ``pick_device("auto")`` picks the CPU when torch sees no GPU; the batch order follows the
  generator's device.
- The benchmark scripts run end to end at toy scale (so ``bench/gpu_check.sh`` does not rot).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from defense.metrics import attack_metrics
from defense.models import create_model
from defense.train import get_recipe, index_batches, pick_device, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fixture", ["badnets_model", "blended_model"])
def test_fast_recipe_implants_backdoor(fixture, request):
    d = request.getfixturevalue(fixture)
    assert d["cfg"].recipe == "fast"
    bd, _, bd_true = d["poisoned"].backdoor_test()
    m = attack_metrics(d["model"], d["test"], bd, bd_true, d["cfg"].target)
    assert m["asr"] >= 0.9, m
    assert m["acc"] >= 0.8, m  # the backdoor does not come at the cost of the clean task


def _tiny_run(recipe, data, seed=0, epochs=2):
    torch.manual_seed(seed)
    model = create_model("tiny_cnn")
    hist = train(model, data, recipe, seed=seed, device="cpu", epochs=epochs)
    return model, hist


def test_cuda_only_options_are_exact_noops_on_cpu(small_data, monkeypatch):
    train_set, _ = small_data
    data = train_set.subset(torch.arange(600))

    def no_compile(*a, **k):  # compiling on the CPU would be slow and pointless: it must not happen
        raise AssertionError("torch.compile called on CPU")

    monkeypatch.setattr(torch, "compile", no_compile)
    flag = torch.backends.cudnn.benchmark
    on = get_recipe("fast", batch_size=128, compile=True, bf16=True, channels_last=True, cudnn_benchmark=True)
    off = replace(on, compile=False, bf16=False, channels_last=False, cudnn_benchmark=False)
    m_on, h_on = _tiny_run(on, data)
    m_off, h_off = _tiny_run(off, data)
    for (k, a), b in zip(m_on.state_dict().items(), m_off.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in h_on] == [h["loss"] for h in h_off]
    assert all(h["images"] == len(data) for h in h_on)  # no batch dropped: compile is off on CPU
    assert torch.backends.cudnn.benchmark == flag  # the global flag is left as found
    p = next(m_on.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    assert all(q.is_contiguous() for q in m_on.parameters())  # not left in channels_last
    assert not m_on.training
    # and the result is a working model: the loss fell and a different seed gives other weights
    assert h_on[-1]["loss"] < h_on[0]["loss"]
    m_seed1, _ = _tiny_run(on, data, seed=1)
    assert not torch.equal(next(m_seed1.parameters()), p)


def test_pick_device_auto():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == want
    assert pick_device(None).type == want
    assert pick_device("cpu") == torch.device("cpu")


def test_index_batches_follow_generator():
    gen = torch.Generator().manual_seed(3)
    parts = list(index_batches(10, 4, True, gen))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert all(p.device.type == "cpu" for p in parts)
    assert [len(p) for p in index_batches(10, 4, True, gen, drop_last=True)] == [4, 4]
    again = list(index_batches(10, 4, True, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def _bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_benchmarks_run_end_to_end_on_cpu(tmp_path):
    """train_speed -> (saved model) -> tsbd_speed (ours, reference, one baseline) -> project_grid,
    at toy scale: the chain gpu_check.sh runs at CIFAR scale."""
    import json

    ts, tb = tmp_path / "ts.json", tmp_path / "tb.json"
    sizes = ("--n-train", "600", "--n-test", "200", "--threads", "1")
    r = _bench("train_speed.py", *sizes, "--paper-epochs", "2", "--fast-epochs", "2",
               "--json", str(ts), "--save-model", str(tmp_path / "fast.pt"))
    assert r.returncode == 0, r.stderr
    assert "RATIO fast/paper images/s" in r.stdout and "FIDELITY" in r.stdout
    res = json.loads(ts.read_text())
    assert [x["label"] for x in res["runs"]] == ["paper", "fast"]
    assert all(x["img_per_s"] > 0 and x["cpu_s"] > 0 for x in res["runs"])
    ck = torch.load(tmp_path / "fast.pt", weights_only=True)
    assert ck["arch"] == "tiny_cnn" and "linear.weight" in ck["state_dict"]

    r = _bench("tsbd_speed.py", *sizes, "--model", str(tmp_path / "fast.pt"), "--ft-epochs", "0",
               "--max-un-epochs", "2", "--baselines", "ft", "--json", str(tb))
    assert r.returncode == 0, r.stderr
    res = json.loads(tb.read_text())
    for side in ("ours", "reference"):
        t = res["results"][side]["times"]
        assert 1 <= t["unlearn_epochs"] <= 2 and t["total"] > 0
        assert t["total"] >= t["unlearn"] + t["finetune"]
    assert res["baselines"]["ft"]["defend_s"] > 0
    assert "RATIO reference/ours" in r.stdout

    r = _bench("project_grid.py", str(ts), str(tb))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("PROJECTED H100-hours") == 2


def test_grid_packing_without_gpu_says_so_and_exits_0():
    if torch.cuda.is_available():  # there it is a real benchmark (minutes), not a unit test
        pytest.skip("a GPU is present: grid_packing.py would run the benchmark")
    r = _bench("grid_packing.py", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs a GPU" in r.stdout


def test_paper_recipe_trains_backdoorbench_epochs_per_dataset():
    """BackdoorBench config/attack/prototype/{cifar10,cifar100,gtsrb,tiny}.yaml: epochs 100, 100,
    50, 200 (MNIST has no prototype: CIFAR-10's 100). An explicit epochs override still wins,
    and other recipes and unknown datasets keep their own epochs."""
    from defense.train import PAPER_EPOCHS

    want = {"cifar10": 100, "cifar100": 100, "gtsrb": 50, "tiny-imagenet": 200, "mnist": 100}
    assert {d: get_recipe("paper", dataset=d).epochs for d in want} == want
    from defense.data import DATASETS

    assert set(PAPER_EPOCHS) <= set(DATASETS.names())  # the keys are real dataset names
    assert get_recipe("paper", dataset="gtsrb", epochs=7).epochs == 7
    assert get_recipe("paper", dataset="synthetic").epochs == get_recipe("paper").epochs == 100
    assert get_recipe("fast", dataset="gtsrb").epochs == get_recipe("fast").epochs == 15
    assert get_recipe("paper", dataset="gtsrb").lr == get_recipe("paper").lr  # only the epochs differ
