"""Writing state so that an interruption never loses or corrupts it, and capturing the random number generators.

Every file rtl writes for a later resume (IMP checkpoints, training checkpoints, run stages, masks, reports) goes
through :func:`atomic_write`: a temporary file in the target's folder, flushed to disk, then renamed over the
target, so a crash leaves the previous file or the new one, never half of either. :func:`rng_state` and
:func:`set_rng_state` capture and restore every generator a training step or a data loader draws from, in a form
``torch.load(weights_only=True)`` reads back.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Callable, Dict, IO

import torch

__all__ = ["atomic_json", "atomic_save", "atomic_write", "first_line", "rng_state", "set_rng_state"]


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    The folder is created if needed; on any error (or interruption) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # in the target's folder, so that the rename is a same-filesystem, atomic os.replace
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_json(obj: Any, path: str) -> None:
    """``obj`` as indented JSON with sorted keys, atomically."""
    atomic_write(path, lambda handle: json.dump(obj, handle, indent=2, sort_keys=True), binary=False)


def first_line(exc: BaseException) -> str:
    """An exception's message on one line, for one-line errors about unreadable files (torch's unpickling errors
    span several lines)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def rng_state(cuda: bool = True) -> Dict[str, Any]:
    """The torch (and, with ``cuda``, every initialised CUDA device's), numpy and Python ``random`` states."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (also the layouts earlier rtl versions wrote: a numpy entry keyed
    ``cached_gaussian``, a Python state as nested tuples or lists)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        cached = s["cached"] if "cached" in s else s["cached_gaussian"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], cached))
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    else:
        random.setstate(_as_tuples(py))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants tuples; a checkpoint round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
