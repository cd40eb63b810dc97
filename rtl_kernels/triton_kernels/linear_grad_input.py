"""grad_input kernel of the routed masked linear: dx[i] = dy[i] (W ⊙ M_{r(i)}), over the transposed index."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats.block_csr import BlockCSR
from . import dot_precision
from .tiles import load_kept_weights, load_rows, row_tiles, span, store_rows, tile_rows, weight_block


@triton.jit
def _linear_grad_input_kernel(
    dy_ptr,
    w_ptr,
    mask_ptr,
    dx_ptr,
    perm_ptr,
    offsets_ptr,
    tile_ticket_ptr,
    tile_first_ptr,
    t_col_ptr_ptr,
    t_row_idx_ptr,
    t_full_ptr,
    N,
    K,
    KB,
    T,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M rows of one ticket x one block column (BLOCK_K inputs); reduces over N.
    tile = tl.program_id(0)
    kb = tl.program_id(1)
    t = tl.load(tile_ticket_ptr + tile)
    if t >= T:  # beyond the last real tile of the upper-bound grid
        return
    rows, row_ok = tile_rows(perm_ptr, offsets_ptr, tile_first_ptr, tile, t, BLOCK_M)
    k, k_ok = span(kb * BLOCK_K, BLOCK_K, K)
    # int64: T*N*K overflows int32 for large stacks of masks.
    mask_base = mask_ptr + t.to(tl.int64) * N * K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    seg = t * KB + kb
    lo = tl.load(t_col_ptr_ptr + seg)
    hi = tl.load(t_col_ptr_ptr + seg + 1)
    for e in range(lo, hi):
        nb = tl.load(t_row_idx_ptr + e)
        partial = tl.load(t_full_ptr + e) == 0
        n, n_ok = span(nb * BLOCK_N, BLOCK_N, N)
        g = load_rows(dy_ptr, rows, row_ok, n, n_ok, N)
        w_off, w_in = weight_block(n.to(tl.int64), n_ok, k, k_ok, K)
        w = load_kept_weights(w_ptr, mask_base, w_off, w_in, partial)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

    store_rows(dx_ptr, acc, rows, row_ok, k, k_ok, K)


def linear_grad_input(
    grad_y: Tensor,
    weight: Tensor,
    masks: Tensor,
    perm: Tensor,
    offsets: Tensor,
    layout: BlockCSR,
    block_m: int,
    num_warps: int = 4,
) -> Tensor:
    """dx of the routed masked linear, launched without host synchronisation.

    Args:
        grad_y (B, N), weight (N, K): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, N, K) bool, contiguous.
        perm (B,) int64, offsets (T + 1,) int64: the batch grouped by ticket.
        layout: ``compile_block_csr(masks, block_n, block_k)`` (its transposed index is used).
        block_m: rows per tile (power of two >= 16).
        num_warps: warps per program.

    Returns:
        dx (B, K) in grad_y's dtype; every element written (zero where the ticket keeps no weight).
    """
    B, N = grad_y.shape
    K = weight.shape[1]
    dx = torch.empty((B, K), dtype=grad_y.dtype, device=grad_y.device)
    tile_ticket, tile_first = row_tiles(offsets, B, block_m)
    grid = (tile_ticket.shape[0], layout.n_blocks_k)
    _linear_grad_input_kernel[grid](
        grad_y,
        weight,
        masks.view(torch.uint8),
        dx,
        perm,
        offsets,
        tile_ticket,
        tile_first,
        layout.t_col_ptr,
        layout.t_row_idx,
        layout.t_full,
        N,
        K,
        layout.n_blocks_k,
        layout.num_tickets,
        BLOCK_M=block_m,
        BLOCK_N=layout.block_n,
        BLOCK_K=layout.block_k,
        DOT_PRECISION=dot_precision(grad_y.dtype),
        num_warps=num_warps,
    )
    return dx
