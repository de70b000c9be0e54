"""``models:`` in a grid spec: backdoored models trained elsewhere, as cells of the grid.

An entry is a BackdoorBench record folder (or a glob of them: every matching record is a cell)
or a plain checkpoint with the arch, dataset and attack it was trained for. Each becomes a
``ModelCell``: the same identity a trained cell has (dataset, arch, attack, pratio, seed,
target) plus where it came from and the content key of the files it is read from
(``defense.external``: ``record_key`` for a record, the checkpoint's sha256 with its
``backdoor_test`` folder). ``grid.plan.add_model_cell`` gives it an ``import`` stage in place of
the ``attack`` stage, keyed by that content, so rerunning or adding defenses never imports
again and a changed file is a new model.

``resolve`` checks every entry before any compute and says what is wrong with the entry's
line: a folder that is not there, a glob that matches nothing, a record bdgrid cannot read
(an unknown ``model_name`` names the record and the name), a checkpoint that is missing or
does not fit its arch, unknown names. Records are read with ``inspect_record`` (the record's
dict and file hashes; no image decoded, no clean data loaded); what was read is kept for the
life of the process, keyed by every file's size and mtime, as validation and planning read the
same entries several times.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

from grid.spec import LoadedSpec, ModelEntry, Problem, canon, line_of

# fields a record supplies itself: giving them for a record would be ignored, so it is a problem
RECORD_OWN = ("arch", "dataset", "attack", "attack_params", "pratio", "target", "backdoor_test")
# bdgrid attacks that make their backdoor test images with what they train beside the model
# (Input-aware's generator): a checkpoint from elsewhere cannot rebuild them (imported.py)
TEST_NEEDS_TRAINING = ("inputaware",)


@dataclass(frozen=True)
class ModelCell:
    entry: int  # index into spec.models
    source: str  # backdoorbench | checkpoint
    path: str  # absolute record folder or checkpoint file
    label: str  # the ``model`` column: record folder name or checkpoint file name
    dataset: str
    arch: str
    attack: str  # bdgrid's attack name (a record's own name when bdgrid has no such attack)
    attack_params: str  # canonical JSON (a record's: {})
    pratio: float | None
    seed: int
    target: int
    key: str  # content key of the files imported
    root: str | None  # the clean data's folder (absolute), None for generated data
    dataset_params: str  # canonical JSON
    backdoor_test: str | None  # checkpoint: folder of triggered test images (absolute)
    provenance: tuple  # sorted (name, value) items for the rows' extra


def _abs(p: str, base: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


# ----------------------------------------------------------------------------- cached reads

_CACHE: dict = {}


def _signature(files: list[Path]) -> tuple:
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _record_files(d: Path) -> list[Path]:
    files = [d / n for n in ("attack_result.pt", "info.pickle") if (d / n).is_file()]
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("bd_test")):
        files += sorted(p for p in sub.rglob("*") if p.is_file())
    return files


def inspect(d: Path) -> dict:
    """``inspect_record`` of folder ``d``, once per content (RecordProblem when unusable)."""
    from defense.external.backdoorbench import inspect_record

    sig = ("record", _signature(_record_files(d)))
    if sig not in _CACHE:
        try:
            _CACHE[sig] = inspect_record(d)
        except Exception as e:  # noqa: BLE001 - kept so that the same problem is not read twice
            _CACHE[sig] = e
    got = _CACHE[sig]
    if isinstance(got, Exception):
        raise got
    return got


def folder_key(folder: Path, h=None) -> str:
    """sha256 over every file under ``folder`` with its relative path (as ``record_key``)."""
    from defense.external.checkpoints import file_sha256

    h = h or hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        file_sha256(f, h)
    return h.hexdigest()


def checkpoint_key(path: Path, arch: str, dataset: str, backdoor_test: Path | None) -> str:
    """The checkpoint's sha256 (and its backdoor_test folder's), after checking that it loads
    into ``arch`` (RecordProblem when not), once per content."""
    from defense.external.checkpoints import load_checkpoint

    files = [path] + (sorted(p for p in backdoor_test.rglob("*") if p.is_file()) if backdoor_test else [])
    sig = ("checkpoint", arch, dataset, _signature(files))
    if sig not in _CACHE:
        try:
            _, key = load_checkpoint(path, arch, dataset)
            if backdoor_test is not None:
                key = hashlib.sha256((key + "\0" + folder_key(backdoor_test)).encode()).hexdigest()
            _CACHE[sig] = key
        except Exception as e:  # noqa: BLE001
            _CACHE[sig] = e
    got = _CACHE[sig]
    if isinstance(got, Exception):
        raise got
    return got


# ----------------------------------------------------------------------------- entries -> cells

def _data_source(ls: LoadedSpec, m: ModelEntry, dataset: str) -> tuple[str | None, dict]:
    """(root, params) of the clean data: the entry's own, else the spec's dataset of that name."""
    ds = next((d for d in ls.spec.datasets if d.name == dataset), None)
    root = m.root if m.root is not None else (ds.root if ds is not None else None)
    params = m.dataset_params if m.dataset_params is not None else (dict(ds.params) if ds is not None else {})
    return (str(_abs(root, ls.base_dir)) if root is not None else None), params


def _resolved_params(reg, name: str, params: dict) -> dict:
    from defense.registry import params_dict

    return params_dict(reg.get(name).make_params(params))


def resolve(ls: LoadedSpec) -> tuple[list[ModelCell], list[Problem]]:
    """Every ``models:`` entry as cells, and every problem (with its line)."""
    cells: list[ModelCell] = []
    problems: list[Problem] = []

    def add(path: tuple, msg: str) -> None:
        problems.append(Problem(path, msg, line_of(ls.lines, path)))

    for i, m in enumerate(ls.spec.models):
        where = ("models", i)
        if (m.backdoorbench is None) == (m.checkpoint is None):
            add(where, "give one of 'backdoorbench: <record folder or glob>' or 'checkpoint: <file>'"
                       + (" (not both)" if m.backdoorbench is not None else ""))
            continue
        got = _records(ls, i, m, add) if m.backdoorbench is not None else _checkpoint(ls, i, m, add)
        cells += got
    # the same model twice would be the same stages listed as two cells
    seen: dict = {}
    for c in cells:
        k = (c.key, c.seed, c.root, c.dataset_params)
        if k in seen:
            add(("models", c.entry), f"{c.path} is the same model as models[{seen[k].entry}] "
                                     f"({seen[k].path}) with the same seed; each cell would run twice")
        else:
            seen[k] = c
    return cells, problems


def model_cells(ls: LoadedSpec) -> list[ModelCell]:
    """The cells of a validated spec's ``models:`` (grid.cells.expand)."""
    from grid.spec import SpecError

    cells, problems = resolve(ls)
    if problems:
        raise SpecError(problems, ls.file)
    return cells


def _check_data(ls: LoadedSpec, i: int, m: ModelEntry, dataset: str, what: str, add) -> tuple[str | None, dict] | None:
    from defense.data import DATASETS, dataset_info
    from defense.registry import BadParams

    root, params = _data_source(ls, m, dataset)
    try:
        _resolved_params(DATASETS, dataset, params)
    except BadParams as e:
        for msg in e.problems:
            add(("models", i, "dataset_params"), f"{dataset}: {msg}")
        return None
    if dataset_info(dataset).needs_root:
        if root is None:
            add(("models", i), f"{what} needs its clean data ({dataset}): give 'root:' (the folder with its "
                               f"standard files), here or on a 'datasets:' entry named {dataset}")
            return None
        if m.root is None:
            return root, params  # the spec's datasets: entry: its root is checked there
        if not Path(root).exists():
            add(("models", i, "root"), f"{what}: clean data root not found: {root}")
            return None
        if params.get("download", True) is False and not params.get("cache_dir"):
            from defense.data.files import dataset_problem

            why = dataset_problem(dataset, root)
            if why:
                add(("models", i, "root"), f"{what}: {why.splitlines()[0]} (download: false)")
                return None
    return root, params


def _records(ls: LoadedSpec, i: int, m: ModelEntry, add) -> list[ModelCell]:
    from defense.external.backdoorbench import RECORD_FILE
    from defense.external.safe_load import RecordProblem

    P = ("models", i, "backdoorbench")
    for f in RECORD_OWN:
        if getattr(m, f) not in (None, {}):
            add(("models", i, f), f"'{f}' is read from the BackdoorBench record; remove it here")
    pattern = _abs(m.backdoorbench, ls.base_dir)
    if glob.has_magic(str(pattern)):
        hits = sorted(Path(p) for p in glob.glob(str(pattern)))
        dirs = [h.parent if h.name == RECORD_FILE else h for h in hits]
        dirs = [d for d in dirs if (d / RECORD_FILE).is_file()]
        if not dirs:
            add(P, f"the glob {pattern} matches no record folder (none with {RECORD_FILE})"
                   + (f"; it matches {len(hits)} path(s) without one" if hits else ""))
            return []
    else:
        d = pattern.parent if pattern.name == RECORD_FILE else pattern
        if not d.is_dir():
            add(P, f"record folder not found: {d}")
            return []
        if not (d / RECORD_FILE).is_file():
            add(P, f"{d} is not a BackdoorBench record: it has no {RECORD_FILE}")
            return []
        dirs = [d]
    out = []
    for d in dirs:
        d = d.resolve()
        try:
            info = inspect(d)
        except RecordProblem as e:
            add(P, str(e))
            continue
        prov = info["provenance"]
        folder = d / info["bd_folder"]
        if not folder.is_dir():
            add(P, f"BackdoorBench record {d}: its backdoor test images are missing (no folder {folder})")
            continue
        if prov.get("target") is None:
            add(P, f"BackdoorBench record {d}: its backdoor images do not share one target label (all-to-all?); "
                   "a grid measures ASR against one target class")
            continue
        data = _check_data(ls, i, m, info["dataset"], f"BackdoorBench record {d}", add)
        if data is None:
            continue
        root, params = data
        params = {**info.get("dataset_params", {}), **params}
        seed = m.seed if m.seed is not None else _int_or(prov.get("seed"), 0)
        pratio = prov.get("pratio")
        extra = {"source": "backdoorbench", "record": str(d), "content_hash": info["key"],
                 "bb_model_name": prov.get("model_name"), "bb_attack": prov.get("attack_bb"),
                 "bb_pratio": pratio, "bb_label_trans": prov.get("label_trans"), "bb_seed": prov.get("seed")}
        out.append(ModelCell(i, "backdoorbench", str(d), m.label or d.name, info["dataset"], info["arch"],
                             str(prov.get("attack") or "unknown"), canon({}),
                             float(pratio) if isinstance(pratio, (int, float)) else None, seed, int(prov["target"]),
                             info["key"], root, canon(params), None, tuple(sorted(extra.items()))))
    return out


def _int_or(v, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _checkpoint(ls: LoadedSpec, i: int, m: ModelEntry, add) -> list[ModelCell]:
    from defense.attacks import ATTACKS
    from defense.data import DATASETS, dataset_info
    from defense.external.safe_load import RecordProblem
    from defense.models import MODELS
    from defense.registry import BadParams, UnknownName

    ok = True
    for f, reg in (("arch", MODELS), ("dataset", DATASETS), ("attack", ATTACKS)):
        v = getattr(m, f)
        if v is None:
            add(("models", i), f"a checkpoint needs '{f}:' (what it was trained as)")
            ok = False
            continue
        try:
            reg.get(v)
        except UnknownName as e:
            add(("models", i, f), str(e))
            ok = False
    aparams = {}
    if m.attack is not None and m.attack in ATTACKS:
        try:
            aparams = _resolved_params(ATTACKS, m.attack, m.attack_params)
        except BadParams as e:
            for msg in e.problems:
                add(("models", i, "attack_params"), msg)
            ok = False
    pratio = 0.1 if m.pratio is None else m.pratio  # BackdoorBench's default rate, as the grid's
    if not 0 < pratio < 1:
        add(("models", i, "pratio"), f"poisoning rate must be in (0, 1), got {pratio}")
        ok = False
    target = ls.spec.target if m.target is None else m.target
    seed = 0 if m.seed is None else m.seed
    if not 0 <= seed < 2 ** 32:
        add(("models", i, "seed"), f"seed must be in 0 .. {2 ** 32 - 1}, got {seed}")
        ok = False
    if m.dataset in DATASETS and not 0 <= target < dataset_info(m.dataset).num_classes:
        add(("models", i, "target") if m.target is not None else ("target",),
            f"target {target} is not a class of '{m.dataset}' (0..{dataset_info(m.dataset).num_classes - 1})")
        ok = False
    path = _abs(m.checkpoint, ls.base_dir).resolve()
    if not path.is_file():
        add(("models", i, "checkpoint"), f"checkpoint file not found: {path}")
        ok = False
    bd = None
    if m.backdoor_test is not None:
        bd = _abs(m.backdoor_test, ls.base_dir).resolve()
        if not bd.is_dir():
            add(("models", i, "backdoor_test"), f"backdoor_test folder not found: {bd}")
            ok = False
    elif m.attack in TEST_NEEDS_TRAINING:
        add(("models", i, "attack"), f"bdgrid's '{m.attack}' makes its backdoor test images with what it trains "
                                     "beside the model, which a checkpoint from elsewhere lacks: give "
                                     "backdoor_test: a folder of your triggered test images")
        ok = False
    if not ok:
        return []
    data = _check_data(ls, i, m, m.dataset, f"checkpoint {path}", add)
    try:
        key = checkpoint_key(path, m.arch, m.dataset, bd)
    except RecordProblem as e:
        add(("models", i, "checkpoint"), str(e))
        return []
    if data is None:
        return []
    root, params = data
    extra = {"source": "checkpoint", "record": str(path), "content_hash": key,
             "backdoor_test": str(bd) if bd is not None else None}
    return [ModelCell(i, "checkpoint", str(path), m.label or path.name, m.dataset, m.arch, m.attack, canon(aparams),
                      float(pratio), seed, target, key, root, canon(params), str(bd) if bd is not None else None,
                      tuple(sorted(extra.items())))]
