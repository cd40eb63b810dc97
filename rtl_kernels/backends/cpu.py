"""The cpu backend: C++ routed sparse kernels (csrc/cpu) for sparse tickets, dense masked GEMMs for dense ones.

Each ticket present in a batch takes one of two paths, chosen per call from its density and its rows:
- sparse (density < ``SPARSE_MAX_DENSITY``, or ``SMALL_GROUP_MAX_DENSITY`` for tickets with few rows): per output
  row, the list of kept inputs (CSR over W; a transposed CSC index for the input gradient). The kernel gathers the
  ticket's rows into transposed 64-row tiles and applies each kept weight to a whole tile with vector FMAs
  (csrc/cpu/routed_linear_kernels.cpp).
- dense: MKL on ``W * M_t`` with the ticket's rows gathered (none when one ticket holds the batch, which keeps
  T = 1 at the cost of one dense masked layer).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from ..conv_geometry import conv_output_size
from ..layout_cache import get_layout
from .base import Backend

# Density under which the sparse kernel beats the dense path (MKL on W * M_t with gathered rows), for tickets
# with at least SMALL_GROUP_ROWS rows in the batch. Measured on the 2-core AVX2 EPYC, fp32, ratio sparse/dense
# time: W 1024x1024, 2,048 rows, T = 8: 0.37 at 10 %, 0.8 at 50 %, ~1.0 at 60-70 %; INR 128x128, 65,536 rows,
# T = 10: sparse ahead of dense up to ~75 %.
SPARSE_MAX_DENSITY = float(os.environ.get("RTL_CPU_SPARSE_MAX_DENSITY", "0.6"))
# Tickets with few rows fill only part of a 64-row tile, so the sparse kernel loses its row vectorisation
# earlier (256 rows, T = 8, 32 rows a ticket: sparse/dense 0.65 at 10 %, 2.7 at 50 %).
SMALL_GROUP_ROWS = 48
SMALL_GROUP_MAX_DENSITY = float(os.environ.get("RTL_CPU_SMALL_GROUP_MAX_DENSITY", "0.2"))

# RTL_CPU_ISA caps the instruction set the C++ kernels choose (the extension reads it once, when it first runs, and
# would take a value it does not know as no cap): checked here, so that a misspelt cap fails instead.
CPU_ISA_CAPS = ("generic", "avx2", "avx512")


def _isa_cap_from_env() -> Optional[str]:
    """RTL_CPU_ISA if set and not empty (one of CPU_ISA_CAPS, else ValueError), or None."""
    cap = os.environ.get("RTL_CPU_ISA") or None
    if cap is not None and cap not in CPU_ISA_CAPS:
        raise ValueError(f"RTL_CPU_ISA must be one of {', '.join(CPU_ISA_CAPS)} (or unset), got {cap!r}")
    return cap


_isa_cap_from_env()  # a misspelt cap fails this module's import: the backend is unavailable, with this reason


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
    float_masks: dict  # ticket -> masks[t] as float32 (N, K), made on first use by the dense path


# Inputs per chunk of the chunked walk of the kernels (csrc/cpu reads the chunk pointers, whatever their size):
# 64 inputs of a 64-row tile are 16 KB, half of L1.
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
    if sparse_max_density is None:
        sparse_max_density = max(SPARSE_MAX_DENSITY, SMALL_GROUP_MAX_DENSITY)
    threshold = sparse_max_density
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
        float_masks={},
    )


def _layout(masks: Tensor) -> CpuLinearLayout:
    return get_layout("cpu:linear", masks, compile_cpu_layout)


def _sparse_tickets(layout: CpuLinearLayout, rows_per_ticket) -> list:
    """Which tickets take the sparse kernel, given each ticket's GEMM rows in this call."""
    density, indexed = layout.density.tolist(), layout.indexed.tolist()
    return [
        indexed[t] and density[t] < (SPARSE_MAX_DENSITY if rows >= SMALL_GROUP_ROWS else SMALL_GROUP_MAX_DENSITY)
        for t, rows in enumerate(rows_per_ticket)
    ]


def _choose_paths(layout: CpuLinearLayout, perm: Tensor, offsets: Tensor):
    """Per call: (ticket_sparse (T,) uint8 for the kernels, [(ticket, rows or None)] for the dense path).

    rows is None when a dense ticket holds the whole batch (no gather: T = 1 costs one dense masked GEMM).
    """
    counts = (offsets[1:] - offsets[:-1]).tolist()
    batch = int(offsets[-1])
    sparse = _sparse_tickets(layout, counts)
    dense = []
    for t, rows in enumerate(counts):
        if rows and not sparse[t]:
            lo = int(offsets[t])
            dense.append((t, None if rows == batch else perm[lo : lo + rows]))
    return torch.tensor(sparse, dtype=torch.uint8), dense


class _Scratch(threading.local):
    """Per-thread buffers reused by the dense path across calls.

    A fresh multi-MB temporary per ticket and call (W * M_t, gathered rows, their product) is faulted in page by
    page, and on the 2-core VM those faults cost more than the GEMMs (1024x1024 at 50 %, T = 8: 64 ms with fresh
    temporaries against 34 ms for one dense F.linear).
    """

    def __init__(self) -> None:
        self.buffers = {}

    def get(self, name: str, shape, dtype) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


_scratch = _Scratch()


def _apply_mask(values: Tensor, float_masks: dict, masks: Tensor, t: int, out: Tensor) -> Tensor:
    """values * masks[t] into out, with exact zeros where pruned even when values hold inf/NaN.

    A multiply by a cached float mask is 18x faster than torch.where on this CPU (0.14 vs 2.5 ms for 1024x1024);
    where() runs only when the product may hold inf/NaN (a non-finite sum: any inf/NaN element makes the sum
    non-finite, and a finite sum proves there is none), to keep inf * 0 = NaN out of pruned positions.
    """
    fmask = float_masks.get(t)
    if fmask is None:
        fmask = float_masks.setdefault(t, masks[t].to(values.dtype))
    torch.mul(values, fmask, out=out)
    if not bool(torch.isfinite(out.sum())):
        torch.where(masks[t], values, torch.zeros((), dtype=values.dtype), out=out)
    return out


def _masked(weight: Tensor, layout: CpuLinearLayout, masks: Tensor, t: int) -> Tensor:
    """weight * masks[t] in a reused buffer."""
    return _apply_mask(weight, layout.float_masks, masks, t, _scratch.get("masked_weight", weight.shape, weight.dtype))


def _rows_of(src: Tensor, rows: Tensor, name: str) -> Tensor:
    out = _scratch.get(name, (rows.shape[0], src.shape[1]), src.dtype)
    return torch.index_select(src, 0, rows, out=out)


def _linear_forward(x, weight, masks, layout, bias, perm, offsets):
    """y (B, N) of the routed masked linear; weight (N, K) and masks (T, N, K) may be views (conv's 2-D form)."""
    ticket_sparse, dense = _choose_paths(layout, perm, offsets)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    torch.ops.rtl_kernels._cpu_linear_forward(
        x, weight, bias, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_chunk_ptr, layout.csr_idx, y
    )
    for t, rows in dense:
        w_t = _masked(weight, layout, masks, t)
        x_t = x if rows is None else _rows_of(x, rows, "rows_in")
        y_t = y if rows is None else _scratch.get("rows_out", (rows.shape[0], y.shape[1]), y.dtype)
        torch.addmm(bias, x_t, w_t.t(), out=y_t) if bias is not None else torch.mm(x_t, w_t.t(), out=y_t)
        if rows is not None:
            y.index_copy_(0, rows, y_t)
    return y


def _linear_grad_input(grad_y, weight, masks, layout, perm, offsets):
    ticket_sparse, dense = _choose_paths(layout, perm, offsets)
    dx = grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
    torch.ops.rtl_kernels._cpu_linear_grad_input(
        grad_y, weight, perm, offsets, ticket_sparse, layout.csc_ptr, layout.csc_chunk_ptr, layout.csc_idx, dx
    )
    for t, rows in dense:
        w_t = _masked(weight, layout, masks, t)
        if rows is None:
            torch.mm(grad_y, w_t, out=dx)
        else:
            dx_t = _scratch.get("rows_out", (rows.shape[0], dx.shape[1]), dx.dtype)
            torch.mm(_rows_of(grad_y, rows, "rows_in"), w_t, out=dx_t)
            dx.index_copy_(0, rows, dx_t)
    return dx


def _linear_grad_weight(grad_y, x, masks, layout, perm, offsets):
    ticket_sparse, dense = _choose_paths(layout, perm, offsets)
    dw = grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
    torch.ops.rtl_kernels._cpu_linear_grad_weight(
        grad_y, x, perm, offsets, ticket_sparse, layout.csr_ptr, layout.csr_idx, dw
    )
    for t, rows in dense:
        if rows is None:
            dy_t, x_t = grad_y, x
        else:
            dy_t, x_t = _rows_of(grad_y, rows, "rows_out"), _rows_of(x, rows, "rows_in")
        product = _scratch.get("masked_weight", dw.shape, dw.dtype)
        torch.mm(dy_t.t(), x_t, out=product)
        dw += _apply_mask(product, layout.float_masks, masks, t, out=product)
    return dw


# Unfolded rows of one chunk of images stay under this many bytes: the whole batch's im2col buffer is never
# materialised (GhostNet's stem at batch 320 would be 60 MB, ResNet 3x3 at 56x56 with C = 256 over 1 GB).
IM2COL_CHUNK_BYTES = 32 << 20
# A standard conv's ticket takes the sparse kernel on unfolded columns when its density is under
# CONV_SPARSE_MAX_DENSITY and the conv has at least CONV_SPARSE_MIN_K inputs an output (C * kh * kw); otherwise
# torch's convolution (oneDNN, no im2col) runs with W * M_t on that ticket's images. Measured on the 2-core EPYC,
# fp32, 3x3 convs, T = 8, batch 64, forward / forward+backward ms, sparse vs direct:
#   C = 64 at 16x16 (K = 576): direct ahead at every density, 5 % included (19 / 73 vs 19 / 48);
#   C = 128 at 8x8: 10 %: 14 / 48 vs 16 / 51, 30 %: 17 / 57 vs 17 / 45;
#   C = 256 at 14x14: 5 %: 79 / 310 vs 133 / 426, 10 %: 89 / 380 vs 133 / 456, 20 %: 140 / 490 vs 133 / 433;
#   C = 512 at 2x2: 10 %: 22 / 101 vs 45 / 253, 20 %: 48 / 196 vs 44 / 254.
# On a 2-core AVX-512 EPYC with the AVX-512 kernels, batch 64, T = 8, 3x3: C = 128 (K = 1,152) went to direct
# (8x8: 5 %: 3.6 / 14.3 vs 3.7 / 12.3, 10 %: 4.2 / 15.3 vs 3.6 / 11.8; 16x16 at 10 %: 17.1 / 61.4 vs 11.8 / 37.9)
# while C = 256 at 4x4 (10 %: 3.4 / 14.4 vs 4.5 / 16.7) and C = 512 at 2x2 (9.7 / 35.2 vs 10.4 / 47.3) stayed
# sparse. Hence K >= 2,048: C = 128 gives up about 1.1x on the AVX2 machine to gain 1.2-1.6x on AVX-512 ones.
CONV_SPARSE_MAX_DENSITY = float(os.environ.get("RTL_CPU_CONV_SPARSE_MAX_DENSITY", "0.15"))
CONV_SPARSE_MIN_K = int(os.environ.get("RTL_CPU_CONV_SPARSE_MIN_K", "2048"))


def _conv_as_linear(weight: Optional[Tensor], masks: Tensor):
    """The conv's (O, C*kh*kw) weight and (T, O, C*kh*kw) masks views, and the layout cached on the masks."""
    t, o = masks.shape[:2]
    m2d = masks.reshape(t, o, -1)
    layout = get_layout("cpu:conv2d", masks, lambda m: compile_cpu_layout(m.reshape(t, o, -1)))
    return (None if weight is None else weight.reshape(o, -1)), m2d, layout


class _Chunk:
    """A run of the ticket-sorted images: images (b,) their batch indices, local (b,) = arange, img_offsets (T + 1,)
    the run's images of each ticket (positions within the run)."""

    def __init__(self, images: Tensor, img_offsets: list):
        self.images = images
        self.count = images.shape[0]
        self.local = torch.arange(self.count, dtype=torch.int64)
        self.bounds = img_offsets
        self.img_offsets = torch.tensor(img_offsets, dtype=torch.int64)

    def span(self, t: int):
        return self.bounds[t], self.bounds[t + 1]


def _image_chunks(perm: Tensor, offsets: Tensor, pixels: int, cols: int):
    """Runs of the ticket-sorted images whose unfolded columns fit IM2COL_CHUNK_BYTES."""
    per_chunk = max(1, IM2COL_CHUNK_BYTES // max(1, pixels * cols * 4))
    batch = perm.shape[0]
    bounds = offsets.tolist()
    for lo in range(0, batch, per_chunk):
        hi = min(batch, lo + per_chunk)
        yield _Chunk(perm[lo:hi], [min(max(b, lo), hi) - lo for b in bounds])


def _conv_paths(layout: CpuLinearLayout, offsets: Tensor, pixels: int, inputs: int):
    """(ticket_sparse (T,) uint8, dense ticket ids) for a conv whose tickets hold images x pixels GEMM rows of
    ``inputs`` (C * kh * kw) values.

    A conv's dense alternative is torch's own convolution on W * M_t (no im2col), faster than the masked GEMM on
    unfolded columns that the linear thresholds were measured against: hence CONV_SPARSE_MAX_DENSITY and
    CONV_SPARSE_MIN_K.
    """
    counts = ((offsets[1:] - offsets[:-1]) * pixels).tolist()
    density = layout.density.tolist()
    sparse = [s and density[t] < CONV_SPARSE_MAX_DENSITY and inputs >= CONV_SPARSE_MIN_K
              for t, s in enumerate(_sparse_tickets(layout, counts))]
    dense = [t for t, rows in enumerate(counts) if rows and not sparse[t]]
    return torch.tensor(sparse, dtype=torch.uint8), dense


def _sparse_images(perm: Tensor, offsets: Tensor, ticket_sparse: Tensor):
    """The grouping restricted to the sparse tickets' images: (perm (b,), offsets (T + 1,)), dense tickets empty.

    perm is ticket-sorted, so keeping the sparse tickets' positions keeps it sorted.
    """
    counts = (offsets[1:] - offsets[:-1]) * ticket_sparse.to(torch.int64)
    keep = torch.repeat_interleave(ticket_sparse.bool(), offsets[1:] - offsets[:-1])
    new_offsets = torch.zeros_like(offsets)
    torch.cumsum(counts, 0, out=new_offsets[1:])
    return perm[keep], new_offsets


def _scratch_columns(name: str, images: int, channels: int, pixels: int, dtype) -> Tensor:
    """(images, channels, pixels) in a reused buffer with one spare vector at the end: the kernels read whole
    8-float vectors, past the last pixel of the last channel."""
    flat = _scratch.get(name, (images * channels * pixels + 8,), dtype)
    return flat[: images * channels * pixels].view(images, channels, pixels)


def _columns(x: Tensor, images: Tensor, kernel, stride, padding, dilation, pixels: int) -> Tensor:
    """Unfolded columns (b, C * kh * kw, Ho * Wo) of the chunk's images, in reused buffers."""
    batch = _scratch.get("conv_images", (images.shape[0],) + tuple(x.shape[1:]), x.dtype)
    torch.index_select(x, 0, images, out=batch)
    cols = _scratch_columns("cols", images.shape[0], x.shape[1] * kernel[0] * kernel[1], pixels, x.dtype)
    torch._C._nn.im2col(batch, tuple(kernel), tuple(dilation), tuple(padding), tuple(stride), out=cols)
    return cols


def _single_ticket(offsets: Tensor) -> Optional[int]:
    """The ticket holding the whole batch, or None when the batch mixes tickets.

    A batch routed to one ticket (Alg. 2's sequential retraining steps, IMP's per-subset training) is one
    torch convolution with W * M_t: no grouping, no copies of the images.
    """
    present = ((offsets[1:] - offsets[:-1]) > 0).nonzero()
    return int(present[0, 0]) if present.shape[0] == 1 else None


def _direct_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups,
                         which=None, out=None):
    """torch's convolution with W * M_t on each ticket's images; ``which`` limits it to those tickets (their
    images of ``out`` are written, the others left as they are)."""
    only = _single_ticket(offsets) if which is None else None
    if only is not None:  # the stable grouping of a one-ticket batch is the identity permutation
        return F.conv2d(x, _masked_conv_weight(weight, masks, only), bias, stride, padding, dilation, groups)
    y = out
    for t, rows in _tickets(perm, offsets, which):
        y_t = F.conv2d(x.index_select(0, rows), _masked_conv_weight(weight, masks, t), bias, stride, padding,
                       dilation, groups)
        if y is None:
            y = x.new_empty((x.shape[0],) + tuple(y_t.shape[1:]))
        y.index_copy_(0, rows, y_t)
    return y


def _direct_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups,
                            which=None, out=None):
    only = _single_ticket(offsets) if which is None else None
    if only is not None:
        return torch.nn.grad.conv2d_input(tuple(input_shape), _masked_conv_weight(weight, masks, only), grad_y,
                                          stride, padding, dilation, groups)
    dx = grad_y.new_zeros(input_shape) if out is None else out
    for t, rows in _tickets(perm, offsets, which):
        dx.index_copy_(0, rows, torch.nn.grad.conv2d_input(
            (rows.shape[0],) + tuple(input_shape[1:]), _masked_conv_weight(weight, masks, t),
            grad_y.index_select(0, rows), stride, padding, dilation, groups))
    return dx


def _direct_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups, which=None):
    only = _single_ticket(offsets) if which is None else None
    if only is not None:
        g = torch.nn.grad.conv2d_weight(x, masks.shape[1:], grad_y, stride, padding, dilation, groups)
        return _apply_mask(g, _direct_float_masks(masks), masks, only, out=g)
    dw = grad_y.new_zeros(masks.shape[1:])
    for t, rows in _tickets(perm, offsets, which):
        g = torch.nn.grad.conv2d_weight(x.index_select(0, rows), dw.shape, grad_y.index_select(0, rows), stride,
                                        padding, dilation, groups)
        dw += _apply_mask(g, _direct_float_masks(masks), masks, t, out=g)
    return dw


def _direct_float_masks(masks: Tensor) -> dict:
    """The direct path's float-mask cache (ticket -> float mask), kept per mask version like a layout."""
    return get_layout("cpu:conv2d:float_masks", masks, lambda m: {})


def _masked_conv_weight(weight: Tensor, masks: Tensor, t: int) -> Tensor:
    out = _scratch.get("masked_conv_weight", weight.shape, weight.dtype)
    return _apply_mask(weight, _direct_float_masks(masks), masks, t, out=out)


def _tickets(perm: Tensor, offsets: Tensor, which=None):
    """(ticket, its images (n,) int64) for each ticket with images (only those in ``which`` when given)."""
    bounds = offsets.tolist()
    for t in range(len(bounds) - 1) if which is None else which:
        if bounds[t + 1] > bounds[t]:
            yield t, perm[bounds[t] : bounds[t + 1]]


# Small layers (the paper's GhostNet at batch 320: B x weight size of 40K-580K values) run as ONE grouped
# convolution with a masked weight per image: the batch becomes B groups. Measured against the per-ticket and
# unfolded paths on the 2-core EPYC (batch 320, T = 10, 50 %): depthwise 3x3 0.83 ms vs 4.2 ms (dense F.conv2d
# 0.85 ms), 1x1 24->36 at 8x8 1.0 vs 2.9 ms; with bigger weights the per-image copies stop paying (1x1 80->184 at
# 2x2: 31 ms), hence the limit on B x weight size.
PER_IMAGE_WEIGHT_LIMIT = 1 << 20


def _image_routes(perm: Tensor, offsets: Tensor) -> Tensor:
    """route (B,) int64 recovered from the grouping."""
    counts = offsets[1:] - offsets[:-1]
    route = torch.empty_like(perm)
    route[perm] = torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.int64), counts)
    return route


def _per_image_weights(weight: Tensor, masks: Tensor, route: Tensor) -> Tensor:
    """(B * O, C / g, kh, kw): image i's masked weight in rows [i * O, (i + 1) * O)."""
    fmasks = get_layout("cpu:conv2d:float_masks_all", masks, lambda m: m.to(torch.float32))
    w = weight.unsqueeze(0) * fmasks.index_select(0, route)
    if not bool(torch.isfinite(w.sum())):  # keep inf * 0 = NaN out of pruned positions
        w = torch.where(masks.index_select(0, route), weight.unsqueeze(0), torch.zeros((), dtype=weight.dtype))
    return w.reshape(-1, *weight.shape[1:])


def _use_per_image_weights(batch: int, weight: Tensor) -> bool:
    return batch * weight.numel() <= PER_IMAGE_WEIGHT_LIMIT


def _batched_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
    b = x.shape[0]
    w = _per_image_weights(weight, masks, _image_routes(perm, offsets))
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, None, stride, padding, dilation, groups * b)
    y = y.view(b, weight.shape[0], *y.shape[2:])
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


def _batched_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
    b = grad_y.shape[0]
    w = _per_image_weights(weight, masks, _image_routes(perm, offsets))
    dx = torch.nn.grad.conv2d_input(
        (1, b * input_shape[1], *input_shape[2:]), w, grad_y.reshape(1, -1, *grad_y.shape[2:]), stride, padding,
        dilation, groups * b,
    )
    return dx.view(input_shape)


def _batched_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
    b = x.shape[0]
    route = _image_routes(perm, offsets)
    per_image = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (b * masks.shape[1], *masks.shape[2:]),
        grad_y.reshape(1, -1, *grad_y.shape[2:]), stride, padding, dilation, groups * b,
    ).view(b, *masks.shape[1:])
    # each image's gradient masked by its own ticket (where: exact zeros even for inf/NaN), summed in batch order
    zero = torch.zeros((), dtype=per_image.dtype)
    return torch.where(masks.index_select(0, route), per_image, zero).sum(0)


# Pointwise (1x1, stride 1, no padding, groups 1) convs are a matrix product per image: y_b = (W * M_route[b]) x_b
# with x_b (C, H * W). Measured on the 2-core EPYC, GhostNet's 1x1 layers at batch 320, T = 10, 50 %, forward ms
# (dense F.conv2d / the per-image grouped conv / the paths below):
#   16->8 at 16x16: 1.19 / 3.11 / bmm 0.44;  24->36 at 8x8: 0.73 / 1.74 / bmm 0.54;
#   40->120 at 4x4: 0.64 / 4.54 / bmm 0.79, rows 2.01;  80->184 at 2x2: 0.71 / 4.31 / bmm 5.27, rows 1.03.
# "bmm": one batched matrix product with the per-image masked weights (B, O, C), good while the product per image
# is large next to copying its weight (H * W >= POINTWISE_BMM_MIN_PIXELS) and the copies stay small
# (B * O * C <= POINTWISE_BMM_MAX_WEIGHTS); "rows": every pixel is a row of the routed linear layer (the linear
# paths: the sparse kernel or MKL per ticket), at the cost of two layout copies.
POINTWISE_BMM_MIN_PIXELS = 16
POINTWISE_BMM_MAX_WEIGHTS = 1 << 22


def _pointwise_path(weight_shape, batch: int, pixels: int, stride, padding, groups: int) -> Optional[str]:
    """'bmm', 'rows', or None when the conv is not pointwise."""
    if tuple(weight_shape[2:]) != (1, 1) or groups != 1 or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return None
    if pixels >= POINTWISE_BMM_MIN_PIXELS and batch * weight_shape[0] * weight_shape[1] <= POINTWISE_BMM_MAX_WEIGHTS:
        return "bmm"
    return "rows"


def _pixel_rows(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * H * W, C): every pixel a row."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_pixel_rows(rows: Tensor, shape) -> Tensor:
    """(B * H * W, C) -> contiguous (B, C, H, W)."""
    b, c, h, w = shape
    return rows.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def _row_grouping(perm: Tensor, offsets: Tensor, pixels: int):
    """The image grouping expanded to pixel rows: (perm (B * P,), offsets (T + 1,))."""
    rows = (perm.unsqueeze(1) * pixels + torch.arange(pixels, dtype=torch.int64)).reshape(-1)
    return rows, offsets * pixels


def _pointwise_image_weights(weight: Tensor, masks: Tensor, perm: Tensor, offsets: Tensor) -> Tensor:
    """(B, O, C): each image's masked 1x1 weight, for the bmm path."""
    return _per_image_weights(weight, masks, _image_routes(perm, offsets)).view(-1, *weight.shape[:2])


def _pointwise_forward(path, x, weight, masks, bias, perm, offsets):
    b, c, h, w = x.shape
    o = weight.shape[0]
    if path == "bmm":
        y = torch.bmm(_pointwise_image_weights(weight, masks, perm, offsets), x.reshape(b, c, h * w))
        if bias is not None:
            y += bias.view(1, -1, 1)
        return y.view(b, o, h, w)
    w2d, m2d, layout = _conv_as_linear(weight, masks)
    rows, row_offsets = _row_grouping(perm, offsets, h * w)
    y = _linear_forward(_pixel_rows(x), w2d, m2d, layout, bias, rows, row_offsets)
    return _from_pixel_rows(y, (b, o, h, w))


def _pointwise_grad_input(path, grad_y, weight, masks, perm, offsets, input_shape):
    b, o, h, w = grad_y.shape
    if path == "bmm":
        w_img = _pointwise_image_weights(weight, masks, perm, offsets)
        return torch.bmm(w_img.transpose(1, 2), grad_y.reshape(b, o, h * w)).view(input_shape)
    w2d, m2d, layout = _conv_as_linear(weight, masks)
    rows, row_offsets = _row_grouping(perm, offsets, h * w)
    dx = _linear_grad_input(_pixel_rows(grad_y), w2d, m2d, layout, rows, row_offsets)
    return _from_pixel_rows(dx, input_shape)


def _pointwise_grad_weight(path, grad_y, x, masks, perm, offsets):
    b, o, h, w = grad_y.shape
    c = x.shape[1]
    if path == "bmm":
        # the (T, O, C) masks only: the sparse layout (compiled on first use) is for the rows path
        m2d = masks.reshape(masks.shape[0], o, c)
        per_image = torch.bmm(grad_y.reshape(b, o, h * w), x.reshape(b, c, h * w).transpose(1, 2))
        # summed per ticket in batch order (deterministic), then each ticket's sum masked by its own mask (where:
        # exact zeros even for inf/NaN)
        per_ticket = per_image.new_zeros(m2d.shape).index_add_(0, _image_routes(perm, offsets), per_image)
        dw = torch.where(m2d, per_ticket, torch.zeros((), dtype=per_ticket.dtype)).sum(0)
        return dw.view(masks.shape[1:])
    _, m2d, layout = _conv_as_linear(None, masks)
    rows, row_offsets = _row_grouping(perm, offsets, h * w)
    dw = _linear_grad_weight(_pixel_rows(grad_y), _pixel_rows(x), m2d, layout, rows, row_offsets)
    return dw.view(masks.shape[1:])


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
        return _linear_forward(x, weight, masks, _layout(masks), bias, perm, offsets)

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        return _linear_grad_input(grad_y, weight, masks, _layout(masks), perm, offsets)

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        return _linear_grad_weight(grad_y, x, masks, _layout(masks), perm, offsets)

    # -- conv2d, in this order: one ticket in the batch as one torch convolution; pointwise (1x1) convs as a
    # batched matmul or as routed linear rows; small layers as one grouped convolution with a masked weight per
    # image; grouped and depthwise convs as torch's direct convolution per ticket (their weights are tiny: nothing
    # for sparsity to skip); otherwise each ticket by its density: torch's convolution on W * M_t, or the sparse
    # kernels on unfolded columns of chunks of its images.
    def conv2d_forward(self, x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
        if _single_ticket(offsets) is not None:
            return _direct_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups)
        pointwise = _pointwise_path(weight.shape, x.shape[0], x.shape[2] * x.shape[3], stride, padding, groups)
        if pointwise is not None:
            return _pointwise_forward(pointwise, x, weight, masks, bias, perm, offsets)
        if _use_per_image_weights(x.shape[0], weight):
            return _batched_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups)
        if groups != 1:
            return _direct_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups)
        w2d, m2d, layout = _conv_as_linear(weight, masks)
        ho, wo = (conv_output_size(*args) for args in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))
        y = x.new_empty((x.shape[0], weight.shape[0], ho, wo))
        ticket_sparse, dense = _conv_paths(layout, offsets, ho * wo, w2d.shape[1])
        if dense:
            _direct_conv_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups,
                                 which=dense, out=y)
        if not bool(ticket_sparse.any()):
            return y
        perm, offsets = _sparse_images(perm, offsets, ticket_sparse)
        for chunk in _image_chunks(perm, offsets, ho * wo, w2d.shape[1]):
            cols = _columns(x, chunk.images, weight.shape[2:], stride, padding, dilation, ho * wo)
            torch.ops.rtl_kernels._cpu_conv_spmm(
                w2d, w2d.shape[1], 1, layout.csr_ptr, layout.csr_chunk_ptr, layout.csr_idx, cols, chunk.local,
                bias, chunk.img_offsets, ticket_sparse, y, chunk.images,
            )
        return y

    def conv2d_grad_input(self, grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
        if _single_ticket(offsets) is not None:
            return _direct_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding,
                                           dilation, groups)
        pointwise = _pointwise_path(weight.shape, grad_y.shape[0], grad_y.shape[2] * grad_y.shape[3], stride, padding,
                                    groups)
        if pointwise is not None:
            return _pointwise_grad_input(pointwise, grad_y, weight, masks, perm, offsets, input_shape)
        if _use_per_image_weights(grad_y.shape[0], weight):
            return _batched_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding,
                                            dilation, groups)
        if groups != 1:
            return _direct_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding,
                                           dilation, groups)
        w2d, m2d, layout = _conv_as_linear(weight, masks)
        pixels = grad_y.shape[2] * grad_y.shape[3]
        dx = grad_y.new_empty(input_shape)
        ticket_sparse, dense = _conv_paths(layout, offsets, pixels, w2d.shape[1])
        if dense:
            _direct_conv_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation,
                                    groups, which=dense, out=dx)
        if not bool(ticket_sparse.any()):
            return dx
        perm, offsets = _sparse_images(perm, offsets, ticket_sparse)
        dy = grad_y.view(grad_y.shape[0], grad_y.shape[1], pixels)
        for chunk in _image_chunks(perm, offsets, pixels, w2d.shape[1]):
            dcols = _scratch_columns("dcols", chunk.count, w2d.shape[1], pixels, grad_y.dtype)
            # roles swap: the outputs are the K columns, reached through the transposed (CSC) index
            torch.ops.rtl_kernels._cpu_conv_spmm(
                w2d, 1, w2d.shape[1], layout.csc_ptr, layout.csc_chunk_ptr, layout.csc_idx, dy, chunk.images,
                None, chunk.img_offsets, ticket_sparse, dcols, chunk.local,
            )
            dx.index_copy_(0, chunk.images, F.fold(dcols, tuple(input_shape[2:]), tuple(weight.shape[2:]),
                                                   dilation=dilation, padding=padding, stride=stride))
        return dx

    def conv2d_grad_weight(self, grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
        if _single_ticket(offsets) is not None:
            return _direct_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups)
        pointwise = _pointwise_path(masks.shape[1:], x.shape[0], grad_y.shape[2] * grad_y.shape[3], stride, padding,
                                    groups)
        if pointwise is not None:
            return _pointwise_grad_weight(pointwise, grad_y, x, masks, perm, offsets)
        if _use_per_image_weights(x.shape[0], masks[0]):
            return _batched_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups)
        if groups != 1:
            return _direct_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups)
        _, m2d, layout = _conv_as_linear(None, masks)
        pixels = grad_y.shape[2] * grad_y.shape[3]
        ticket_sparse, dense = _conv_paths(layout, offsets, pixels, m2d.shape[2])
        if dense:
            dw = _direct_conv_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups,
                                          which=dense).view(m2d.shape[1:])
        else:
            dw = grad_y.new_zeros(m2d.shape[1:])
        if not bool(ticket_sparse.any()):
            return dw.view(masks.shape[1:])
        perm, offsets = _sparse_images(perm, offsets, ticket_sparse)
        dy = grad_y.view(grad_y.shape[0], grad_y.shape[1], pixels)
        for chunk in _image_chunks(perm, offsets, pixels, dw.shape[1]):
            cols = _columns(x, chunk.images, masks.shape[-2:], stride, padding, dilation, pixels)
            # chunks and tickets are summed in a fixed order: deterministic; zero outside the masks stays zero
            torch.ops.rtl_kernels._cpu_conv_grad_weight(
                dy, chunk.images, cols, chunk.img_offsets, ticket_sparse, layout.csr_ptr, layout.csr_idx, dw
            )
        return dw.view(masks.shape[1:])


BACKEND = CpuBackend()
