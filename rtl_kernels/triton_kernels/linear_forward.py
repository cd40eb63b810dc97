"""Forward kernel of the routed masked linear: y[i] = x[i] (W ⊙ M_{r(i)})ᵀ + b, over the block-CSR layout."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats.block_csr import BlockCSR
from . import dot_precision
from .tiles import load_kept_weights, load_rows, row_tiles, span, store_rows, tile_rows, weight_block_t


@triton.jit
def _linear_forward_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    bias_ptr,
    y_ptr,
    perm_ptr,
    offsets_ptr,
    tile_ticket_ptr,
    tile_first_ptr,
    row_ptr_ptr,
    col_idx_ptr,
    full_ptr,
    N,
    K,
    NB,
    T,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M rows of one ticket x one block row (BLOCK_N outputs).
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    t = tl.load(tile_ticket_ptr + tile)
    if t >= T:  # beyond the last real tile of the upper-bound grid
        return
    rows, row_ok = tile_rows(perm_ptr, offsets_ptr, tile_first_ptr, tile, t, BLOCK_M)
    n, n_ok = span(nb * BLOCK_N, BLOCK_N, N)
    # int64: T*N*K overflows int32 for large stacks of masks.
    mask_base = mask_ptr + t.to(tl.int64) * N * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seg = t * NB + nb
    lo = tl.load(row_ptr_ptr + seg)
    hi = tl.load(row_ptr_ptr + seg + 1)
    for e in range(lo, hi):
        kb = tl.load(col_idx_ptr + e)
        partial = tl.load(full_ptr + e) == 0
        k, k_ok = span(kb * BLOCK_K, BLOCK_K, K)
        a = load_rows(x_ptr, rows, row_ok, k, k_ok, K)
        w_off, w_in = weight_block_t(n.to(tl.int64), n_ok, k, k_ok, K)
        w = load_kept_weights(w_ptr, mask_base, w_off, w_in, partial)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Scatter back to the rows' batch positions in the epilogue.
    store_rows(y_ptr, acc, rows, row_ok, n, n_ok, N)


def linear_forward(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    bias: Optional[Tensor],
    perm: Tensor,
    offsets: Tensor,
    layout: BlockCSR,
    block_m: int,
    num_warps: int = 4,
) -> Tensor:
    """y = routed masked linear of x, launched without host synchronisation.

    Args:
        x (B, K), weight (N, K): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, N, K) bool, contiguous.
        bias (N,) or None.
        perm (B,) int64, offsets (T + 1,) int64: the batch grouped by ticket.
        layout: ``compile_block_csr(masks, block_n, block_k)``; its blocks are the kernel's N and K tiles.
        block_m: rows per tile (power of two >= 16).
        num_warps: warps per program.

    Returns:
        y (B, N) in x's dtype; every element written (accumulated in fp32).
    """
    B, K = x.shape
    N = weight.shape[0]
    y = torch.empty((B, N), dtype=x.dtype, device=x.device)
    tile_ticket, tile_first = row_tiles(offsets, B, block_m)
    grid = (tile_ticket.shape[0], layout.n_blocks_n)
    _linear_forward_kernel[grid](
        x,
        weight,
        masks.view(torch.uint8),
        bias,
        y,
        perm,
        offsets,
        tile_ticket,
        tile_first,
        layout.row_ptr,
        layout.col_idx,
        layout.full,
        N,
        K,
        layout.n_blocks_n,
        layout.num_tickets,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=layout.block_n,
        BLOCK_K=layout.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return y
