"""TSBD wall time: ours (``defense/methods/tsbd.py``) against a literal transcription of the
reference procedure, on the same backdoored model and the same defender data, stage by stage.

The reference is the authors' ``tsbd.py`` (GitHub linweiii/TSBD, BackdoorBench plug-in, config
``tsbd/config.yaml``). ``reference_tsbd`` below transcribes what it does, step for step, in our
own code:

- Stage 1a: gradient ascent epochs over Dc (batch 256, no shuffle, train augmentation), the
  per-batch ``loss.item()`` and the per-batch gradient record of ``record_layer``; after EVERY
  epoch three full evaluations (Dc with the training transform, the clean test set, the backdoor
  test set), then the stop check on the Dc accuracy.
- Stage 1b: per-neuron lists of weight changes built with ``.tolist()``, the ranking written as
  text and read back, sorted in Python.
- Stage 1c: the pooled weight changes of the selected neurons merged into one Python list and
  sorted, index lists per neuron, a state_dict round trip; then a full test evaluation.
- Stage 2: ``ft_epoch + 1`` passes; per batch a ``copy.deepcopy`` of the model for g1 and g2, the
  mixed gradient set on the real model, a step, one more forward with ``loss.item()``; a full
  test evaluation at passes 0, 10, 20.
- Training passes in fp32 (the config's ``amp: True`` only reaches its test routine).

Not transcribed: its DataLoader + PIL per-image transforms (both sides read the same GPU-resident
tensors here), so the measured ratio is a lower bound on the real one.

Both sides run ``--reps`` times (default 3) in alternating order; each stage is timed in wall
and CPU seconds, the ratios are taken within a repetition and printed as median, min and max.
The 11-ratio sweep ratio is PROJECTED from the measured stages (labelled so), not run.

Ours: Stage 1a evaluates only the stop check (on Dc), Stage 2 perturbs in place (no copy), no
per-epoch test evaluation, bf16 autocast on CUDA; the test sets are evaluated once at the end.

    .venv/bin/python bench/tsbd_speed.py                     # CPU: tiny_cnn, synthetic 10,000/2,000
    .venv/bin/python bench/tsbd_speed.py --gpu --model m.pt  # PreAct-ResNet18 from train_speed --save-model
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from _common import Timer, alternating, fmt_s, fmt_spread, machine, poisoned_data, resolve_scale, spread, write_json

import torch
import torch.nn.functional as F

REF_RATIOS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)  # the reference's sweep
STAGES = ("unlearn", "nwc", "zero_reinit", "finetune", "final_eval", "total")


# ------------------------------------------------------------------ the reference, transcribed

@torch.no_grad()
def _ref_test(model, data, p, gen, train_aug: bool) -> float:
    """The reference's ``test``: eval mode, per-batch ``loss.item()``, accuracy / len(dataset)."""
    from defense.train import index_batches, make_batch

    model.eval()
    correct, tot = 0, 0.0
    for idx in index_batches(len(data), p.batch_size, False, None):
        x, y = make_batch(data, idx, gen, train_aug)
        out = model(x)
        tot += F.cross_entropy(out, y).item()
        correct += int((out.argmax(1) == y).sum())
    return correct / len(data)


def _ref_eval_all(model, clean, test, bd, p, gen) -> tuple[float, float, float]:
    return (_ref_test(model, clean, p, gen, True), _ref_test(model, test, p, gen, False),
            _ref_test(model, bd, p, gen, False))


def reference_tsbd(model0, clean, test, bd, p, n: float, device, seed: int, record_layer: str | None,
                   workdir: Path, times: dict) -> torch.nn.Module:
    """The reference procedure for one neuron ratio ``n``; stage wall times go into ``times``."""
    from defense.methods.tsbd import scored_layers
    from defense.train import index_batches, make_batch, seed_everything

    gen = seed_everything(seed)
    clean, test, bd = clean.to(device), test.to(device), bd.to(device)
    model0 = model0.to(device)
    layers = [f"{name}.weight" for name in scored_layers(model0, p.layer_type)]
    if record_layer is None:
        record_layer = layers[-1]

    def batches():
        for idx in index_batches(len(clean), p.batch_size, False, None):
            yield make_batch(clean, idx, gen, True)

    with Timer(device) as t:  # ---- Stage 1a: unlearning, three evaluations per epoch
        model = copy.deepcopy(model0)
        params_o = {k: v for k, v in model0.named_parameters() if k in layers}
        _ref_eval_all(model, clean, test, bd, p, gen)  # "Test loaded model"
        opt = torch.optim.SGD(model.parameters(), lr=p.lr_un, momentum=0.9)
        rec = dict(model.named_parameters())[record_layer]
        epochs = 0
        for _ in range(p.max_un_epochs):
            model.train()
            grad_norm = []
            for x, y in batches():
                opt.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss.item()
                (-loss).backward()
                grad_norm.append(rec.grad.view(rec.shape[0], -1).abs().sum(dim=-1))
                opt.step()
            g = torch.stack(grad_norm).float()
            g.mean(0).tolist()  # written to CSV by the reference, with the variance over batches
            if len(g) > 1:
                g.var(0).tolist()
            epochs += 1
            val_acc, _, _ = _ref_eval_all(model, clean, test, bd, p, gen)
            if val_acc <= p.threshold(clean.info.num_classes):
                break
    times["unlearn"], times["unlearn_cpu"] = t.s, t.cpu
    times["unlearn_epochs"] = epochs

    with Timer(device) as t:  # ---- Stage 1b: NWC through Python lists and a text file
        lines, n2w, count = [], {}, 0
        params_u = dict(model.named_parameters())
        for name in layers:
            ch = (params_u[name] - params_o[name]).view(params_o[name].shape[0], -1).abs()
            per_neuron = ch.sum(dim=-1)
            for j in range(per_neuron.size(0)):
                n2w[f"{name}.{j}"] = ch[j].tolist()
                lines.append(f"{count} \t {name} \t {j} \t {per_neuron[j].item():.4f} \n")
                count += 1
        f = workdir / "nwc.txt"
        f.write_text("No \t Layer_Name \t Neuron_Idx \t Score \n" + "".join(lines))
        torch.save(model.state_dict(), workdir / "unlearned_model.pt")
        rows = [ln.split() for ln in f.read_text().splitlines()[1:]]
        ranked = sorted(((r[1], int(r[2]), float(r[3])) for r in rows), key=lambda r: r[2], reverse=True)
    times["nwc"], times["nwc_cpu"] = t.s, t.cpu

    with Timer(device) as t:  # ---- Stage 1c: zero reinit with Python lists, then a test evaluation
        net = copy.deepcopy(model0)
        sd = net.state_dict()
        top = ranked[: int(len(ranked) * n)]
        merged = []
        for name, j, _ in top:
            merged += n2w[f"{name}.{j}"]
        chosen = sorted(merged, reverse=True)[: int(len(merged) * p.m)]
        if chosen:
            tau = min(chosen)
            for name, j, _ in top:
                hit = [i for i, v in enumerate(n2w[f"{name}.{j}"]) if v >= tau]
                sd[name][j].view(-1)[hit] = 0.0
        net.load_state_dict(sd)
        _ref_eval_all(net, clean, test, bd, p, gen)
    times["zero_reinit"], times["zero_reinit_cpu"] = t.s, t.cpu

    with Timer(device) as t:  # ---- Stage 2: deep copy per batch, test evaluation every 10 passes
        opt = torch.optim.SGD(net.parameters(), lr=p.ft_lr, momentum=0.9)
        for epoch in range(p.ft_epochs + 1):
            net.train()
            for x, y in batches():
                tmp = copy.deepcopy(net)
                loss1 = F.cross_entropy(tmp(x), y)
                tmp.zero_grad()
                loss1.backward()
                g1 = [q.grad.detach().clone() for q in tmp.parameters()]
                with torch.no_grad():
                    for q, g in zip(tmp.parameters(), g1):
                        q += p.r * (g / g.norm())
                loss2 = F.cross_entropy(tmp(x), y)
                tmp.zero_grad()
                loss2.backward()
                g2 = [q.grad.detach().clone() for q in tmp.parameters()]
                opt.zero_grad()
                for q, a, b in zip(net.parameters(), g1, g2):
                    q.grad = (1 - p.alpha) * a + p.alpha * b
                opt.step()
                F.cross_entropy(net(x), y).item()
            if epoch % 10 == 0:
                _, _, _ = _ref_eval_all(net, clean, test, bd, p, gen)
    times["finetune"], times["finetune_cpu"] = t.s, t.cpu
    net.eval()
    return net


# ------------------------------------------------------------------ ours, stage by stage

def ours_tsbd(model0, clean, p, n: float, device, seed: int, times: dict) -> torch.nn.Module:
    from dataclasses import replace

    from defense.methods import DefenseContext
    from defense.methods.tsbd import activeness_finetune, clean_unlearn, neuron_weight_change, zero_reinit

    ctx = DefenseContext(device=device, seed=seed)
    clean = clean.to(device)
    model0 = model0.to(device)
    with Timer(device) as t:
        unlearned, curve = clean_unlearn(model0, clean, p, ctx)
    times["unlearn"], times["unlearn_cpu"], times["unlearn_epochs"] = t.s, t.cpu, len(curve)
    with Timer(device) as t:
        nwc = neuron_weight_change(model0, unlearned, p.layer_type, p.nwc_decimals)
    times["nwc"], times["nwc_cpu"] = t.s, t.cpu
    with Timer(device) as t:
        net, _ = zero_reinit(model0, nwc, n, p.m)
    times["zero_reinit"], times["zero_reinit_cpu"] = t.s, t.cpu
    with Timer(device) as t:
        activeness_finetune(net, clean, replace(p, n=n), ctx)
    times["finetune"], times["finetune_cpu"] = t.s, t.cpu
    return net


# ------------------------------------------------------------------ driver

def load_or_train(a, poisoned, device):
    from defense.models import create_model
    from defense.train import get_recipe, train

    info = poisoned.train.info
    torch.manual_seed(a.seed)
    model = create_model(a.arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
    if a.model:
        ck = torch.load(a.model, weights_only=True, map_location="cpu")
        if ck.get("arch") != a.arch:
            raise SystemExit(f"{a.model} holds a {ck.get('arch')}, not a {a.arch}")
        model.load_state_dict(ck["state_dict"])
        return model, 0.0
    with Timer(device) as t:
        train(model, poisoned.train, get_recipe("fast", epochs=a.train_epochs), seed=a.seed, device=device)
    return model, t.s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="CIFAR scale on the GPU: PreAct-ResNet18, 50,000/10,000")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--model", default=None, help="backdoored checkpoint from train_speed.py --save-model "
                                                   "(same attack/sizes/seed); trained with the fast recipe if absent")
    ap.add_argument("--train-epochs", type=int, default=None, help="fast-recipe epochs when training here")
    ap.add_argument("--n", type=float, default=None, help="neuron ratio (default: TSBDParams.n)")
    ap.add_argument("--ft-epochs", type=int, default=None, help="Stage 2 passes - 1 (default: the reference's 20)")
    ap.add_argument("--max-un-epochs", type=int, default=None, help="cap on unlearning epochs (default 1000)")
    ap.add_argument("--sides", default="ours,reference", help="which to run, comma-separated ('' for none)")
    ap.add_argument("--baselines", default="", help="also time these defenses (default params) on the same model, "
                                                     "e.g. anp,clp,fp,ft,ftsam,ibau,nad,rnp")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each side, alternating order (>= 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from dataclasses import replace

    from defense.data.splits import defender_subset
    from defense.methods.tsbd import TSBDParams
    from defense.metrics import attack_metrics

    device, a.arch, n_train, n_test = resolve_scale(a)
    p = TSBDParams(n=0.1)  # one fixed-n run on all of Dc (n: auto is timed by bench/tsbd_auto_table.py)
    over = {k: v for k, v in (("ft_epochs", a.ft_epochs), ("max_un_epochs", a.max_un_epochs)) if v is not None}
    p = replace(p, **over)
    n = a.n if a.n is not None else p.n

    print(f"# tsbd_speed: {machine()}")
    train_set, test, poisoned = poisoned_data(a.attack, n_train, n_test, a.seed)
    bd, _, bd_true = poisoned.backdoor_test()
    model0, train_s = load_or_train(a, poisoned, device)
    model0 = model0.to(device).eval()
    clean, _ = defender_subset(train_set, 0.05, a.seed)
    print(f"# {a.arch}, synthetic {n_train}/{n_test}, {a.attack} 10%, Dc {len(clean)} images, n={n}, m={p.m}, "
          f"{p.ft_epochs + 1} fine-tuning passes, device {device}"
          + (f"; backdoored model trained here in {fmt_s(train_s)}" if train_s else ""))
    before = attack_metrics(model0, test.to(device), bd.to(device), bd_true.to(device), 0)
    def side(name):
        def run():
            times: dict = {}
            if name == "ours":
                net = ours_tsbd(model0, clean, p, n, device, a.seed, times)
            else:
                with tempfile.TemporaryDirectory() as d:
                    net = reference_tsbd(model0, clean, test, bd, p, n, device, a.seed, None, Path(d), times)
            with Timer(device) as t:  # the one final evaluation both sides need for a result row
                after = attack_metrics(net, test.to(device), bd.to(device), bd_true.to(device), 0)
            times["final_eval"], times["final_eval_cpu"] = t.s, t.cpu
            times["total"] = sum(times[k] for k in STAGES[:-1])
            times["total_cpu"] = sum(times[f"{k}_cpu"] for k in STAGES[:-1])
            print(f"  {name:9s} done: wall {fmt_s(times['total'])}, CPU {fmt_s(times['total_cpu'])}, "
                  f"acc {after['acc']:.4f} asr {after['asr']:.4f}", flush=True)
            return {"times": times, **after}
        return run

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    for s_ in sides:
        if s_ not in ("ours", "reference"):
            raise SystemExit(f"unknown side {s_!r}; valid: ours, reference")
    reps = alternating({s_: side(s_) for s_ in sides}, a.reps) if sides else {}
    # per side, the repetition with the median total wall time stands for it in the table and JSON
    res = {k: sorted(v, key=lambda r: r["times"]["total"])[len(v) // 2] for k, v in reps.items()}

    base = {}
    for name in [b.strip() for b in a.baselines.split(",") if b.strip()]:
        from defense.methods import DefenseContext, run_defense

        with Timer(device) as t:
            out = run_defense(name, copy.deepcopy(model0), clean.to(device), {},
                              DefenseContext(device=device, seed=a.seed))
        with Timer(device) as te:
            after = attack_metrics(out.model, test.to(device), bd.to(device), bd_true.to(device), 0)
        base[name] = {"defend_s": t.s, "defend_cpu_s": t.cpu, "final_eval": te.s, **after}
        print(f"  {name:9s} done: {fmt_s(t.s)}, acc {after['acc']:.4f} asr {after['asr']:.4f}", flush=True)
        if not res:  # a time limit (gpu_check.sh) may stop the run: keep what was measured so far
            write_json(a.json, {"machine": machine(), "arch": a.arch, "n_train": n_train, "n_test": n_test,
                                "n_clean": len(clean), "before": before, "results": {}, "baselines": base,
                                "summary": {}, "partial": True})
    if base:
        print(f"\n{'baseline':10s} {'defend':>8s} {'eval':>7s} {'ACC':>6s} {'ASR':>6s}")
        for name, b in base.items():
            print(f"{name:10s} {fmt_s(b['defend_s']):>8s} {fmt_s(b['final_eval']):>7s} {b['acc']:6.3f} {b['asr']:6.3f}")
        tot = sum(b["defend_s"] for b in base.values())
        print(f"BASELINES {len(base)} defenses: {fmt_s(tot)} in all"
              + (f", {tot / res['ours']['times']['total']:.2f}x one TSBD run (ours)" if "ours" in res else ""))
    if not res:
        out = {"machine": machine(), "arch": a.arch, "n_train": n_train, "n_test": n_test, "n_clean": len(clean),
               "before": before, "results": {}, "baselines": base, "summary": {}}
        write_json(a.json, out)
        return out

    stages = STAGES
    print(f"\nbackdoored: ACC {before['acc']:.4f} ASR {before['asr']:.4f}; {a.reps} repetitions per side, alternating")
    print(f"{'stage (wall)':14s} " + " ".join(f"{s:>12s}" for s in res) + ("   ratio ref/ours" if len(res) == 2 else "")
          + "   (median-time repetition)")
    for st in stages:
        vals = [res[s]["times"][st] for s in res]
        line = f"{st:14s} " + " ".join(f"{fmt_s(v):>12s}" for v in vals)
        if "ours" in res and "reference" in res:
            o, r = res["ours"]["times"][st], res["reference"]["times"][st]
            line += f"   {r / o:8.2f}x" if o > 0 else "        -"
        print(line)
    print(f"{'unlearn ep':14s} " + " ".join(f"{res[s]['times']['unlearn_epochs']:>12d}" for s in res))
    print(f"{'ACC / ASR':14s} " + " ".join(f"{res[s]['acc']:.3f}/{res[s]['asr']:.3f}".rjust(12) for s in res))
    summary = {}
    if "ours" in res and "reference" in res:
        pairs = list(zip(reps["ours"], reps["reference"]))  # repetition i of both sides ran next to each other
        summary = {"reps": a.reps,
                   "ratio_total": spread([r["times"]["total"] / o["times"]["total"] for o, r in pairs]),
                   "ratio_total_cpu": spread([r["times"]["total_cpu"] / o["times"]["total_cpu"] for o, r in pairs]),
                   "ratio_by_stage": {st: spread([r["times"][st] / o["times"][st] for o, r in pairs
                                                  if o["times"][st] > 0]) for st in stages}}
        print(f"\nRATIO reference/ours TSBD wall time (one n): {fmt_spread(summary['ratio_total'])}")
        print(f"RATIO reference/ours TSBD CPU time (one n): {fmt_spread(summary['ratio_total_cpu'])}")
        # A sweep of the reference's 11 ratios shares Stage 1a/1b on both sides and repeats 1c + 2:
        # computed from the measured stages, not run.
        o, r = res["ours"]["times"], res["reference"]["times"]
        per_n_o = o["zero_reinit"] + o["finetune"] + o["final_eval"]
        per_n_r = r["zero_reinit"] + r["finetune"] + r["final_eval"]
        sweep_o = o["unlearn"] + o["nwc"] + len(REF_RATIOS) * per_n_o
        sweep_r = r["unlearn"] + r["nwc"] + len(REF_RATIOS) * per_n_r
        summary["ratio_sweep11_projected"] = sweep_r / sweep_o
        print(f"PROJECTED (not run) reference/ours 11-ratio sweep, from the median repetition's stages: "
              f"{sweep_r / sweep_o:.2f}x ({fmt_s(sweep_r)} vs {fmt_s(sweep_o)})")
    out = {"machine": machine(), "arch": a.arch, "n_train": n_train, "n_test": n_test, "n_clean": len(clean),
           "n": n, "before": before, "results": res, "reps": reps, "baselines": base, "summary": summary}
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
