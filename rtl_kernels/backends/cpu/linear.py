"""The cpu backend's routed linear: the sparse kernels (csrc/cpu/routed_linear_kernels.cpp) for sparse tickets,
MKL on W * M_t for the others, one GEMM per mask class.

Each ticket present in a batch takes one of two paths, chosen per call by :func:`policy.linear_ticket_is_sparse`
from its density and its rows:
- sparse: per output row, the list of kept inputs (CSR over W; a transposed CSC index for the input gradient).
  The kernel gathers the ticket's rows into transposed 64-row tiles and applies each kept weight to a whole tile
  with vector FMAs.
- dense: tickets with identical masks (a class) run as one GEMM on their gathered rows, with W itself when the
  mask keeps everything; a class holding the whole batch needs no gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...formats.cpu_csr import CpuLinearLayout, compile_cpu_layout
from ...layout_cache import get_layout
from . import policy as _policy
from . import trace
from .classes import MaskClass, class_rows, present_classes
from .weights import apply_mask, masked_weight, scratch


def layout_of(masks: Tensor) -> CpuLinearLayout:
    """The masks' compiled layout (cached per mask version and indexing threshold)."""
    limit = _policy.current_policy().indexed_max_density
    return get_layout(f"cpu:linear:{limit}", masks, lambda m: compile_cpu_layout(m, limit))


def choose_paths(layout: CpuLinearLayout, perm: Tensor, offsets: Tensor, op: str = "linear_forward"):
    """Per call: (ticket_sparse (T,) uint8 for the kernels, [(class, its rows or None)] for the dense path).

    rows is None when a dense class holds the whole batch (no gather: T = 1 costs one dense masked GEMM).
    """
    bounds = offsets.tolist()
    pol = _policy.current_policy()
    density, indexed = layout.density.tolist(), layout.indexed.tolist()
    sparse = [
        indexed[t] and _policy.linear_ticket_is_sparse(density[t], bounds[t + 1] - bounds[t], pol)
        for t in range(len(bounds) - 1)
    ]
    # the kernels compute the sparse tickets; the others run by mask class
    classes = present_classes(layout.twin.tolist(), bounds, skip=sparse)
    dense = [(c, class_rows(c, perm, bounds)) for c in classes]
    if trace.active():
        trace.record(
            op=op,
            weight_shape=tuple(layout_shape(layout)),
            path="mixed",
            sparse_tickets=sum(1 for t, s in enumerate(sparse) if s and bounds[t + 1] > bounds[t]),
            dense_classes=len(dense),
        )
    return torch.tensor(sparse, dtype=torch.uint8), dense


def layout_shape(layout: CpuLinearLayout):
    """(N, K) of the layer a layout indexes."""
    return (layout.csr_ptr.shape[0] - 1) // layout.density.shape[0], (
        layout.csc_ptr.shape[0] - 1
    ) // layout.density.shape[0]


def _rows_of(src: Tensor, rows: Tensor, name: str) -> Tensor:
    out = scratch.get(name, (rows.shape[0], src.shape[1]), src.dtype)
    return torch.index_select(src, 0, rows, out=out)


def _all_ones(layout: CpuLinearLayout, cls: MaskClass) -> bool:
    return bool(layout.all_ones[cls.ticket])


def forward(x, weight, masks, layout, bias, perm, offsets):
    """y (B, N) of the routed masked linear; weight (N, K) and masks (T, N, K)."""
    ticket_sparse, dense = choose_paths(layout, perm, offsets)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    if bool(ticket_sparse.any()):
        torch.ops.rtl_kernels._cpu_linear_forward(
            x, weight, bias, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_chunk_ptr, layout.csr_idx, y
        )
    for cls, rows in dense:
        w_t = masked_weight(weight, masks, cls.ticket, _all_ones(layout, cls))
        x_t = x if rows is None else _rows_of(x, rows, "rows_in")
        y_t = y if rows is None else scratch.get("rows_out", (rows.shape[0], y.shape[1]), y.dtype)
        torch.addmm(bias, x_t, w_t.t(), out=y_t) if bias is not None else torch.mm(x_t, w_t.t(), out=y_t)
        if rows is not None:
            y.index_copy_(0, rows, y_t)
    return y


def grad_input(grad_y, weight, masks, layout, perm, offsets):
    """dx (B, K) = grad_y[i] @ (weight * masks[route[i]])."""
    ticket_sparse, dense = choose_paths(layout, perm, offsets, "linear_grad_input")
    dx = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
    if bool(ticket_sparse.any()):
        torch.ops.rtl_kernels._cpu_linear_grad_input(
            grad_y, weight, perm, offsets, ticket_sparse, layout.csc_ptr, layout.csc_chunk_ptr, layout.csc_idx, dx
        )
    for cls, rows in dense:
        w_t = masked_weight(weight, masks, cls.ticket, _all_ones(layout, cls))
        if rows is None:
            torch.mm(grad_y, w_t, out=dx)
        else:
            dx_t = scratch.get("rows_out", (rows.shape[0], dx.shape[1]), dx.dtype)
            torch.mm(_rows_of(grad_y, rows, "rows_in"), w_t, out=dx_t)
            dx.index_copy_(0, rows, dx_t)
    return dx


def grad_weight(grad_y, x, masks, layout, perm, offsets):
    """dW (N, K): every class's dy.T @ x masked by its mask, summed; zero outside the present tickets' masks."""
    ticket_sparse, dense = choose_paths(layout, perm, offsets, "linear_grad_weight")
    dw = grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
    if bool(ticket_sparse.any()):
        torch.ops.rtl_kernels._cpu_linear_grad_weight(
            grad_y, x, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_idx, dw
        )
    for cls, rows in dense:
        if rows is None:
            dy_t, x_t = grad_y, x
        else:
            dy_t, x_t = _rows_of(grad_y, rows, "rows_out"), _rows_of(x, rows, "rows_in")
        if _all_ones(layout, cls):
            dw.addmm_(dy_t.t(), x_t)
            continue
        product = scratch.get("masked_weight", dw.shape, dw.dtype)
        torch.mm(dy_t.t(), x_t, out=product)
        dw += apply_mask(product, masks, cls.ticket, out=product)
    return dw
