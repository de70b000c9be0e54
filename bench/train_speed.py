"""Training speed: the ``fast`` recipe against the ``paper`` recipe, side by side in one process.

Same architecture, same poisoned data (BadNets 10% by default), same seed. The two sides run
``--reps`` times (default 3) in alternating order (paper fast, fast paper, ...); every ratio is
taken within a repetition and printed as median, min and max, in wall time and in CPU time
(CPU time does not depend on other jobs on a shared machine). For each recipe:
images per second (all epochs, and steady state without the first epoch, which carries cuDNN
autotuning and compilation), training seconds, time to accuracy, final ACC / ASR / RA. Then the
ratios fast : paper and whether the fast model keeps the paper model's fidelity (|ACC gap| within
1.5 points and |ASR gap| within 2 points, two-sided: issue 9's criterion).

Time to accuracy: clean test ACC is measured after every epoch (not timed; evaluation is not
training) and the time is the training seconds summed up to the first epoch whose ACC reaches
the target. The default target is the paper run's final ACC minus 1.5 points, i.e. "how long until
a model is as good as the fidelity criterion asks".

    .venv/bin/python bench/train_speed.py            # CPU: tiny_cnn, synthetic 10,000/2,000
    .venv/bin/python bench/train_speed.py --gpu      # PreAct-ResNet18, synthetic 50,000/10,000

The paper recipe runs its full 100 epochs unless ``--paper-epochs`` shortens it (cosine
compressed); a shortened run is announced as SHORTENED in the header and on the FIDELITY line,
since ``fast`` could pass by matching a weakened baseline. ``gpu_check.sh`` shortens it to fit
its time budget; no 100-epoch time is projected from a shortened run. Ideas for the fast recipe: airbench
(github.com/KellerJordan/cifar10-airbench): GPU-resident uint8 data, batched crop/flip on the GPU,
no DataLoader, half precision, channels_last, short one-cycle-like schedules.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import alternating, fmt_s, fmt_spread, machine, poisoned_data, resolve_scale, spread, write_json

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
                    help="epochs of the paper recipe, cosine compressed to them (default: the full 100; "
                         "fewer is reported as a SHORTENED baseline)")
    ap.add_argument("--fast-epochs", type=int, default=None, help="default: the fast recipe's own")
    ap.add_argument("--compile", action="store_true", help="add a third side: fast + torch.compile (CUDA only)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each side, alternating order (>= 3)")
    ap.add_argument("--target-acc", type=float, default=None, help="ACC for time-to-accuracy (default paper - 0.015)")
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between ACC evaluations for the curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--save-model", default=None, help="save the fast model here (for bench/tsbd_speed.py --model)")
    a = ap.parse_args(argv)

    from defense.train import RECIPES, get_recipe

    device, arch, n_train, n_test = resolve_scale(a)
    full_epochs = RECIPES["paper"].epochs
    paper_epochs = a.paper_epochs or full_epochs

    print(f"# train_speed: {machine()}")
    print(f"# {arch}, synthetic {n_train}/{n_test}, {a.attack} {a.pratio:.0%}, seed {a.seed}, device {device}, "
          f"{a.reps} repetitions per side, alternating")
    if paper_epochs < full_epochs:
        print(f"# SHORTENED: paper recipe {paper_epochs} of its {full_epochs} epochs (cosine compressed): the fidelity "
              f"check is against a shortened baseline, not the paper protocol")
    train, test, poisoned = poisoned_data(a.attack, n_train, n_test, a.seed, a.pratio)
    bd, _, bd_true = poisoned.backdoor_test()

    recipes = {"paper": get_recipe("paper", epochs=paper_epochs), "fast": get_recipe("fast", epochs=a.fast_epochs)}
    if a.compile:
        recipes["fast+compile"] = get_recipe("fast", epochs=a.fast_epochs, compile=True)

    def side(label, rec):
        def run():
            r = run_recipe(label, rec, arch, poisoned, test, bd, bd_true, 0, rec.epochs, device, a.seed, a.eval_every)
            print(f"  {label:13s} done: {rec.epochs} ep, wall {fmt_s(r['train_s'])}, CPU {fmt_s(r['cpu_s'])}, "
                  f"acc {r['acc']:.4f} asr {r['asr']:.4f}", flush=True)
            return r
        return run

    reps = alternating({k: side(k, r) for k, r in recipes.items()}, a.reps)
    paper_runs = reps["paper"]
    target = a.target_acc if a.target_acc is not None else spread([r["acc"] for r in paper_runs])["median"] - 0.015
    for runs in reps.values():
        for r in runs:
            r["tta_s"] = time_to(r["curve"], target)
            r["tta_cpu_s"] = time_to(r["curve"], target, "cpu_s")
    res = [min(runs, key=lambda r, runs=runs: abs(r["train_s"] - spread([x["train_s"] for x in runs])["median"]))
           for runs in reps.values()]  # the median-time run of each side, for the table and project_grid

    print(f"\n{'run':13s} {'ep':>3s} {'batch':>5s} {'img/s':>8s} {'img/CPU-s':>9s} {'wall':>8s} {'CPU':>8s} "
          f"{'to ACC>=' + format(target, '.3f'):>14s} {'ACC':>6s} {'ASR':>6s} {'RA':>6s}   (median-time rep)")
    for r in res:
        print(f"{r['label']:13s} {r['epochs']:3d} {r['batch_size']:5d} {r['img_per_s_steady']:8.0f} "
              f"{r['img_per_cpu_s']:9.0f} {fmt_s(r['train_s']):>8s} {fmt_s(r['cpu_s']):>8s} {fmt_s(r['tta_s']):>14s} "
              f"{r['acc']:6.4f} {r['asr']:6.4f} {r['ra']:6.4f}")
    fast_runs = reps["fast"]
    pairs = list(zip(paper_runs, fast_runs))  # rep i of each side ran next to each other
    summary = {
        "reps": a.reps, "paper_epochs": paper_epochs, "paper_full_epochs": full_epochs,
        "paper_shortened": paper_epochs < full_epochs, "target_acc": target,
        "ratio_img_per_s": spread([f["img_per_s_steady"] / p["img_per_s_steady"] for p, f in pairs]),
        "ratio_img_per_cpu_s": spread([f["img_per_cpu_s"] / p["img_per_cpu_s"] for p, f in pairs]),
        "ratio_train_s": spread([p["train_s"] / f["train_s"] for p, f in pairs]),
        "ratio_cpu_s": spread([p["cpu_s"] / f["cpu_s"] for p, f in pairs]),
        "ratio_tta": spread([p["tta_s"] / f["tta_s"] if p["tta_s"] and f["tta_s"] else None for p, f in pairs]),
        "ratio_tta_cpu": spread([p["tta_cpu_s"] / f["tta_cpu_s"] if p["tta_cpu_s"] and f["tta_cpu_s"] else None
                                 for p, f in pairs]),
        "acc": {k: spread([r["acc"] for r in v]) for k, v in reps.items()},
        "asr": {k: spread([r["asr"] for r in v]) for k, v in reps.items()},
    }
    acc_gap = 100 * (summary["acc"]["fast"]["median"] - summary["acc"]["paper"]["median"])
    asr_gap = 100 * (summary["asr"]["fast"]["median"] - summary["asr"]["paper"]["median"])
    summary.update(acc_gap_points=acc_gap, asr_gap_points=asr_gap,
                   fidelity_ok=abs(acc_gap) <= 1.5 and abs(asr_gap) <= 2.0)
    ep = f"{paper_epochs} vs {fast_runs[0]['epochs']} epochs"
    print(f"\nRATIO fast/paper images/s (steady, wall): {fmt_spread(summary['ratio_img_per_s'])}")
    print(f"RATIO fast/paper images per CPU-second: {fmt_spread(summary['ratio_img_per_cpu_s'])}")
    print(f"RATIO paper/fast training time, wall ({ep}): {fmt_spread(summary['ratio_train_s'])}")
    print(f"RATIO paper/fast training time, CPU ({ep}): {fmt_spread(summary['ratio_cpu_s'])}")
    print(f"RATIO paper/fast time to ACC>={target:.3f}, wall: {fmt_spread(summary['ratio_tta'])}; "
          f"CPU: {fmt_spread(summary['ratio_tta_cpu'])}")
    short = (f" [paper SHORTENED to {paper_epochs}/{full_epochs} epochs: not the protocol's fidelity]"
             if summary["paper_shortened"] else "")
    print(f"FIDELITY fast vs paper (medians over {a.reps} reps): ACC gap {acc_gap:+.2f} pts (|gap| limit 1.5), "
          f"ASR gap {asr_gap:+.2f} pts (|gap| limit 2): {'OK' if summary['fidelity_ok'] else 'NOT MET'}{short}")
    if a.save_model:
        from pathlib import Path

        Path(a.save_model).parent.mkdir(parents=True, exist_ok=True)
        # Plain tensors and numbers only, so the reader can use torch.load(weights_only=True).
        torch.save({"state_dict": {k: v.cpu() for k, v in res[1]["model"].state_dict().items()}, "arch": arch,
                    "n_train": n_train, "n_test": n_test, "attack": a.attack, "pratio": a.pratio, "seed": a.seed},
                   a.save_model)
    strip = lambda r: {k: v for k, v in r.items() if k != "model"}  # noqa: E731
    out = {"machine": machine(), "arch": arch, "n_train": n_train, "n_test": n_test, "attack": a.attack,
           "runs": [strip(r) for r in res], "reps": {k: [strip(r) for r in v] for k, v in reps.items()},
           "summary": summary}
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
