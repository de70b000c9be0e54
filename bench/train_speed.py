"""Training speed: the ``fast`` recipe against the ``paper`` recipe, side by side in one run.

Same architecture, same poisoned data (BadNets 10% by default), same seed. For each recipe:
images per second (all epochs, and steady state without the first epoch, which carries cuDNN
autotuning and compilation), training seconds, time to accuracy, final ACC / ASR / RA. Then the
ratios fast : paper and whether the fast model keeps the paper model's fidelity (ACC within 1.5
points, ASR within 2 points: issue 9's criterion).

Time to accuracy: clean test ACC is measured after every epoch (not timed; evaluation is not
training) and the time is the training seconds summed up to the first epoch whose ACC reaches
the target. The default target is the paper run's final ACC minus 1.5 points, i.e. "how long until
a model is as good as the fidelity criterion asks".

    .venv/bin/python bench/train_speed.py            # CPU: tiny_cnn, synthetic 10,000/2,000
    .venv/bin/python bench/train_speed.py --gpu      # PreAct-ResNet18, synthetic 50,000/10,000

On a GPU the paper recipe runs ``--paper-epochs`` epochs with its cosine schedule compressed to
them (100 epochs would not fit the 8-minute check); its images/s is what the full protocol runs at,
and the 100-epoch wall time is projected from it. Ideas for the fast recipe: airbench
(github.com/KellerJordan/cifar10-airbench): GPU-resident uint8 data, batched crop/flip on the GPU,
no DataLoader, half precision, channels_last, short one-cycle-like schedules.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import fmt_s, machine, poisoned_data, resolve_scale, write_json

import torch


def run_recipe(label: str, recipe, arch: str, poisoned, test, bd, bd_true, target: int, epochs: int,
               device, seed: int, eval_every: int) -> dict:
    """Train one model with ``recipe``; return timings, the ACC curve and final metrics."""
    from defense.metrics import accuracy, attack_metrics
    from defense.models import create_model
    from defense.train import fit_batch, train

    recipe = fit_batch(recipe, len(poisoned.train))  # the batch and lr train() will actually use
    info = poisoned.train.info
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
    test_dev = test.to(device)
    count = {"n": 0, "eval_cpu": 0.0}

    def eval_fn(m):
        count["n"] += 1
        if count["n"] % eval_every and count["n"] != epochs:
            return {}
        c0 = time.process_time()
        acc = accuracy(m, test_dev)
        count["eval_cpu"] += time.process_time() - c0
        return {"test_acc": acc}

    cpu_at: dict = {}

    def show(row):  # one line per epoch on stderr, so a long CPU run shows it is alive
        cpu_at[row["epoch"]] = time.process_time() - c0 - count["eval_cpu"]
        acc = f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""
        print(f"    {label} epoch {row['epoch']}/{epochs}: {row['seconds']:.1f}s loss {row['loss']:.3f}{acc}",
              file=sys.stderr, flush=True)

    c0 = time.process_time()
    hist = train(model, poisoned.train, recipe, seed=seed, device=device, epochs=epochs, eval_fn=eval_fn,
                 progress=show)
    # CPU seconds of training (evaluation subtracted): on a shared CPU, images per CPU-second do not
    # depend on how many other jobs run, while wall-clock images/s do.
    cpu_s = time.process_time() - c0 - count["eval_cpu"]
    final = attack_metrics(model, test_dev, bd.to(device), bd_true.to(device), target)
    secs = [h["seconds"] for h in hist]
    imgs = [h["images"] for h in hist]
    cum, curve = 0.0, []
    for h in hist:
        cum += h["seconds"]
        if "test_acc" in h:
            curve.append({"epoch": h["epoch"], "s": round(cum, 3), "cpu_s": round(cpu_at[h["epoch"]], 3),
                          "acc": h["test_acc"]})
    steady = (sum(imgs[1:]) / sum(secs[1:])) if len(hist) > 1 else imgs[0] / secs[0]
    return {"label": label, "recipe": recipe.name, "epochs": epochs, "batch_size": recipe.batch_size,
            "lr": recipe.lr, "schedule": recipe.schedule, "bf16": recipe.bf16, "channels_last": recipe.channels_last,
            "compile": recipe.compile, "train_s": sum(secs), "first_epoch_s": secs[0],
            "img_per_s": sum(imgs) / sum(secs), "img_per_s_steady": steady, "curve": curve,
            "cpu_s": cpu_s, "img_per_cpu_s": sum(imgs) / cpu_s,
            "acc": final["acc"], "asr": final["asr"], "ra": final["ra"], "model": model}


def time_to(curve: list, target: float, key: str = "s") -> float | None:
    """Training seconds (``key="s"``: wall, ``"cpu_s"``: CPU) until the first evaluated epoch with
    ACC >= target (None if never)."""
    return next((c[key] for c in curve if c["acc"] >= target), None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CIFAR scale on the GPU: PreAct-ResNet18, 50,000/10,000")
    ap.add_argument("--arch", default=None, help="model (default tiny_cnn on CPU, preact_resnet18 with --gpu)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--pratio", type=float, default=0.1)
    ap.add_argument("--paper-epochs", type=int, default=None,
                    help="epochs of the paper recipe, cosine compressed to them (default 30 CPU, 8 GPU)")
    ap.add_argument("--fast-epochs", type=int, default=None, help="default: the fast recipe's own")
    ap.add_argument("--compile", action="store_true", help="add a third run: fast + torch.compile (CUDA only)")
    ap.add_argument("--target-acc", type=float, default=None, help="ACC for time-to-accuracy (default paper - 0.015)")
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between ACC evaluations for the curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--save-model", default=None, help="save the fast model here (for bench/tsbd_speed.py --model)")
    a = ap.parse_args(argv)

    from defense.train import get_recipe

    device, arch, n_train, n_test = resolve_scale(a)
    paper_epochs = a.paper_epochs or (8 if a.gpu else 30)

    print(f"# train_speed: {machine()}")
    print(f"# {arch}, synthetic {n_train}/{n_test}, {a.attack} {a.pratio:.0%}, seed {a.seed}, device {device}")
    train, test, poisoned = poisoned_data(a.attack, n_train, n_test, a.seed, a.pratio)
    bd, _, bd_true = poisoned.backdoor_test()

    runs = [("paper", get_recipe("paper", epochs=paper_epochs)), ("fast", get_recipe("fast", epochs=a.fast_epochs))]
    if a.compile:
        runs.append(("fast+compile", get_recipe("fast", epochs=a.fast_epochs, compile=True)))
    res = []
    for label, rec in runs:
        r = run_recipe(label, rec, arch, poisoned, test, bd, bd_true, 0, rec.epochs, device, a.seed, a.eval_every)
        print(f"  {label:13s} done: {rec.epochs} ep, {fmt_s(r['train_s'])}, acc {r['acc']:.4f} asr {r['asr']:.4f}",
              flush=True)
        res.append(r)
    paper, fast = res[0], res[1]
    target = a.target_acc if a.target_acc is not None else paper["acc"] - 0.015
    for r in res:
        r["tta_s"] = time_to(r["curve"], target)
        r["tta_cpu_s"] = time_to(r["curve"], target, "cpu_s")

    print(f"\n{'run':13s} {'ep':>3s} {'batch':>5s} {'img/s':>8s} {'steady':>8s} {'train':>8s} "
          f"{'to ACC>=' + format(target, '.3f'):>14s} {'ACC':>6s} {'ASR':>6s} {'RA':>6s}")
    for r in res:
        print(f"{r['label']:13s} {r['epochs']:3d} {r['batch_size']:5d} {r['img_per_s']:8.0f} "
              f"{r['img_per_s_steady']:8.0f} {fmt_s(r['train_s']):>8s} {fmt_s(r['tta_s']):>14s} "
              f"{r['acc']:6.4f} {r['asr']:6.4f} {r['ra']:6.4f}")
    summary = {
        "ratio_img_per_s": fast["img_per_s_steady"] / paper["img_per_s_steady"],
        "ratio_train_s": paper["train_s"] / fast["train_s"],
        "ratio_tta": (paper["tta_s"] / fast["tta_s"]) if paper["tta_s"] and fast["tta_s"] else None,
        "acc_gap_points": 100 * (paper["acc"] - fast["acc"]),
        "asr_gap_points": 100 * abs(paper["asr"] - fast["asr"]),
        "target_acc": target,
    }
    summary["ratio_img_per_cpu_s"] = fast["img_per_cpu_s"] / paper["img_per_cpu_s"]
    summary["ratio_cpu_s"] = paper["cpu_s"] / fast["cpu_s"]
    summary["fidelity_ok"] = summary["acc_gap_points"] <= 1.5 and summary["asr_gap_points"] <= 2.0
    print(f"\nRATIO fast/paper images/s (steady): {summary['ratio_img_per_s']:.2f}x")
    print(f"RATIO paper/fast training time ({paper_epochs} vs {fast['epochs']} epochs): {summary['ratio_train_s']:.2f}x")
    if device.type == "cpu":
        print(f"RATIO (CPU time, load-independent) fast/paper images per CPU-second: "
              f"{summary['ratio_img_per_cpu_s']:.2f}x; paper/fast training CPU time: {summary['ratio_cpu_s']:.2f}x")
        if paper["tta_cpu_s"] and fast["tta_cpu_s"]:
            summary["ratio_tta_cpu"] = paper["tta_cpu_s"] / fast["tta_cpu_s"]
            print(f"RATIO (CPU time) paper/fast time to ACC>={target:.3f}: {summary['ratio_tta_cpu']:.2f}x "
                  f"({paper['tta_cpu_s']:.0f} vs {fast['tta_cpu_s']:.0f} CPU-s)")
    if summary["ratio_tta"] is not None:
        print(f"RATIO paper/fast time to ACC>={target:.3f}: {summary['ratio_tta']:.2f}x")
    else:
        print(f"time to ACC>={target:.3f}: not reached by {'fast' if not fast['tta_s'] else 'paper'}")
    print(f"FIDELITY fast vs paper: ACC {100 * fast['acc']:.2f} vs {100 * paper['acc']:.2f} "
          f"(gap {summary['acc_gap_points']:+.2f} pts, limit 1.5), ASR {100 * fast['asr']:.2f} vs "
          f"{100 * paper['asr']:.2f} (|gap| {summary['asr_gap_points']:.2f} pts, limit 2): "
          f"{'OK' if summary['fidelity_ok'] else 'NOT MET'}")
    per_epoch = paper["train_s"] / paper["epochs"]
    full = 100 * per_epoch
    summary["paper_100ep_s_projected"] = full
    print(f"PROJECTED paper protocol, 100 epochs at the measured {fmt_s(per_epoch)}/epoch: {fmt_s(full)} "
          f"vs fast {fmt_s(fast['train_s'])} -> {full / fast['train_s']:.1f}x")
    if a.save_model:
        from pathlib import Path

        Path(a.save_model).parent.mkdir(parents=True, exist_ok=True)
        # Plain tensors and numbers only, so the reader can use torch.load(weights_only=True).
        torch.save({"state_dict": {k: v.cpu() for k, v in fast["model"].state_dict().items()}, "arch": arch,
                    "n_train": n_train, "n_test": n_test, "attack": a.attack, "pratio": a.pratio, "seed": a.seed},
                   a.save_model)
    out = {"machine": machine(), "arch": arch, "n_train": n_train, "n_test": n_test, "attack": a.attack,
           "runs": [{k: v for k, v in r.items() if k != "model"} for r in res], "summary": summary}
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
