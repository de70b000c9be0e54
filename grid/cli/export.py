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
    key: str = typer.Option(..., "--key", help="A row's defense_key (purified model) or model_key (backdoored model)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (default: the run's, from <out>/spec.yaml)."),
):
    """Write a backdoored or purified model as a plain state_dict (tensors only)."""
    import torch
    import yaml

    from grid.store import ArtifactStore, CorruptArtifact

    if artifacts is None:
        saved = out / "spec.yaml"
        spec = (yaml.safe_load(saved.read_text()) or {}).get("spec", {}) if saved.exists() else {}
        artifacts = spec.get("artifacts") or str((out / "artifacts").resolve())
    store = ArtifactStore(artifacts)
    for kind in ("defense", "attack"):
        if store.exists(kind, key):
            break
    else:
        fail(f"no model with key {key} in {artifacts} (use a row's defense_key or model_key: "
             f"results.load('{out}')[['defense', 'defense_key', 'model_key']])")
    try:
        state = store.get(kind, key)["state"]
    except CorruptArtifact as e:
        fail(f"{e}; rerun `bdgrid run` to recompute it")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, output)
    err.print(f"wrote {output}: the {'purified' if kind == 'defense' else 'backdoored'} model, {len(state)} tensors "
              f"(torch.load(path, weights_only=True))", highlight=False)
