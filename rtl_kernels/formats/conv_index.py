"""Sparse indices of a routed conv's masks, as the cpu backend's direct sparse convolution reads them.

For masks (T, O, C / groups, kh, kw) and K = C / groups * kh * kw positions per output channel:

- ``csr_ptr`` (T * O + 1,) int64 and ``csr_idx`` (nnz,) int32: the kept positions k = c_local * kh * kw + tap of
  output channel o of ticket t, in ascending order, at ``csr_idx[csr_ptr[t * O + o] : csr_ptr[t * O + o + 1]]``
  (forward and weight gradient);
- :func:`input_gradient_index`: for one (stride, dilation), the kept weights that reach input channel c through the
  taps of stride phase p, in rows (t, p, c) with p = ph * stride_w + pw, ph = (tap_row * dilation_h) % stride_h,
  pw likewise; an entry is ``og * kh * kw + tap`` with og the output channel within c's group (input gradient).

Only the tickets flagged ``indexed`` get entries: the others run dense, and indexing them would cost memory for
nothing (an all-ones ResNet-18 layer4 conv would hold 19M entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
from torch import Tensor

from . import check_int32_columns


@dataclass(frozen=True)
class ConvIndex:
    """Compiled masks of one routed conv layer for the cpu backend.

    Attributes:
        indexed (T,) bool: tickets with entries in the index.
        density (T,) float32: the kept fraction of each ticket.
        all_ones (T,) bool: tickets that keep every weight.
        twin (T,) int64: the first ticket whose mask equals ticket t's (t itself when none before it does): tickets
            with one twin run as one.
        csr_ptr (T * O + 1,) int64, csr_idx (nnz,) int32: see the module docstring.
        input_grad: (stride, dilation) -> (ptr, entries), built on first use.
        plans: the backend's path choices for the groupings seen, kept with the masks they depend on.
    """

    indexed: Tensor
    density: Tensor
    all_ones: Tensor
    twin: Tensor
    csr_ptr: Tensor
    csr_idx: Tensor
    masks_shape: Tuple[int, ...]
    input_grad: Dict[tuple, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    plans: Dict[tuple, object] = field(default_factory=dict)


def count_kept(rows: Tensor) -> Tensor:
    """(R,) int64 kept counts of (R, K) bool rows, a few MB at a time: a reduction over bools makes an int64 copy
    of its input, 8 bytes a weight (146 MB for ResNet-18's last conv and 8 tickets at once)."""
    r, k = rows.shape
    out = torch.empty(r, dtype=torch.int64)
    step = max(1, (1 << 20) // max(1, k))
    for start in range(0, r, step):
        out[start : start + step] = rows[start : start + step].sum(1, dtype=torch.int64)
    return out


def ticket_twins(masks: Tensor) -> Tensor:
    """(T,) int64: for each ticket, the first ticket with an identical mask.

    Masks with different kept counts differ; only tickets with equal counts are compared element by element.

    Example:
        >>> m = torch.tensor([[True, False], [True, True], [True, False]])
        >>> ticket_twins(m).tolist()
        [0, 1, 0]
    """
    t = masks.shape[0]
    flat = masks.reshape(t, -1)
    counts = count_kept(flat).tolist()
    twin = list(range(t))
    for j in range(t):
        for i in range(j):
            if twin[i] == i and counts[i] == counts[j] and torch.equal(flat[i], flat[j]):
                twin[j] = i
                break
    return torch.tensor(twin, dtype=torch.int64)


def _rows_index(rows: Tensor, indexed: Tensor) -> Tuple[Tensor, Tensor]:
    """(ptr (T * R + 1,) int64, idx (nnz,) int32) of the kept columns of (T, R, K) bool rows, for the indexed
    tickets only. Ticket by ticket: nonzero() makes int64 pairs, so the whole stack at once would hold 16 bytes per
    kept weight of every ticket (ResNet-18 at 90 %, T = 8: 140 MB) for the int32 index it leaves."""
    t, r = rows.shape[:2]
    check_int32_columns("a conv mask", rows.shape[2])
    counts = torch.zeros(t, r, dtype=torch.int64)
    parts = []
    for i in range(t):
        if bool(indexed[i]):
            counts[i] = count_kept(rows[i])
            parts.append(rows[i].nonzero()[:, 1].to(torch.int32))  # (row, col) in order: CSR order
    ptr = torch.zeros(t * r + 1, dtype=torch.int64)
    torch.cumsum(counts.reshape(-1), 0, out=ptr[1:])
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    return ptr, idx


def compile_conv_index(masks: Tensor, max_density: float) -> ConvIndex:
    """Index the tickets of (T, O, C / groups, kh, kw) bool masks whose density is under ``max_density``."""
    t, o = masks.shape[:2]
    flat = masks.reshape(t, -1)
    kept = count_kept(flat)
    density = kept.float() / max(1, flat.shape[1])
    indexed = density < max_density
    ptr, idx = _rows_index(masks.reshape(t, o, -1), indexed)
    return ConvIndex(
        indexed=indexed,
        density=density,
        all_ones=kept == flat.shape[1],
        twin=ticket_twins(masks),
        csr_ptr=ptr,
        csr_idx=idx,
        masks_shape=tuple(masks.shape),
    )


def tap_phases(kernel: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tensor:
    """(kh * kw,) int64: the stride phase p = ph * stride_w + pw of each tap, ph = (tap_row * dilation_h) % stride_h.

    Example:
        >>> tap_phases((3, 3), (2, 2), (1, 1)).view(3, 3).tolist()
        [[0, 1, 0], [2, 3, 2], [0, 1, 0]]
    """
    rows = (torch.arange(kernel[0]) * dilation[0]) % stride[0]
    cols = (torch.arange(kernel[1]) * dilation[1]) % stride[1]
    return (rows.view(-1, 1) * stride[1] + cols.view(1, -1)).reshape(-1)


def input_gradient_index(
    index: ConvIndex, masks: Tensor, groups: int, stride: Tuple[int, int], dilation: Tuple[int, int]
) -> Tuple[Tensor, Tensor]:
    """(ptr (T * P * C + 1,) int64, entries (nnz,) int32) for the input gradient at this stride and dilation.

    Cached on ``index`` per (stride, dilation). P = stride_h * stride_w, C = groups * masks.shape[2].
    """
    key = (tuple(stride), tuple(dilation))
    cached = index.input_grad.get(key)
    if cached is not None:
        return cached
    t, o, cg, kh, kw = masks.shape
    og, c, taps = o // groups, groups * cg, kh * kw
    check_int32_columns("a conv mask's input-gradient index", og * taps)
    phase = tap_phases((kh, kw), stride, dilation)
    n_phases = stride[0] * stride[1]
    per_phase = [torch.nonzero(phase == p).flatten() for p in range(n_phases)]
    width = max(1, max(len(p) for p in per_phase))
    table = torch.full((n_phases, width), -1, dtype=torch.int64)
    for p, sel in enumerate(per_phase):
        table[p, : len(sel)] = sel
    # (T, G, Og, Cg, taps) -> (T, C, Og, taps): rows are absolute input channels c = g * Cg + c_local
    m = masks.reshape(t, groups, og, cg, taps).permute(0, 1, 3, 2, 4).reshape(t, c, og, taps)
    valid = table >= 0
    counts = torch.zeros(t, n_phases, c, dtype=torch.int64)
    parts = []
    for i in range(t):  # ticket by ticket, as _rows_index, to keep nonzero()'s int64 rows small
        if not bool(index.indexed[i]):
            continue
        rows = (m[i][..., table.clamp(min=0)] & valid).permute(2, 0, 1, 3)  # (P, C, Og, width)
        counts[i] = count_kept(rows.reshape(n_phases * c, -1)).view(n_phases, c)
        hits = rows.nonzero()  # (hits, 4): p, c, og, j in row order
        parts.append((hits[:, 2] * taps + table[hits[:, 0], hits[:, 3]]).to(torch.int32))
    ptr = torch.zeros(t * n_phases * c + 1, dtype=torch.int64)
    torch.cumsum(counts.reshape(-1), 0, out=ptr[1:])
    entries = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    index.input_grad[key] = (ptr, entries)
    return ptr, entries
