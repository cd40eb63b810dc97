"""Buffers of the cpu backend's dense paths: per-thread scratch, masked copies of the shared weight, and a bounded
cache of those copies for inference.

A fresh multi-MB temporary per ticket and call (W * M_t, gathered rows, their product) is faulted in page by
page, and on a 2-core VM those faults cost more than the GEMMs they feed (``docs/cpu_backend.md``), so the dense
paths write into buffers that each thread keeps between calls.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Dict

import torch
from torch import Tensor

from ...layout_cache import get_layout


class _Scratch(threading.local):
    """Per-thread buffers reused across calls, by name."""

    def __init__(self) -> None:
        self.buffers: Dict[str, Tensor] = {}

    def get(self, name: str, shape, dtype) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


scratch = _Scratch()


def float_masks(masks: Tensor) -> dict:
    """ticket -> masks[t] as float, made on first use and kept with the masks' layouts (per mask version)."""
    return get_layout("cpu:float_masks", masks, lambda m: {})


def apply_mask(values: Tensor, masks: Tensor, t: int, out: Tensor) -> Tensor:
    """values * masks[t] into out, with exact zeros where pruned even when values hold inf/NaN.

    A multiply by a cached float mask is much faster than torch.where; where() runs only when the product may
    hold inf/NaN (a non-finite sum proves there is one, a finite sum that there is none), to keep inf * 0 = NaN out
    of pruned positions.
    """
    cache = float_masks(masks)
    fmask = cache.get(t)
    if fmask is None:
        fmask = cache.setdefault(t, masks[t].to(values.dtype))
    torch.mul(values, fmask.view(values.shape), out=out)
    if not bool(torch.isfinite(out.sum())):
        torch.where(masks[t].view(values.shape), values, torch.zeros((), dtype=values.dtype), out=out)
    return out


# Masked weights kept for inference, in bytes (env RTL_CPU_MASKED_WEIGHT_CACHE_MB, default 256 MB).
CACHE_BYTES = int(float(os.environ.get("RTL_CPU_MASKED_WEIGHT_CACHE_MB", "256")) * (1 << 20))


class _MaskedWeightCache:
    """W * M_t copies for inference, least recently used first out, at most ``CACHE_BYTES`` in all.

    An entry is valid while the weight and the masks are the same tensors at the same versions (any in-place
    change, an optimizer step included, bumps a version), so a stale copy is never returned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _key(weight: Tensor, masks: Tensor, t: int) -> tuple:
        return (id(weight), weight._version, weight.data_ptr(), id(masks), masks._version, masks.data_ptr(), t)

    def get(self, weight: Tensor, masks: Tensor, t: int):
        key = self._key(weight, masks, t)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            w_ref, m_ref, value = entry
            if w_ref() is not weight or m_ref() is not masks:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, weight: Tensor, masks: Tensor, t: int, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > CACHE_BYTES:
            return
        key = self._key(weight, masks, t)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (weakref.ref(weight), weakref.ref(masks), value)
            self._bytes += size
            while self._bytes > CACHE_BYTES:
                self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        _, _, value = self._entries.pop(key)
        self._bytes -= value.numel() * value.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes}


masked_weight_cache = _MaskedWeightCache()


def masked_weight(weight: Tensor, masks: Tensor, t: int, all_ones: bool, name: str = "masked_weight") -> Tensor:
    """weight * masks[t] for a dense path: the weight itself when the mask keeps everything; a cached copy in
    inference (no grad); else a per-thread buffer ``name`` (valid until the thread's next call asking for it)."""
    if all_ones:
        return weight
    inference = not torch.is_grad_enabled()
    if inference:
        hit = masked_weight_cache.get(weight, masks, t)
        if hit is not None:
            return hit
        value = apply_mask(weight, masks, t, out=torch.empty_like(weight))
        masked_weight_cache.put(weight, masks, t, value)
        return value
    return apply_mask(weight, masks, t, out=scratch.get(name, weight.shape, weight.dtype))
