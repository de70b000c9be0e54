"""``bdgrid export-model``: a model of a run (backdoored or purified) as a plain ``state_dict``
file that ``torch.load(path, weights_only=True)`` opens anywhere, without bdgrid."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from grid.cli.common import err, fail


def export_model(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="The .pt file to write."),
    out: Path = typer.Option(..., "--out", "-o", help="The run folder the model belongs to."),
    key: Optional[str] = typer.Option(None, "--key", help="A row's defense_key (purified model) or model_key "
                                                          "(backdoored model)."),
    every: bool = typer.Option(False, "--all", help="With --format backdoorbench: every model of the run, OUTPUT a "
                                                    "folder of records (<attack>_<pratio>_<arch>_<dataset>_seed<k>/, "
                                                    "each purified model under its record's defense/<label>/)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (default: the run's, from <out>/spec.yaml)."),
    fmt: str = typer.Option("state_dict", "--format", help="state_dict (a .pt of tensors) or backdoorbench (OUTPUT is "
                                                             "a folder: a backdoored model as a record, attack_result.pt "
                                                             "with its bd_test_dataset/; a purified one as defense_result.pt)."),
):
    """Write a backdoored or purified model as a plain state_dict, or in BackdoorBench's layout."""
    import torch
    from grid.run import run_artifact_root
    from grid.store import ArtifactStore, CorruptArtifact

    artifacts = artifacts or run_artifact_root(out)
    store = ArtifactStore(artifacts)
    if every:
        if fmt != "backdoorbench" or key:
            fail("--all exports every model of the run in BackdoorBench's layout: use it with --format backdoorbench "
                 "and without --key")
        return _all_to_backdoorbench(out, store, output)
    if not key:
        fail("give --key (a row's defense_key or model_key), or --all with --format backdoorbench")
    for kind in ("defense", "attack", "import"):  # import: a model of a models: entry (grid.models)
        if store.exists(kind, key):
            break
    else:
        fail(f"no model with key {key} in {artifacts} (use a row's defense_key or model_key: "
             f"results.load('{out}')[['defense', 'defense_key', 'model_key']])")
    try:
        state = store.get(kind, key)["state"]
    except CorruptArtifact as e:
        fail(f"{e}; rerun `bdgrid run` to recompute it")
    if fmt == "backdoorbench":
        return _to_backdoorbench(out, kind, key, store, output)
    if fmt != "state_dict":
        fail(f"unknown --format '{fmt}'; valid: state_dict, backdoorbench")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, output)
    err.print(f"wrote {output}: the {'purified' if kind == 'defense' else 'backdoored'} model, {len(state)} tensors "
              f"(torch.load(path, weights_only=True))", highlight=False)


def _to_backdoorbench(out: Path, kind: str, key: str, store, dest: Path) -> None:
    """The model of ``key`` in BackdoorBench's layout, its identity read from the run's rows."""
    import json

    import torch

    import results
    from defense.data import Data, dataset_info
    from defense.external.backdoorbench import export_defense_result, export_record
    from defense.external.safe_load import RecordProblem
    from defense.models import create_model

    df = results.load(out)
    col = "defense_key" if kind == "defense" else "model_key"
    rows = df[df[col] == key] if col in df.columns else df.iloc[:0]
    if rows.empty:
        fail(f"no result row of {out} names {col} {key}; export rows written by this bdgrid version")
    row = rows.iloc[0]
    info = dataset_info(row["dataset"])
    model = create_model(row["arch"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
    art = store.get(kind, key)
    model.load_state_dict(art["state"])
    if kind == "defense":
        path = export_defense_result(model, row["arch"], row["dataset"], dest)
        err.print(f"wrote {path} (BackdoorBench's defense_result.pt)", highlight=False)
        return
    m = art.get("metrics", {})
    try:
        n_test = int(m["test"]["n_clean"]) + int(m["val"]["n_clean"])
    except (KeyError, TypeError):
        fail(f"the attack artifact {key} predates the image counts an export needs; rerun its grid to refresh it")
    target = int(row["target"])
    bd = Data(art["bd_x"], torch.full((len(art["bd_x"]),), target, dtype=torch.long), info)
    dparams = json.loads(row["dataset_params"]) if isinstance(row.get("dataset_params"), str) else {}
    try:
        path = export_record(model, row["arch"], row["dataset"], bd, art["bd_idx"], art["bd_true"], n_test, dest,
                             attack=row["attack"], pratio=float(row["pratio"]), target=target, seed=int(row["seed"]),
                             dataset_params=dparams)
    except RecordProblem as e:
        fail(str(e))
    err.print(f"wrote the BackdoorBench record {path} (attack_result.pt, bd_test_dataset/, info.pickle)", highlight=False)


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(text)).strip("_") or "x"


def _all_to_backdoorbench(out: Path, store, dest: Path) -> None:
    """Every backdoored model of the run as a record and every purified one as its record's
    ``defense/<label>/defense_result.pt``: the layout BackdoorBench's defense scripts read
    (``record/<attack>_<pratio>/``), one folder per cell since a grid has many per attack."""
    import results

    df = results.load(out)
    if df.empty or "model_key" not in df.columns:
        fail(f"no result rows in {out}: run the grid first")
    cells = df.drop_duplicates("model_key")
    n_def = 0
    for _, row in cells.iterrows():
        kind = "import" if store.exists("import", row["model_key"]) else "attack"
        name = "_".join(_safe(v) for v in (row["attack"], str(row["pratio"]).replace(".", "_"), row["arch"],
                                             row["dataset"], f"seed{int(row['seed'])}"))
        rec = dest / name
        _to_backdoorbench(out, kind, row["model_key"], store, rec)
        mine = df[(df["model_key"] == row["model_key"]) & df["defense_key"].notna() & (df["defense_key"] != "")]
        for _, d in mine.drop_duplicates("defense_key").iterrows():
            _to_backdoorbench(out, "defense", d["defense_key"], store, rec / "defense" / _safe(d["defense"]))
            n_def += 1
    err.print(f"wrote {len(cells)} record(s) and {n_def} defense result(s) under {dest}", highlight=False)
