"""``bdgrid trial``: one backdoored model and one defense, in this process (no Ray)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from grid.cli.common import console, fail, parse_params


def trial(
    dataset: str = typer.Option("synthetic", help="Dataset name: synthetic (generated), cifar10, cifar100, gtsrb, tiny-imagenet, mnist, or your own."),
    arch: str = typer.Option("tiny_cnn", help="Model architecture: preact_resnet18, vgg19_bn, vit, tiny_cnn."),
    attack: str = typer.Option("badnets", help="Attack name (see `bdgrid attacks list`)."),
    pratio: float = typer.Option(0.1, help="Poisoning rate, a fraction of the training set, in (0, 1)."),
    target: int = typer.Option(0, help="Target class (all-to-one)."),
    defense: str = typer.Option("none", help="Defense name, or 'none' for the backdoored model."),
    seed: int = typer.Option(0, help="Seed for poisoning, initialisation, batches and augmentation."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Defense parameter key=value (repeatable)."),
    attack_param: Optional[List[str]] = typer.Option(None, "--attack-param", help="Attack parameter key=value (repeatable)."),
    data_param: Optional[List[str]] = typer.Option(None, "--data-param", help="Dataset parameter key=value, e.g. n_train=4000."),
    data_root: Optional[str] = typer.Option(None, help="Folder with the dataset's standard files (not needed for synthetic)."),
    # the one default of trials, grids and tunes (defense.trial.TrialConfig, grid.spec.GridSpec)
    recipe: str = typer.Option("fast", help="Training recipe: fast (default) or paper (BackdoorBench protocol)."),
    epochs: Optional[int] = typer.Option(None, help="Override the recipe's number of attack-training epochs."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, or auto (GPU when there is one)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    from_backdoorbench: Optional[str] = typer.Option(None, "--from-backdoorbench", metavar="RECORD",
                                                     help="Defend the model of a BackdoorBench record folder (its "
                                                          "attack_result.pt and bd_test_dataset/) instead of training one; "
                                                          "clean data from --data-root."),
):
    """Train one backdoored model (or import one), apply one defense, print ACC / ASR / RA (and DER)."""
    import sys

    print("trial: starting (importing torch)", file=sys.stderr, flush=True)  # the imports below take seconds
    from defense.registry import BadParams, UnknownName
    from defense.trial import TrialConfig, run_trial

    if from_backdoorbench:
        return _imported_trial(from_backdoorbench, defense, parse_params(param), parse_params(data_param, "--data-param"),
                               data_root, seed, device, as_json)

    cfg = TrialConfig(dataset=dataset, arch=arch, attack=attack, pratio=pratio, target=target, seed=seed,
                      defense=defense, defense_params=parse_params(param), attack_params=parse_params(attack_param),
                      dataset_params=parse_params(data_param), data_root=data_root, recipe=recipe, epochs=epochs,
                      device=device, progress=True)  # progress goes to stderr; --json owns stdout
    problems = check_trial(cfg)
    if problems:
        fail("\n  " + "\n  ".join(problems))
    try:
        res = run_trial(cfg)
    except (UnknownName, BadParams, FileNotFoundError) as e:
        fail(str(e))
    keys = ["bd_acc", "bd_asr", "bd_ra", "acc", "asr", "ra", "der"]
    if as_json:
        from grid.plan import trial_model_key

        print(json.dumps({**{k: res[k] for k in keys}, "model_key": trial_model_key(cfg),
                          "warning": weak_model(res, dataset),
                          "n_poison": res["n_poison"], "wall_s": res["wall_s"],
                          "device": res["device"], "config": res["config"], "diagnostics": res["diagnostics"]},
                         default=str))
        return
    print_result(f"{dataset} / {arch} / {attack} @ {pratio:g} / defense {defense} / seed {seed}", res, defense)
    weak = weak_model(res, dataset)
    if weak:
        console.print(f"[yellow]warning[/] {weak}", highlight=False)
    if defense != "none":
        der = "n/a (see the warning)" if weak else f"{100 * res['der']:.2f}%"
        console.print(f"DER {der}   ({res['wall_s']:.1f} s on {res['device']})")


def weak_model(res: dict, dataset: str) -> str | None:
    """Why this backdoored model is no meaningful start for a defense (the tables' ‡ rule), or None."""
    from defense.data import DATASETS
    from results.tables import SANITY_MIN_ASR

    k = DATASETS.get(dataset).meta["info"].num_classes
    if res["bd_asr"] < SANITY_MIN_ASR:
        return (f"the backdoored model's ASR is {100 * res['bd_asr']:.1f}% before any defense (under "
                f"{100 * SANITY_MIN_ASR:.0f}%): there is no real backdoor to remove; train longer or strengthen the trigger")
    if res["bd_acc"] < 2.0 / k:
        return (f"the backdoored model's clean ACC is {100 * res['bd_acc']:.1f}%, under twice chance ({200 / k:.0f}%): "
                f"it has not learnt the task")
    return None


def check_trial(cfg) -> list[str]:
    """Every problem with a trial's names and parameters, before any compute."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.methods import DEFENSES
    from defense.models import MODELS
    from defense.registry import BadParams, UnknownName
    from defense.train import RECIPES, device_problem

    problems = []
    for reg, name, params in [(DATASETS, cfg.dataset, cfg.dataset_params), (MODELS, cfg.arch, None),
                              (ATTACKS, cfg.attack, cfg.attack_params), (DEFENSES, cfg.defense, cfg.defense_params)]:
        try:
            e = reg.get(name)
            if params is not None:
                e.make_params(params)
        except UnknownName as ex:
            problems.append(str(ex))
        except BadParams as ex:
            problems.extend(ex.problems)
    if cfg.recipe not in RECIPES:
        problems.append(f"unknown recipe '{cfg.recipe}'; valid: {', '.join(RECIPES)}")
    if not 0 < cfg.pratio < 1:
        problems.append(f"pratio must be in (0, 1), got {cfg.pratio}")
    bad_device = device_problem(cfg.device)
    if bad_device:
        problems.append(bad_device)
    return problems


def _imported_trial(record: str, defense: str, params: dict, data_params: dict, data_root, seed: int, device: str,
                    as_json: bool) -> None:
    """`bdgrid trial --from-backdoorbench`: the record's model, measured on its own backdoor test
    images, defended with bdgrid's defender protocol (5% of the clean training set, seeded)."""
    from defense.external.backdoorbench import load_record
    from defense.external.imported import run_imported
    from defense.external.safe_load import RecordProblem
    from defense.registry import BadParams, UnknownName

    try:
        imp = load_record(record, data_root, data_params)
        res = run_imported(imp, defense, params, seed=seed, device=device)
    except (RecordProblem, UnknownName, BadParams, FileNotFoundError) as e:
        fail(str(e))
    keys = ["bd_acc", "bd_asr", "bd_ra", "acc", "asr", "ra", "der"]
    if as_json:
        print(json.dumps({**{k: res[k] for k in keys}, "model_key": res["key"], "arch": res["arch"],
                          "dataset": res["dataset"], "provenance": res["provenance"],
                          "diagnostics": res["diagnostics"], "wall_s": res["wall_s"]}, default=str))
        return
    print_result(f"BackdoorBench record {record}: {res['dataset']} / {res['arch']} / defense {defense}", res, defense)
    if defense != "none":
        console.print(f"DER {100 * res['der']:.2f}%   ({res['wall_s']:.1f} s on {res['device']})")


def print_result(title: str, res: dict, defense: str) -> None:
    """ACC / ASR / RA before and after the defense, in percent."""
    t = Table(title=title)
    for c in ["", "ACC", "ASR", "RA"]:
        t.add_column(c, justify="right")
    t.add_row("no defense", *(f"{100 * res[k]:.2f}" for k in ("bd_acc", "bd_asr", "bd_ra")))
    if defense != "none":
        t.add_row(defense, *(f"{100 * res[k]:.2f}" for k in ("acc", "asr", "ra")))
    console.print(t)
    g = res.get("diagnostics") or {}
    if "auto_rule" in g:  # a defense that chose a parameter on clean data says what it chose
        tried = ", ".join(f"{r['n']:g}" for r in g.get("auto_ladder", []) if r["n"] > 0)
        console.print(f"n: auto chose n={g['chosen_n']:g} ({g['auto_rule']}, on {g['auto_held_out']} held-out "
                      f"clean images; tried {tried}); a number, e.g. -p n=0.1, is the fixed-n path", highlight=False)
