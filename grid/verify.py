"""``bdgrid verify``: check every artifact and every result file of a run, report what is damaged,
and with ``--repair`` set it aside and recompute it from the run's saved spec.

Artifacts are checked as a run checks what it is about to read (header, sha256, and that the
safe loader opens them); result files by the sha256 in their Parquet footer and the row
invariants (``results.integrity``). Without ``--repair`` nothing on disk changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Findings:
    artifacts_checked: int = 0
    results_checked: int = 0
    bad_artifacts: list = field(default_factory=list)  # (kind, key, why)
    bad_results: list = field(default_factory=list)  # (path, why)

    @property
    def ok(self) -> bool:
        return not self.bad_artifacts and not self.bad_results


def artifact_keys(store) -> list[tuple[str, str]]:
    """(kind, key) of every artifact file under the store's root (one listing, any pyarrow fs)."""
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.base, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    out = []
    for i in infos:
        if i.type == pafs.FileType.File and i.path.endswith(".bdg"):
            parts = i.path[len(store.base):].strip("/").split("/")
            if len(parts) == 3:  # <kind>/<key[:2]>/<key>.bdg
                out.append((parts[0], parts[2][:-4]))
    return out


def check(out: str | Path, store) -> Findings:
    from grid.store import CorruptArtifact
    from results.integrity import DAMAGED, check_file
    from results.reader import files

    f = Findings()
    for kind, key in artifact_keys(store):
        f.artifacts_checked += 1
        try:
            store.get(kind, key)
        except CorruptArtifact as e:
            f.bad_artifacts.append((kind, key, str(e)))
    for table in ("results", "curves", "trials"):
        for p in files(out, table):
            f.results_checked += 1
            status, why = check_file(p)
            if status == DAMAGED:
                f.bad_results.append((p, why))
    return f


def set_aside(out: str | Path, store, f: Findings) -> None:
    """Delete the corrupt artifacts and move the damaged result files to ``<out>/damaged/``."""
    from results.writer import set_aside as move

    for kind, key, _ in f.bad_artifacts:
        store.delete(kind, key)
    for p, _ in f.bad_results:
        move(out, p)


def saved_spec(out: str | Path):
    """The run's spec as ``bdgrid run`` saved it (``spec.source.yaml``, relative paths against the
    original file's folder), or None."""
    import yaml

    from grid.spec import parse_spec

    out = Path(out)
    src, meta = out / "spec.source.yaml", out / "spec.yaml"
    if not src.exists():
        return None
    origin = (yaml.safe_load(meta.read_text()) or {}).get("source") if meta.exists() else None
    base = Path(origin).parent if origin else out
    ls, problems = parse_spec(src.read_text(), str(origin or src), base)
    return None if problems else ls
