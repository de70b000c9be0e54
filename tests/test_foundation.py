"""Registries, models, metrics and the one-trial CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from defense.metrics import der
from defense.models import MODELS, count_params, create_model
from defense.registry import BadParams, UnknownName, build_params


def test_preact_resnet18_matches_backdoorbench_parameter_count():
    # BackdoorBench's PreAct-ResNet18 for 10 classes has 11,171,146 parameters (11.17M)
    assert count_params(create_model("preact_resnet18", num_classes=10)) == 11_171_146


@pytest.mark.parametrize("name", ["preact_resnet18", "vgg19_bn", "vit", "tiny_cnn"])
@pytest.mark.parametrize("classes,size", [(10, 32), (43, 32)])
def test_models_give_logits_for_each_class(name, classes, size):
    m = create_model(name, num_classes=classes, image_size=size).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_tiny_imagenet_size_models():
    for name in ["preact_resnet18", "vgg19_bn", "vit"]:
        m = create_model(name, num_classes=200, image_size=64).eval()
        with torch.no_grad():
            assert m(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_unknown_model_suggests_the_close_name():
    with pytest.raises(UnknownName) as e:
        MODELS.get("preact_resnet")
    assert "did you mean 'preact_resnet18'" in str(e.value)
    assert "tiny_cnn" in str(e.value)


@dataclass
class _P:
    lr: float = 0.1
    epochs: int = 3
    name: str = "x"

    def check(self):
        if self.lr <= 0:
            yield "lr must be > 0"


def test_params_are_coerced_and_every_problem_reported():
    p = build_params(_P, {"lr": "0.5", "epochs": 4.0})
    assert p.lr == 0.5 and p.epochs == 4
    with pytest.raises(BadParams) as e:
        build_params(_P, {"lrr": 1, "epochs": "many", "name": 3})
    msgs = e.value.problems
    assert len(msgs) == 3
    assert any("did you mean 'lr'" in m for m in msgs)
    assert any("epochs" in m and "integer" in m for m in msgs)
    with pytest.raises(BadParams, match="lr must be > 0"):
        build_params(_P, {"lr": -1})


def test_der_matches_backdoorbench_badnets_ft_row():
    # BackdoorBench CIFAR-10 PreAct-ResNet18 BadNets 10%: no defense 91.32/95.03, FT 89.96/1.48
    assert der(0.9132, 0.9503, 0.8996, 0.0148) == pytest.approx(0.96095, abs=1e-5)


def test_der_edge_cases():
    assert der(0.9, 0.9, 0.9, 0.9) == pytest.approx(0.5)  # nothing changed
    assert der(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)  # perfect defense
    assert der(0.9, 0.5, 0.95, 0.8) == pytest.approx(0.5)  # gains are not rewarded, only losses punished
    assert der(0.9, 1.0, 0.0, 1.0) == pytest.approx(0.05)


def test_trial_cli_json_reports_fractions_reproducibly():
    """Two processes, same seed: the same numbers (the initial weights come from the seed too)."""
    cmd = [sys.executable, "-m", "grid.cli", "trial", "--attack", "badnets", "--defense", "none",
           "--data-param", "n_train=1200", "--data-param", "n_test=300", "--epochs", "2",
           "--device", "cpu", "--json"]
    runs = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = runs[0]
    for k in ("acc", "asr", "ra", "bd_acc", "bd_asr"):
        assert 0.0 <= res[k] <= 1.0
        assert runs[1][k] == res[k], (k, runs)
    assert res["n_poison"] == 120  # 10% of 1200


def test_trial_cli_rejects_bad_names_without_traceback():
    cmd = [sys.executable, "-m", "grid.cli", "trial", "--attack", "badnet", "--arch", "resnet", "--pratio", "1.5",
           "--device", "gpu0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "did you mean 'badnets'" in out.stderr
    assert "unknown model 'resnet'" in out.stderr
    assert "pratio must be in (0, 1)" in out.stderr
    assert "'gpu0' is not a torch device" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_gpu_device_without_a_gpu_is_a_clear_problem():
    import torch

    from defense.train import device_problem

    assert device_problem("auto") is None and device_problem("cpu") is None
    if torch.cuda.is_available():
        assert device_problem(f"cuda:{torch.cuda.device_count()}") is not None  # one past the last GPU
    else:
        assert "no usable GPU" in device_problem("cuda")


def test_trial_cli_says_which_n_tsbd_auto_chose():
    """TSBD's default n: auto chooses n on held-out clean data; a trial says which and how."""
    from defense.methods.tsbd import TSBDParams

    cmd = [sys.executable, "-m", "grid.cli", "trial", "--attack", "badnets", "--defense", "tsbd",
           "--data-param", "n_train=1200", "--data-param", "n_test=300", "--epochs", "2",
           "-p", "ft_epochs=1", "-p", "max_un_epochs=3", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    m = re.search(r"n: auto chose n=([0-9.]+) \(knee_soft, on (\d+) held-out clean images; tried ([0-9., ]+)\)",
                  out.stdout)
    assert m, out.stdout
    assert float(m[1]) in TSBDParams().auto_ladder and m[1] in m[3].split(", ")
    assert int(m[2]) == 12  # 20% of the 60-image defender set (5% of 1,200)
