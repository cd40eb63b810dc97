"""Cache of compiled mask layouts: each backend compiles the masks once and reuses the result until they change.

The key is the mask tensor itself (held by weak reference, so a freed tensor whose memory is reused never hits a
stale entry) plus its version counter and data pointer: any in-place edit (``masks[0, 1, 2] = False``,
``masks.copy_(...)``, ``masks.logical_and_(...)``) bumps the version and forces a recompile. Writes that bypass
autograd's version counter (``masks.data[...] = ...``) are not seen; call :func:`clear_layout_cache` after those.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Tuple

from torch import Tensor

_lock = threading.Lock()
# id(masks) -> {layout kind: (weakref to masks, version, data_ptr, layout)}
_cache: Dict[int, Dict[str, Tuple[Any, int, int, Any]]] = {}
_stats = {"hits": 0, "compiles": 0}


def _drop(key: int) -> Callable[[Any], None]:
    def callback(_ref) -> None:
        with _lock:
            _cache.pop(key, None)

    return callback


def get_layout(kind: str, masks: Tensor, compile_fn: Callable[[Tensor], Any]) -> Any:
    """The layout ``compile_fn(masks)`` of kind ``kind``, compiled at most once per version of ``masks``."""
    key = id(masks)
    version = masks._version
    ptr = masks.data_ptr()
    with _lock:
        entry = _cache.get(key, {}).get(kind)
        if entry is not None:
            ref, ver, p, layout = entry
            if ref() is masks and ver == version and p == ptr:
                _stats["hits"] += 1
                return layout
    layout = compile_fn(masks)
    with _lock:
        _stats["compiles"] += 1
        per_tensor = _cache.get(key)
        if per_tensor is None or not per_tensor or next(iter(per_tensor.values()))[0]() is not masks:
            per_tensor = {}
            _cache[key] = per_tensor
        per_tensor[kind] = (weakref.ref(masks, _drop(key)), version, ptr, layout)
    return layout


def clear_layout_cache() -> None:
    """Forget every compiled layout (needed only after writes through ``masks.data``)."""
    with _lock:
        _cache.clear()


def layout_cache_stats() -> Dict[str, int]:
    """Counts of cache hits and compiles since start (used by tests to show invalidation)."""
    with _lock:
        return dict(_stats, entries=sum(len(v) for v in _cache.values()))
