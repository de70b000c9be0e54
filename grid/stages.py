"""The stage functions: plain calls into ``defense/`` that read their parents' artifacts from the
store and write their own. No Ray here: ``grid.run`` wraps ``execute`` in one Ray task per stage,
and ``bench/grid_overhead.py`` calls it in a plain loop.

What each stage stores (``grid.store``, torch.save / weights_only loads):

- ``data``: nothing; it returns the dataset as numpy arrays, which Ray puts in the object store
  once and hands to every dependent task (zero-copy reads on the same node).
- ``resource``: a done-marker; the resources themselves live in ``defense.resources.ResourceCache``
  under the store's resource folder, where the attack stages find them.
- ``attack``: the backdoored model's weights, poison indices, the backdoor test set (images,
  source indices, true labels), its training history and its before-defense metrics on both
  the reported test split and the validation split.
- ``import``: the same artifact for a model trained elsewhere (``models:`` in a spec), with no
  poison indices and no history; stages below it find it by ``model_kind``.
- ``prepare``: the defense's shared preparation (TSBD Stages 1a/1b) and the warnings it raised.
- ``defense``: the purified weights, diagnostics, curves, and the warnings it (and its prepare) raised.
- ``eval``: nothing in the store; it returns its result rows (one per split) and curves, which
  the driver writes with ``results.write_stage``; their presence marks the stage done. A
  defended row's ``extra`` JSON carries the defense's ``diagnostics`` (slimmed, see
  ``row_diagnostics``) and its ``warnings``.

``prepare`` and ``defense`` also return ``{"warnings": [...], "log": [...]}``: what the defense
raised with ``warnings.warn`` and what it said through ``ctx.log``. In a Ray worker both would
otherwise end in the worker's log files only; the driver reports them (``grid.run``).

Every executed stage appends one line to ``<out>/executed.log`` on the node that ran it (kind,
key, pid, seconds, node): the tests count recomputation with it.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from grid.plan import Stage
from grid.plugins import require_plugins
from grid.store import ArtifactStore


# ----------------------------------------------------------------------------- helpers

def plain_text(text: str) -> str:
    """``text`` without ANSI colour codes (Ray colours its tracebacks): failure files are read in
    editors and grepped, not shown on a terminal."""
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _torch_setup(stage: Stage):
    import torch

    # one torch thread per CPU Ray gave the task: tasks packed on a node must not oversubscribe it
    torch.set_num_threads(max(1, int(stage.cpus)))
    dev = "cuda" if stage.gpus > 0 and torch.cuda.is_available() else "cpu"
    return torch, dev


def _data_from(arrays: dict):
    import torch

    from defense.data import Data

    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes into them
        warnings.simplefilter("ignore", UserWarning)
        tr = Data(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]), arrays["info"])
        te = Data(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]), arrays["info"])
    return tr, te


def _model(arch: str, info, state: dict | None = None):
    from defense.models import create_model

    m = create_model(arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
    if state is not None:
        m.load_state_dict(state)
    return m


def _state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _split_metrics(model, test, bd_x, bd_idx, bd_true, idx, target, device) -> dict:
    """ACC/ASR/RA on the test images at ``idx`` and the backdoor images made from them."""
    import torch

    from defense.data import Data
    from defense.metrics import attack_metrics

    keep = torch.nonzero(torch.isin(bd_idx, idx)).flatten()
    bd = Data(bd_x[keep], torch.full((len(keep),), target, dtype=torch.long), test.info)
    model.to(device)
    m = attack_metrics(model, test.subset(idx).to(device), bd.to(device), bd_true[keep].to(device), target)
    # the sample sizes behind each fraction: tuning puts binomial intervals on validation metrics
    return {**m, "n_clean": int(len(idx)), "n_bd": int(len(keep))}


def _log(out: str, stage: Stage, seconds: float, node: str = "-") -> None:
    line = f"{stage.kind} {stage.key} {os.getpid()} {seconds:.3f} {node}\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(out) / "executed.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines from parallel workers never interleave
    finally:
        os.close(fd)


def _log_path(env: dict, stage: Stage) -> Path:
    return Path(env["out"]) / "logs" / f"{stage.kind}-{stage.key}.log"


class _Capture:
    """Records what a defense says while it runs: ``warnings.warn`` calls and ``ctx.log`` lines.

    In a Ray worker neither reaches the user (stderr goes to the worker's log file, and the
    default ``ctx.log`` drops its message), so the stage returns them for the driver to print.
    """

    MAX_LOG = 500  # ctx.log lines kept per stage: per-epoch lines of a 1000-epoch run stay bounded

    def __init__(self, failure_log: Path | None = None):
        self.warnings: list[str] = []
        self.lines: list[str] = []
        # where the lines go if the stage raises: the driver writes them only for a stage that
        # returned, and the lines before a failure are what explains it
        self.failure_log = failure_log

    def log(self, msg) -> None:
        if len(self.lines) < self.MAX_LOG:
            self.lines.append(str(msg))

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._rec = self._cm.__enter__()
        warnings.simplefilter("always")  # "default" would hide a repeat already shown in this worker
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self._rec:  # each distinct message once, in order
            msg = str(w.message)
            if msg not in self.warnings:
                self.warnings.append(msg)
        if exc[0] is not None and self.failure_log is not None and (self.lines or self.warnings):
            try:
                self.failure_log.parent.mkdir(parents=True, exist_ok=True)
                self.failure_log.write_text("".join(f"{ln}\n" for ln in self.lines)
                                            + "".join(f"warning: {w}\n" for w in self.warnings))
            except OSError:
                pass  # the failure itself is what the driver reports
        return False

    def output(self) -> dict:
        return {"warnings": list(self.warnings), "log": list(self.lines)}


# keys of a defense's diagnostics left out of the result rows: per-neuron scores (ANP/RNP
# mask_scores: one number per BN neuron) would make every row kilobytes; they stay in the
# defense artifact. Curves are in the curves table already.
_ROW_DROP_KEYS = ("mask_scores",)
_ROW_MAX_LIST = 50


def row_diagnostics(diag):
    """A defense's diagnostics as they go into a result row: JSON-able, without per-neuron
    lists (any list longer than ``_ROW_MAX_LIST``, keys in ``_ROW_DROP_KEYS``, ``*_curve``)."""
    if isinstance(diag, dict):
        return {k: row_diagnostics(v) for k, v in diag.items()
                if k not in _ROW_DROP_KEYS and not str(k).endswith("curve")
                and not (isinstance(v, (list, tuple)) and len(v) > _ROW_MAX_LIST)}
    if isinstance(diag, (list, tuple)):
        return [row_diagnostics(v) for v in diag]
    return diag


# ----------------------------------------------------------------------------- stages

def run_data(stage: Stage, env: dict) -> dict:
    """Load the dataset once; returned as numpy arrays so Ray shares them through its object store."""
    from defense.data import load_dataset

    root = stage.run.get("root")
    if root is not None and not Path(root).expanduser().is_absolute() and not Path(root).exists():
        root = str(Path(stage.run.get("base_dir", ".")) / root)
    train, test = load_dataset(stage.config["dataset"], root, **stage.config["params"])
    return {"train_x": train.x.numpy(), "train_y": train.y.numpy(), "test_x": test.x.numpy(),
            "test_y": test.y.numpy(), "info": train.info}


def _trial_cfg(c: dict, dataset: str, device: str):
    from defense.trial import TrialConfig

    return TrialConfig(dataset=dataset, arch=c["arch"], attack=c["attack"], pratio=c["pratio"], target=c["target"],
                       seed=c["seed"], attack_params=c["attack_params"], recipe=c["recipe"]["name"],
                       epochs=c["recipe"]["epochs"], val_ratio=c.get("val_ratio", 0.2), device=device)


def _resources(store: ArtifactStore):
    from defense.resources import ResourceCache

    return ResourceCache(store.resource_dir())


def run_resource(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    """Build the attack's upstream resources into the shared cache (the attack stages then hit it)."""
    from defense.trial import make_poisoned

    _, dev = _torch_setup(stage)
    train, test = _data_from(data)
    c = dict(stage.config, pratio=stage.run["pratio"], seed=stage.run["seed"])
    make_poisoned(_trial_cfg(c, train.info.name, dev), train, test, resources=_resources(store))
    store.put("resource", stage.key, {"done": True})
    return {}


def run_attack(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    """Poison, train the backdoored model, and measure it before any defense."""
    from defense.data.splits import val_test_indices
    from defense.trial import make_poisoned, train_backdoored

    torch, dev = _torch_setup(stage)
    c = stage.config
    t0 = time.perf_counter()
    train, test = _data_from(data)
    cfg = _trial_cfg(c, train.info.name, dev)
    poisoned = make_poisoned(cfg, train, test, resources=_resources(store))
    model, hist = train_backdoored(cfg, poisoned)
    bd, bd_idx, bd_true = poisoned.backdoor_test(model)
    bd_x, bd_idx, bd_true = bd.x.cpu(), bd_idx.cpu(), bd_true.cpu()
    val_idx, test_idx = val_test_indices(len(test), c["val_ratio"], seed=0)
    metrics = {name: _split_metrics(model, test, bd_x, bd_idx, bd_true, idx, c["target"], dev)
               for name, idx in (("test", test_idx), ("val", val_idx))}
    wall = time.perf_counter() - t0
    store.put("attack", stage.key, {
        "state": _state(model), "poison_idx": poisoned.poison_idx.cpu(), "bd_x": bd_x, "bd_idx": bd_idx,
        "bd_true": bd_true, "metrics": metrics, "history": json.dumps(hist), "wall_s": wall, "device": dev})
    return {"metrics": metrics}


def run_import(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    """A model trained elsewhere (``models:``; ``grid.models``): read it and its backdoor test set
    (a BackdoorBench record's own images, or a checkpoint's rebuilt by bdgrid's attack or read
    from its folder) over the data stage's clean data, measure it before any defense as
    ``run_attack`` does, and store the attack stage's artifact under the stage's key."""
    from defense.data.splits import val_test_indices
    from defense.external.backdoorbench import record_from_data
    from defense.external.imported import checkpoint_from_data
    from defense.external.safe_load import RecordProblem

    torch, dev = _torch_setup(stage)
    c, r = stage.config, stage.run
    t0 = time.perf_counter()
    train, test = _data_from(data)
    if c["source"] == "backdoorbench":
        imp = record_from_data(r["path"], train, test)
    else:
        imp = checkpoint_from_data(r["path"], c["arch"], train.info.name, c["attack"], train, test, c["attack_params"],
                                   c["pratio"], c["target"], c["seed"], r.get("backdoor_test"), _resources(store))
    key = imp.key
    if c["source"] == "checkpoint" and r.get("backdoor_test"):
        from grid.models import checkpoint_key

        key = checkpoint_key(Path(r["path"]), c["arch"], train.info.name, Path(r["backdoor_test"]))
    if key != c["content"]:  # the artifact is keyed by the content the plan saw: never store other bytes under it
        raise RecordProblem(f"{r['path']} changed since the grid was planned (content {key[:12]}, planned "
                            f"{c['content'][:12]}); rerun `bdgrid run` to plan it again")
    if imp.target != c["target"]:
        raise RecordProblem(f"{r['path']}: its backdoor images are labelled {imp.target}, planned target {c['target']}")
    model = imp.model
    bd_x, bd_idx, bd_true = imp.poisoned.bd_test.x.cpu(), imp.poisoned.bd_idx.cpu(), imp.poisoned.bd_true.cpu()
    val_idx, test_idx = val_test_indices(len(test), c["val_ratio"], seed=0)
    metrics = {name: _split_metrics(model, test, bd_x, bd_idx, bd_true, idx, c["target"], dev)
               for name, idx in (("test", test_idx), ("val", val_idx))}
    store.put("import", stage.key, {
        "state": _state(model), "poison_idx": torch.zeros(0, dtype=torch.long), "bd_x": bd_x, "bd_idx": bd_idx,
        "bd_true": bd_true, "metrics": metrics, "history": "[]", "wall_s": time.perf_counter() - t0, "device": dev})
    return {"metrics": metrics}


def model_kind(stage: Stage) -> str:
    """The store kind of a stage's backdoored model (its parents[1]): ``import`` below an imported
    model's stage (its rows say where the model came from), else ``attack``."""
    return "import" if stage.info.get("source") else "attack"


def _clean(train, c: dict):
    from defense.data.splits import defender_subset

    return defender_subset(train, c["defender_ratio"], c["seed"])[0]


def run_prepare(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    """A defense's expensive shared part (TSBD Stages 1a/1b), once per distinct shared params."""
    from defense.methods import DEFENSES, DefenseContext

    torch, dev = _torch_setup(stage)
    train, _ = _data_from(data)
    atk = store.get(model_kind(stage), stage.parents[1])
    entry = DEFENSES.get(stage.config["defense"])
    model = _model(stage.info["arch"], train.info, atk["state"]).to(dev)
    with _Capture(_log_path(env, stage)) as cap:
        ctx = DefenseContext(device=dev, seed=stage.config["seed"], target=stage.info.get("target"), log=cap.log)
        prepared = entry.meta["prepare"](model, _clean(train, stage.config).to(dev),
                                         entry.make_params(stage.run["params"]), ctx)
    # stored with it: every defense stage that uses this prepare (now or on a later resume)
    # carries these warnings into its rows
    store.put("prepare", stage.key, {"prepared": prepared, "warnings": cap.warnings})
    return cap.output()


def run_defense_stage(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    from defense.methods import DefenseContext, run_defense

    torch, dev = _torch_setup(stage)
    c = stage.config
    t0 = time.perf_counter()
    train, _ = _data_from(data)
    atk = store.get(model_kind(stage), stage.parents[1])
    prep = store.get("prepare", stage.parents[2]) if len(stage.parents) > 2 else {}
    model = _model(stage.info["arch"], train.info, atk["state"]).to(dev)
    with _Capture(_log_path(env, stage)) as cap:
        ctx = DefenseContext(device=dev, seed=c["seed"], target=stage.info.get("target"),
                             prepared=prep.get("prepared"), log=cap.log)
        res = run_defense(c["defense"], model, _clean(train, c).to(dev), c["params"], ctx)
    wall = time.perf_counter() - t0
    # the prepare's warnings first (its stage reported them already; the rows need them too)
    warned = list(dict.fromkeys([*prep.get("warnings", []), *cap.warnings]))
    store.put("defense", stage.key, {"state": _state(res.model), "diagnostics": json.dumps(res.diagnostics, default=str),
                                     "curves": json.dumps(res.curves, default=str), "wall_s": wall, "device": dev,
                                     "warnings": json.dumps(warned)})
    return cap.output()


def _curve_rows(ident: dict, rows: list[dict], phase_default: str) -> list[dict]:
    """Wide per-epoch dicts -> long rows (phase, epoch, metric, value) with the identity columns."""
    out = []
    for i, r in enumerate(rows):
        phase, epoch = r.get("phase", phase_default), r.get("epoch", i + 1)
        for k, v in r.items():
            if k in ("phase", "epoch") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out.append({**ident, "phase": phase, "epoch": int(epoch), "metric": k, "value": float(v)})
    return out


def _defense_extra(src: dict) -> dict:
    """The defense artifact's diagnostics and warnings, for the rows' ``extra`` JSON (artifacts
    written before warnings were stored have none)."""
    diag = json.loads(src.get("diagnostics") or "{}")
    # whether the defense changed the model at all, as columns a table can filter on
    changed = {k: diag[k] for k in ("weights_changed", "neurons_pruned", "chosen_n") if k in diag}
    return {"diagnostics": row_diagnostics(diag), "warnings": json.loads(src.get("warnings") or "[]"), **changed}


def _bd_digest(atk: dict, idx) -> str:
    """sha256 of the backdoor images a split is scored on (those made from the split's test
    images): lets anyone check that two evaluations of a cell read the same poisoned bytes."""
    import hashlib

    import torch

    keep = torch.nonzero(torch.isin(atk["bd_idx"], idx)).flatten()
    return hashlib.sha256(atk["bd_x"][keep].contiguous().numpy().tobytes()).hexdigest()[:16]


def run_eval(stage: Stage, data: dict, store: ArtifactStore, env: dict) -> dict:
    """Score the (purified) model on the reported test split and the validation split; write the
    result rows (one per split) and the curves. Only this stage writes result rows."""
    from defense.data.splits import val_test_indices
    from defense.metrics import der

    torch, dev = _torch_setup(stage)
    t0 = time.time()
    _, test = _data_from(data)
    atk = store.get(model_kind(stage), stage.parents[1])
    defended = stage.config["defense"] != "none"
    src = store.get("defense", stage.parents[2]) if defended else atk
    model = _model(stage.info["arch"], test.info, src["state"])
    val_idx, test_idx = val_test_indices(len(test), stage.config["val_ratio"], seed=0)
    ident = {k: v for k, v in stage.info.items() if k != "defense_name"}
    base = {**ident, "grid": env.get("grid"), "spec_hash": env.get("spec_hash"), "device": src.get("device", dev),
            "defense_name": stage.info.get("defense_name", "none"),
            # each time is its own stage's: the defense's (0 for no defense), the attack training's
            "wall_s": float(src.get("wall_s", 0.0)) if defended else 0.0, "attack_wall_s": float(atk.get("wall_s", 0.0)),
            "model_key": stage.parents[1], "defense_key": stage.parents[2] if defended else None}
    # result rows only: the curves rows share ``base`` and would repeat it on every epoch
    said = _defense_extra(src) if defended else {}
    rows = []
    # a tuning trial's eval scores the validation split only: the reported test split is not read
    splits = stage.config.get("splits", ("test", "val"))
    for split, idx in (("test", test_idx), ("val", val_idx)):
        if split not in splits:
            continue
        before = atk["metrics"][split]
        after = (_split_metrics(model, test, atk["bd_x"], atk["bd_idx"], atk["bd_true"], idx, ident["target"], dev)
                 if defended else before)
        rows.append({**base, **said, "split": split, **after, "der": der(before["acc"], before["asr"], after["acc"], after["asr"]),
                     "bd_acc": before["acc"], "bd_asr": before["asr"], "bd_ra": before["ra"],
                     "bd_digest": _bd_digest(atk, idx), "eval_s": time.time() - t0, "started_at": t0,
                     "ended_at": time.time()})
    curves = (_curve_rows(base, json.loads(src["curves"]), "defense") if defended
              else _curve_rows(base, json.loads(atk["history"]), "attack"))
    # returned, not written here: the driver writes them (see ``write_rows``), so results land
    # in the driver's output folder even when this ran on another node of a cluster
    return {"rows": rows, "curves": curves}


def write_rows(out: str | Path, stage: Stage, output: dict) -> None:
    """Write an eval stage's curves, then its result rows (their presence marks the stage done)."""
    import results

    if output.get("curves"):
        results.write_stage(out, "eval", stage.key, output["curves"], table="curves")
    results.write_stage(out, "eval", stage.key, output["rows"])


RUNNERS = {"resource": run_resource, "attack": run_attack, "import": run_import, "prepare": run_prepare,
           "defense": run_defense_stage, "eval": run_eval}


def execute(stage: Stage, data: Any, store: ArtifactStore, env: dict) -> Any:
    """Run one stage (in a Ray worker or in-process); ``data`` is the data stage's output."""
    # validation imported them in the driver; a worker that cannot is misconfigured
    require_plugins(env.get("imports", []), env.get("import_path", []))
    t0 = time.perf_counter()
    out = run_data(stage, env) if stage.kind == "data" else RUNNERS[stage.kind](stage, data, store, env)
    _log(env["out"], stage, time.perf_counter() - t0, env.get("node", "-"))
    return out
