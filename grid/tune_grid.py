"""Tune on cells of a grid spec: the cells come from the grid's own expansion, the backdoored
models from its artifact store (the same content keys ``bdgrid run`` uses), and missing ones
are trained by the grid runner itself, so ``bdgrid run`` and ``bdgrid tune`` share them.

In a tune spec::

    grid: quickstart.yaml            # relative to the tune spec
    grid_out: runs/quickstart        # the grid's output folder (default: its `out`, else runs/<name>)
    tune_on: [{attack: badnets}]     # filters over the grid's cells (dataset, arch, attack, pratio, seed)
    report_on: [{attack: blended}]
"""
from __future__ import annotations

from pathlib import Path

from grid.tune_spec import Cell

FILTER_KEYS = ("dataset", "arch", "attack", "pratio", "seed", "target")


def _load(path: str):
    from grid.spec import load_spec

    ls, problems = load_spec(path)
    if problems:
        raise ValueError("\n".join(p.render(ls.file) for p in problems))
    return ls


def grid_out(ls, override: str | None = None) -> Path:
    return Path(override or ls.spec.out or f"runs/{ls.spec.name}")


def all_cells(path: str) -> list[tuple[Cell, dict]]:
    """Every cell of the grid as a tune ``Cell`` (with the grid's recipe, epochs, ratios), and its identity."""
    from grid.spec import expand

    ls = _load(path)
    s = ls.spec
    out = []
    for c, _ in expand(ls):
        ds, atk = s.datasets[c.dataset], s.attacks[c.attack]
        root = ds.root
        if root and not Path(root).expanduser().is_absolute():
            root = str(ls.base_dir / root)
        cell = Cell(dataset=ds.name, dataset_params=ds.params, data_root=root, arch=c.arch, attack=atk.name,
                    attack_params=atk.params, pratio=c.pratio, target=s.target, seed=c.seed, recipe=s.recipe,
                    epochs=s.epochs, defender_ratio=s.defender_ratio, val_ratio=s.val_ratio)
        out.append((cell, {"dataset": ds.name, "arch": c.arch, "attack": atk.name, "pratio": c.pratio,
                           "seed": c.seed}))
    return out


def matches(f: dict, cell: Cell) -> bool:
    for k, v in f.items():
        have = getattr(cell, k)
        if k == "pratio" and isinstance(v, (int, float)):
            if abs(have - float(v)) > 1e-12:
                return False
        elif have != v:
            return False
    return True


def select(path: str, filters: list[dict]) -> list[Cell]:
    cells = [c for c, _ in all_cells(path)]
    return [c for c in cells if any(matches(f, c) for f in filters)]


def check(path: str, filters: dict[str, list[dict]], where: str) -> list[str]:
    """Problems of the grid reference: the grid spec's own, unknown filter keys, filters matching no cell."""
    from defense.registry import did_you_mean

    try:
        cells = [c for c, _ in all_cells(path)]
    except ValueError as e:
        return [f"{where}: grid: {line}" for line in str(e).splitlines()]
    problems = []
    for which, fs in filters.items():
        for i, f in enumerate(fs):
            bad = [k for k in f if k not in FILTER_KEYS]
            for k in bad:
                problems.append(f"{where}: {which}[{i}].{k}: not a cell axis of a grid{did_you_mean(k, FILTER_KEYS)}; "
                                f"filter on {', '.join(FILTER_KEYS)}")
            if not bad and not any(matches(f, c) for c in cells):
                problems.append(f"{where}: {which}[{i}]: {f} matches no cell of grid {path}")
    return problems


def models(path: str, cells: list[Cell], out: str | None = None, artifacts: str | None = None,
           log_fn=print) -> dict[str, dict]:
    """State dicts of the cells' backdoored models from the grid's artifact store; the grid runner
    trains the missing ones first (only the attack stages of the selected cells, defense 'none')."""
    from grid.plan import build_plan
    from grid.run import artifact_root, execute_plan
    from grid.spec import DefenseSpec, LoadedSpec
    from grid.store import ArtifactStore, CorruptArtifact

    ls = _load(path)
    gout = grid_out(ls, out)
    store = ArtifactStore(artifact_root(ls, gout, artifacts))
    by_ident = {}
    for st in build_plan(ls).of_kind("attack"):
        i = st.info
        by_ident[(i["dataset"], i["arch"], i["attack"], i["pratio"], i["seed"])] = st.key
    keys = {c.key(): by_ident[(c.dataset, c.arch, c.attack, c.pratio, c.seed)] for c in cells}
    missing = [c for c in cells if not store.exists("attack", keys[c.key()]) or not store.verify("attack", keys[c.key()])]
    if missing:
        log_fn(f"training {len(missing)} backdoored model(s) with the grid runner into {store.uri}")
        s = ls.spec
        names = {c.attack for c in missing}
        sub = s.model_copy(update={
            "defenses": [DefenseSpec(name="none")],
            "attacks": [a for a in s.attacks if a.name in names],
            "archs": sorted({c.arch for c in missing}),
            "pratios": sorted({c.pratio for c in missing}),
            "seeds": sorted({c.seed for c in missing}),
            "datasets": [d for d in s.datasets if d.name in {c.dataset for c in missing}],
            "include": [], "exclude": []})
        res = execute_plan(LoadedSpec(sub, ls.lines, ls.file, ls.base_dir, ls.text), gout, artifacts=artifacts,
                           show_progress=False)
        if res.failed:
            raise RuntimeError(f"grid runner failed to train: {res.failed}")
    out_states = {}
    for c in cells:
        try:
            out_states[c.key()] = store.get("attack", keys[c.key()])["state"]
        except CorruptArtifact as e:  # pragma: no cover - verified just above
            raise RuntimeError(f"attack artifact of {c.label()} is corrupt: {e}") from e
    return out_states
