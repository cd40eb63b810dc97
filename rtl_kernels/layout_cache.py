"""Cache of compiled mask layouts: each backend compiles the masks once and reuses the result until they change.

The key is the mask tensor itself (held by weak reference, so a freed tensor whose memory is reused never hits a
stale entry) plus its version counter and data pointer: any in-place edit (``masks[0, 1, 2] = False``,
``masks.copy_(...)``, ``masks.logical_and_(...)``) bumps the version and forces a recompile. Writes that bypass
autograd's version counter (``masks.data[...] = ...``) are not seen; call :func:`clear_layout_cache` after those.

CUDA graphs: a graph captured through a routed op holds the device addresses of the layout it read. A layout fetched
while the current CUDA stream is capturing is therefore pinned: it stays alive after its masks change or are freed,
so a replay never reads freed memory. Such a replay runs the masks of capture time; the first recompile of pinned
masks warns that the graph must be captured again. :func:`release_captured_layouts` drops the pins once the graphs
that used them are gone.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

_lock = threading.Lock()
# id(masks) -> {layout kind: (weakref to masks, version, data_ptr, layout)}
_cache: Dict[int, Dict[str, Tuple[Any, int, int, Any]]] = {}
_stats = {"hits": 0, "compiles": 0}
# layouts read during CUDA graph capture, kept alive for the graphs' replays; ids of masks whose layout is pinned
_pinned: List[Any] = []
_pinned_masks: set = set()


def _capturing(masks: Tensor) -> bool:
    """Whether this call is being captured into a CUDA graph (its layout's memory must outlive the call)."""
    return masks.is_cuda and torch.cuda.is_current_stream_capturing()


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
    capturing = _capturing(masks)
    with _lock:
        entry = _cache.get(key, {}).get(kind)
        if entry is not None:
            ref, ver, p, layout = entry
            if ref() is masks and ver == version and p == ptr:
                _stats["hits"] += 1
                if capturing:
                    _pin(key, layout)
                return layout
        stale_pin = entry is not None and key in _pinned_masks
    if stale_pin:
        with _lock:
            _pinned_masks.discard(key)  # warn once per capture
        warnings.warn(
            "routed masks changed after a CUDA graph captured their layout: the graph keeps replaying the masks of "
            "capture time (their layout is kept alive); capture the graph again to use the new masks, and call "
            "rtl_kernels.release_captured_layouts() once the old graph is deleted",
            RuntimeWarning,
            stacklevel=3,
        )
    layout = compile_fn(masks)
    with _lock:
        if capturing:
            _pin(key, layout)
        _stats["compiles"] += 1
        per_tensor = _cache.get(key)
        if per_tensor is None or not per_tensor or next(iter(per_tensor.values()))[0]() is not masks:
            per_tensor = {}
            _cache[key] = per_tensor
        per_tensor[kind] = (weakref.ref(masks, _drop(key)), version, ptr, layout)
    return layout


def _pin(key: int, layout: Any) -> None:
    # called under _lock
    if not any(p is layout for p in _pinned):
        _pinned.append(layout)
    _pinned_masks.add(key)


def release_captured_layouts() -> int:
    """Drop the layouts pinned by CUDA graph captures (call after deleting the graphs). Returns how many."""
    with _lock:
        count = len(_pinned)
        _pinned.clear()
        _pinned_masks.clear()
    return count


def clear_layout_cache() -> None:
    """Forget every compiled layout (needed only after writes through ``masks.data``)."""
    with _lock:
        _cache.clear()


def layout_cache_stats() -> Dict[str, int]:
    """Counts of cache hits and compiles since start (used by tests to show invalidation)."""
    with _lock:
        return dict(_stats, entries=sum(len(v) for v in _cache.values()), pinned=len(_pinned))
