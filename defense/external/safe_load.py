"""``torch.load`` for files made by other people's code, with nothing executed.

BackdoorBench's ``attack_result.pt`` is a torch pickle holding a ``state_dict`` and the
backdoor datasets' states, which contain numpy arrays (``original_index_array``,
``poison_indicator``) and numpy integer scalars (the keys of ``data_dict``). A pickle can name
any callable, so it is read with ``torch.load(weights_only=True)`` and an explicit allowlist of
exactly the numpy globals those objects need, under both module spellings (numpy 1.x wrote
``numpy.core.multiarray``, numpy 2 writes ``numpy._core.multiarray``). Anything else is refused
before it is called, and the refusal names the global. PyTorch's own guidance for numpy inside
checkpoints lists the same four globals (``torch.serialization.add_safe_globals`` docs,
"weights_only" section of https://pytorch.org/docs/stable/notes/serialization.html).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch


class RecordProblem(ValueError):
    """A record or checkpoint bdgrid cannot use, with a message naming the file and the reason."""


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def numpy_allowlist() -> list:
    """The numpy globals a BackdoorBench record needs: array and scalar reconstruction and dtype."""
    ma = _multiarray()
    out: list = [np.ndarray, np.dtype]
    # numpy >= 1.25 restores a dtype through its class (numpy.dtypes.Int64DType, ...): the plain
    # numeric and bool kinds only (no object or void dtypes, which could carry Python objects)
    out += sorted({type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}, key=lambda t: t.__name__)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((ma._reconstruct, f"{mod}._reconstruct"))
        out.append((ma.scalar, f"{mod}.scalar"))
    return out


_REFUSED = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"but got <class '([\w.]+)'>"))


def safe_torch_load(path: str | Path, what: str = "file"):
    """``torch.load(path, weights_only=True)`` with :func:`numpy_allowlist`; CPU tensors.

    Raises ``RecordProblem`` naming the refused global (e.g. ``posix.system``) when the pickle
    asks for anything outside the allowlist, and for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise RecordProblem(f"{what} {path}: file not found")
    try:
        with torch.serialization.safe_globals(numpy_allowlist()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [m.group(1) for rx in _REFUSED for m in [rx.search(str(e))] if m]
        name = found[0] if found else None
        if name:
            raise RecordProblem(
                f"{what} {path}: refused to load: it needs the Python object '{name}', which is not a tensor, "
                "a plain container or one of the allowed numpy types, and loading it could run code. "
                "bdgrid reads these files with torch.load(weights_only=True) only.") from None
        raise RecordProblem(f"{what} {path}: not a readable torch file ({str(e).splitlines()[-1][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RecordProblem(f"{what} {path}: not a readable torch file ({type(e).__name__}: {str(e)[:200]})") from None
