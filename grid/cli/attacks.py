"""``bdgrid attacks list`` and ``bdgrid attacks preview``: see every attack, its parameters and
defaults, and look at its trigger (clean | poisoned | amplified difference, one PNG each)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

attacks_app = typer.Typer(help="List attacks and preview their triggers.", no_args_is_help=True, rich_markup_mode=None)


@attacks_app.command("list")
def list_attacks():
    """Every registered attack: kind, what the rate is a fraction of, parameters with defaults, resources."""
    from rich.table import Table

    from defense.attacks import ATTACKS
    from grid.cli.common import console, param_docs

    t = Table(title="attacks", show_lines=True)
    for c in ("name", "kind", "rate is a fraction of", "parameters = defaults (meaning)", "resources"):
        t.add_column(c, overflow="fold")
    for e in ATTACKS.entries():
        docs = param_docs(e.params)
        params = "\n".join(f"{k}={v!r}" + (f"  ({docs[k][1]})" if docs.get(k, (0, ""))[1] else "")
                           for k, v in e.defaults().items()) or "-"
        t.add_row(e.name, e.meta.get("kind", "?"), e.meta.get("rate_of", "?"), params,
                  ", ".join(e.meta.get("resources", ())) or "-")
    console.print(t)


def _split_params(items: list[str] | None) -> dict[str, dict]:
    """``attack.key=value`` items -> {attack: {key: value}}."""
    from grid.cli.common import fail, parse_params

    out: dict[str, dict] = {}
    for k, v in parse_params(items).items():
        if "." not in k:
            fail(f"--param expects attack.key=value, got '{k}'")
        a, key = k.split(".", 1)
        out.setdefault(a, {})[key] = v
    return out


def save_preview(path: Path, clean, poisoned, title: str, amplify: float = 5.0) -> float:
    """One PNG: a row per image with clean, poisoned and |poisoned - clean| * amplify. Returns the
    mean absolute difference on the [0, 255] scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = clean.float()
    p = poisoned.float()
    d = ((p - c).abs() * amplify).clamp(0, 255)
    n = len(c)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate([(c[i], "clean"), (p[i], "poisoned"), (d[i], f"|diff| x{amplify:g}")]):
            ax = axes[i][j]
            arr = img.permute(1, 2, 0).numpy() / 255
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray" if arr.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return float((p - c).abs().mean())


# Preview settings (without --full): enough to see what each trigger looks like, in seconds to a
# minute each on a laptop CPU, not the fidelity settings a grid trains with. Resources built with
# them are cached under their own keys, apart from the full ones.
QUICK = {
    "inputaware": {"mask_epochs": 2, "width": 8},
    "lf": {"steps": 60, "ref_epochs": 2},
    "trojannn": {"iters": 100, "ref_epochs": 2},
    "ssba": {"epochs": 2, "width": 16},
    "lc": {"steps": 10, "ref_epochs": 2},
}
QUICK_DATA = {"synthetic": {"n_train": 2000, "n_test": 400}}


def quality(clean, poisoned) -> str:
    """What the trigger costs the image: PSNR (dB, on [0, 255]), the share of pixels it changes,
    and the mean |difference| in grey levels."""
    import math

    c, p = clean.float(), poisoned.float()
    mse = float(((p - c) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    changed = float((p != c).any(dim=1).float().mean())  # pixels with any channel changed
    return f"PSNR {psnr:5.1f} dB, {100 * changed:5.1f}% of pixels changed, mean |diff| {float((p - c).abs().mean()):.2f}/255"


@attacks_app.command("preview")
def preview(
    dataset: str = typer.Option("synthetic", help="Dataset name."),
    out: Path = typer.Option(Path("previews"), help="Folder for the PNGs (one per attack)."),
    attack: Optional[List[str]] = typer.Option(None, "--attack", "-a", help="Attack(s) to preview; default all."),
    n: int = typer.Option(4, help="Images per attack."),
    arch: str = typer.Option("tiny_cnn", help="Architecture of clean reference models (LF, TrojanNN)."),
    recipe: str = typer.Option("fast", help="Training recipe for resources that train a model."),
    train_epochs: int = typer.Option(2, help="Epochs of classifier training for attacks whose trigger is "
                                            "learnt with the classifier (Input-aware)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="attack.key=value, e.g. lf.steps=100."),
    data_param: Optional[List[str]] = typer.Option(None, "--data-param", help="Dataset parameter key=value."),
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset's files (not needed for synthetic)."),
    resources: Optional[Path] = typer.Option(None, help="Resource cache folder (default: $BDGRID_CACHE/resources, "
                                                         "else ~/.cache/bdgrid/resources, shared with `bdgrid trial`)."),
    seed: int = typer.Option(0, help="Attack seed."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    full: bool = typer.Option(False, "--full", help="Use each attack's own settings and the full dataset (minutes "
                                                   "to train resources) instead of quick preview settings."),
):
    """Write <out>/<attack>.png: clean, poisoned and amplified |difference| side by side, and print
    each trigger's PSNR and the share of pixels it changes."""
    import torch

    from defense.attacks import ATTACKS, AttackContext
    from defense.data import load_dataset
    from defense.models import create_model
    from defense.registry import BadParams, UnknownName
    from defense.resources import ResourceCache
    from defense.train import get_recipe, pick_device, train
    from defense.trial import default_resources
    from grid.cli.common import console, fail, parse_params

    names = list(attack) if attack else ATTACKS.names()
    per = _split_params(param)
    if not full:  # quick settings under the user's own -p values
        per = {a: {**QUICK.get(a, {}), **per.get(a, {})} for a in set(names) | set(per)}
    try:
        entries = {a: ATTACKS.get(a) for a in names}
        params = {a: entries[a].make_params(per.get(a, {})) for a in names}
        unknown = set(per) - set(names)
        if unknown:
            fail(f"--param names attacks not previewed: {', '.join(sorted(unknown))}")
        rec = get_recipe(recipe)
        dparams = {**({} if full else QUICK_DATA.get(dataset, {})), **parse_params(data_param, "--data-param")}
        tr, te = load_dataset(dataset, data_root, **dparams)
    except (UnknownName, BadParams, FileNotFoundError) as e:
        fail(str(e))
    dev = pick_device(device)
    cache = ResourceCache(resources) if resources else default_resources()
    for i, a in enumerate(names, 1):
        t0 = time.perf_counter()
        console.print(f"[{i}/{len(names)}] {a}: building the trigger"
                      + (" (trains its resources the first time; cached after)" if entries[a].meta.get("resources") else "")
                      + " ...", highlight=False)
        ctx = AttackContext(target=0, pratio=0.1, seed=seed, arch=arch, device=dev, resources=cache, recipe=rec,
                            progress=True)  # resource training (minutes with --full) draws a bar on stderr
        po = entries[a].fn(tr, te, params[a], ctx)
        if po.bd_test is None and po.hook is not None:  # trigger learnt together with the classifier
            info = tr.info
            torch.manual_seed(seed)
            model = create_model(arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
            train(model, po.train, rec, seed=seed, device=dev, hook=po.hook, epochs=train_epochs,
                  progress=True, desc=f"{a}: classifier with its trigger")
            po.backdoor_test(model)
        else:
            po.backdoor_test(None)
        k = min(n, len(po.bd_idx))
        clean = te.x[po.bd_idx[:k].cpu()].cpu()
        pois = po.bd_test.x[:k].cpu()
        save_preview(out / f"{a}.png", clean, pois, f"{a} ({entries[a].meta.get('kind', '')})")
        console.print(f"{a:12s} -> {out / (a + '.png')}  {quality(clean, pois)}  ({time.perf_counter() - t0:.1f} s)",
                      highlight=False)
