"""The cpu backend: C++ routed sparse kernels (csrc/cpu) for sparse tickets, dense masked GEMMs for dense ones.

Each ticket takes one of two paths, chosen per mask version from the ticket's density:
- sparse (density < ``SPARSE_MAX_DENSITY``): per output row, the list of kept inputs (CSR over W; a transposed
  CSC index for the input gradient). The kernel gathers the ticket's rows into transposed 64-row tiles and applies
  each kept weight to a whole tile with vector FMAs (csrc/cpu/routed_linear_kernels.cpp).
- dense: ``F.linear(x_t, W * M_t)`` through MKL, gathering the ticket's rows (none when one ticket holds the batch,
  which keeps T = 1 at the cost of one dense masked layer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from ..layout_cache import get_layout
from .base import Backend

# Density under which the sparse kernel beats MKL on the masked dense weight, for tickets with at least
# SMALL_GROUP_ROWS rows in the batch (measured, 2-core AVX2 EPYC, 2,048 rows, W 1024x1024, T = 8: sparse/dense
# time 0.37 at 10 %, 1.0 at 50 %; INR 128x128, 65,536 rows: sparse faster than dense up to ~75 % density).
SPARSE_MAX_DENSITY = float(os.environ.get("RTL_CPU_SPARSE_MAX_DENSITY", "0.55"))
# Tickets with few rows fill only part of a 64-row tile, so the sparse kernel loses its row vectorisation
# earlier (256 rows, T = 8, 32 rows a ticket: sparse/dense 0.65 at 10 %, 2.7 at 50 %).
SMALL_GROUP_ROWS = 48
SMALL_GROUP_MAX_DENSITY = float(os.environ.get("RTL_CPU_SMALL_GROUP_MAX_DENSITY", "0.2"))


@dataclass(frozen=True)
class CpuLinearLayout:
    """Compiled masks of one routed linear layer for the cpu backend.

    Attributes:
        indexed (T,) bool: tickets sparse enough to ever take the sparse kernel (indexed below); whether a
            ticket does in one call also depends on its rows in that batch (see :func:`_choose_paths`).
        csr_ptr (T * N + 1,) int64 / csr_idx int32: kept inputs of output n of sparse ticket t.
        csr_chunk_ptr (T * N * ceil(K / CHUNK) + 1,) int64: the same entries cut every CHUNK inputs.
        csc_ptr (T * K + 1,) int64 / csc_idx int32: kept outputs of input k of sparse ticket t.
        csc_chunk_ptr (T * K * ceil(N / CHUNK) + 1,) int64: likewise.
        density (T,) float: kept fraction of each ticket.
    """

    indexed: Tensor
    csr_ptr: Tensor
    csr_chunk_ptr: Tensor
    csr_idx: Tensor
    csc_ptr: Tensor
    csc_chunk_ptr: Tensor
    csc_idx: Tensor
    density: Tensor


# Inputs per chunk of the chunked walk in csrc/cpu (must match kChunk there): 64 inputs of a 64-row tile are
# 16 KB, half of L1.
CHUNK = 64


def _index(masks: Tensor):
    """Row pointer (T * rows + 1,), chunk pointer (T * rows * C + 1,) int64 and column indices int32 of
    (T, rows, cols) bool masks, C = ceil(cols / CHUNK)."""
    t, rows, cols = masks.shape
    n_chunks = max(1, -(-cols // CHUNK))
    padded = F.pad(masks, (0, n_chunks * CHUNK - cols))
    per_chunk = padded.reshape(t * rows, n_chunks, CHUNK).sum(2, dtype=torch.int64).reshape(-1)
    chunk_ptr = torch.zeros(t * rows * n_chunks + 1, dtype=torch.int64)
    torch.cumsum(per_chunk, 0, out=chunk_ptr[1:])
    ptr = chunk_ptr[::n_chunks].contiguous()  # row boundaries are every C-th chunk boundary
    idx = masks.nonzero()[:, 2].to(torch.int32)  # nonzero() walks (t, row, col) in order: CSR order
    return ptr, chunk_ptr, idx


def compile_cpu_layout(masks: Tensor, sparse_max_density: Optional[float] = None) -> CpuLinearLayout:
    """Compile (T, N, K) bool masks into the cpu backend's layout."""
    threshold = max(SPARSE_MAX_DENSITY, SMALL_GROUP_MAX_DENSITY) if sparse_max_density is None else sparse_max_density
    t = masks.shape[0]
    density = masks.reshape(t, -1).float().mean(1)
    sparse = density < threshold
    sparse_masks = masks & sparse.view(t, 1, 1)
    csr_ptr, csr_chunk_ptr, csr_idx = _index(sparse_masks)
    csc_ptr, csc_chunk_ptr, csc_idx = _index(sparse_masks.transpose(1, 2))
    return CpuLinearLayout(
        indexed=sparse,
        csr_ptr=csr_ptr,
        csr_chunk_ptr=csr_chunk_ptr,
        csr_idx=csr_idx,
        csc_ptr=csc_ptr,
        csc_chunk_ptr=csc_chunk_ptr,
        csc_idx=csc_idx,
        density=density,
    )


def _layout(masks: Tensor) -> CpuLinearLayout:
    return get_layout("cpu:linear", masks, compile_cpu_layout)


def _choose_paths(layout: CpuLinearLayout, perm: Tensor, offsets: Tensor, forced_sparse: bool = False):
    """Per call: (ticket_sparse (T,) uint8 for the kernels, [(ticket, rows or None)] for the dense path).

    A ticket takes the sparse kernel when its density is under the threshold for its row count in this batch;
    rows is None when a dense ticket holds the whole batch (no gather: T = 1 costs one dense masked GEMM).
    """
    counts = (offsets[1:] - offsets[:-1]).tolist()
    batch = int(offsets[-1])
    density = layout.density.tolist()
    indexed = layout.indexed.tolist()
    sparse = []
    dense = []
    for t, rows in enumerate(counts):
        limit = SPARSE_MAX_DENSITY if rows >= SMALL_GROUP_ROWS else SMALL_GROUP_MAX_DENSITY
        take_sparse = indexed[t] and (forced_sparse or density[t] < limit)
        sparse.append(take_sparse)
        if rows and not take_sparse:
            lo = int(offsets[t])
            dense.append((t, None if rows == batch else perm[lo : lo + rows]))
    return torch.tensor(sparse, dtype=torch.uint8), dense


def _masked(weight: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self, device, dtype):
        module, reason = _extension.load("_C")
        if module is None:
            return reason
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only, got device {device}"
        if dtype != torch.float32:
            return f"the cpu backend computes in float32 only, got {dtype}"
        return None

    def linear_forward(self, x, weight, masks, bias, perm, offsets):
        layout = _layout(masks)
        ticket_sparse, dense = _choose_paths(layout, perm, offsets)
        y = x.new_empty((x.shape[0], weight.shape[0]))
        torch.ops.rtl_kernels._cpu_linear_forward(
            x, weight, bias, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_chunk_ptr, layout.csr_idx, y
        )
        for t, rows in dense:
            w_t = _masked(weight, masks[t])
            if rows is None:
                torch.addmm(bias, x, w_t.t(), out=y) if bias is not None else torch.mm(x, w_t.t(), out=y)
            else:
                y.index_copy_(0, rows, F.linear(x.index_select(0, rows), w_t, bias))
        return y

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        layout = _layout(masks)
        ticket_sparse, dense = _choose_paths(layout, perm, offsets)
        dx = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
        torch.ops.rtl_kernels._cpu_linear_grad_input(
            grad_y, weight, perm, offsets, ticket_sparse, layout.csc_ptr, layout.csc_chunk_ptr, layout.csc_idx, dx
        )
        for t, rows in dense:
            w_t = _masked(weight, masks[t])
            if rows is None:
                torch.mm(grad_y, w_t, out=dx)
            else:
                dx.index_copy_(0, rows, grad_y.index_select(0, rows) @ w_t)
        return dx

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        layout = _layout(masks)
        ticket_sparse, dense = _choose_paths(layout, perm, offsets)
        dw = grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
        torch.ops.rtl_kernels._cpu_linear_grad_weight(
            grad_y, x, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_idx, dw
        )
        zero = torch.zeros((), dtype=dw.dtype)
        for t, rows in dense:
            dy_t, x_t = (grad_y, x) if rows is None else (grad_y.index_select(0, rows), x.index_select(0, rows))
            # where(), not a multiply: exact zeros outside the mask even for inf/NaN gradients.
            dw += torch.where(masks[t], dy_t.t() @ x_t, zero)
        return dw


BACKEND = CpuBackend()
