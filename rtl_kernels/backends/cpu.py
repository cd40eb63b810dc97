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

# Density under which the sparse kernel beats MKL on the masked dense weight. Measured on the 2-core AVX2
# machine (bench/bench_cpu_threshold.py, results in bench/results/): see the README's performance section.
SPARSE_MAX_DENSITY = float(os.environ.get("RTL_CPU_SPARSE_MAX_DENSITY", "0.6"))


@dataclass(frozen=True)
class CpuLinearLayout:
    """Compiled masks of one routed linear layer for the cpu backend.

    Attributes:
        ticket_sparse (T,) uint8: 1 where the ticket runs on the sparse kernel.
        dense_tickets: ids of the tickets that run as dense masked GEMMs.
        csr_ptr (T * N + 1,) int64 / csr_idx int32: kept inputs of output n of sparse ticket t.
        csc_ptr (T * K + 1,) int64 / csc_idx int32: kept outputs of input k of sparse ticket t.
        density (T,) float: kept fraction of each ticket.
    """

    ticket_sparse: Tensor
    dense_tickets: tuple
    csr_ptr: Tensor
    csr_idx: Tensor
    csc_ptr: Tensor
    csc_idx: Tensor
    density: Tensor


def _index(masks: Tensor):
    """Row pointer (T * rows + 1,) int64 and column indices int32 of (T, rows, cols) bool masks."""
    t, rows, _ = masks.shape
    ptr = torch.zeros(t * rows + 1, dtype=torch.int64)
    torch.cumsum(masks.sum(2, dtype=torch.int64).reshape(-1), 0, out=ptr[1:])
    idx = masks.nonzero()[:, 2].to(torch.int32)  # nonzero() walks (t, row, col) in order: CSR order
    return ptr, idx


def compile_cpu_layout(masks: Tensor, sparse_max_density: Optional[float] = None) -> CpuLinearLayout:
    """Compile (T, N, K) bool masks into the cpu backend's layout."""
    threshold = SPARSE_MAX_DENSITY if sparse_max_density is None else sparse_max_density
    t = masks.shape[0]
    density = masks.reshape(t, -1).float().mean(1)
    sparse = density < threshold
    sparse_masks = masks & sparse.view(t, 1, 1)
    csr_ptr, csr_idx = _index(sparse_masks)
    csc_ptr, csc_idx = _index(sparse_masks.transpose(1, 2))
    return CpuLinearLayout(
        ticket_sparse=sparse.to(torch.uint8),
        dense_tickets=tuple(i for i in range(t) if not bool(sparse[i])),
        csr_ptr=csr_ptr,
        csr_idx=csr_idx,
        csc_ptr=csc_ptr,
        csc_idx=csc_idx,
        density=density,
    )


def _layout(masks: Tensor) -> CpuLinearLayout:
    return get_layout(f"cpu:linear:{SPARSE_MAX_DENSITY}", masks, compile_cpu_layout)


def _dense_rows(layout: CpuLinearLayout, perm: Tensor, offsets: Tensor):
    """(ticket, rows or None) of the dense tickets present; rows is None when the ticket holds the whole batch."""
    if not layout.dense_tickets:
        return
    bounds = offsets.tolist()
    batch = bounds[-1]
    for t in layout.dense_tickets:
        lo, hi = bounds[t], bounds[t + 1]
        if hi > lo:
            yield t, (None if hi - lo == batch else perm[lo:hi])


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
        y = x.new_empty((x.shape[0], weight.shape[0]))
        torch.ops.rtl_kernels._cpu_linear_forward(
            x, weight, bias, perm, offsets, layout.ticket_sparse, layout.csr_ptr, layout.csr_idx, y
        )
        for t, rows in _dense_rows(layout, perm, offsets):
            w_t = _masked(weight, masks[t])
            if rows is None:
                torch.addmm(bias, x, w_t.t(), out=y) if bias is not None else torch.mm(x, w_t.t(), out=y)
            else:
                y.index_copy_(0, rows, F.linear(x.index_select(0, rows), w_t, bias))
        return y

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        layout = _layout(masks)
        dx = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
        torch.ops.rtl_kernels._cpu_linear_grad_input(
            grad_y, weight, perm, offsets, layout.ticket_sparse, layout.csc_ptr, layout.csc_idx, dx
        )
        for t, rows in _dense_rows(layout, perm, offsets):
            w_t = _masked(weight, masks[t])
            if rows is None:
                torch.mm(grad_y, w_t, out=dx)
            else:
                dx.index_copy_(0, rows, grad_y.index_select(0, rows) @ w_t)
        return dx

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        layout = _layout(masks)
        dw = grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
        torch.ops.rtl_kernels._cpu_linear_grad_weight(
            grad_y, x, perm, offsets, layout.ticket_sparse, layout.csr_ptr, layout.csr_idx, dw
        )
        zero = torch.zeros((), dtype=dw.dtype)
        for t, rows in _dense_rows(layout, perm, offsets):
            dy_t, x_t = (grad_y, x) if rows is None else (grad_y.index_select(0, rows), x.index_select(0, rows))
            # where(), not a multiply: exact zeros outside the mask even for inf/NaN gradients.
            dw += torch.where(masks[t], dy_t.t() @ x_t, zero)
        return dw


BACKEND = CpuBackend()
