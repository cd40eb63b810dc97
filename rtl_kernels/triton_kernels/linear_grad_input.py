"""grad_input kernel of the routed masked linear: dx[i] = dy[i] (W ⊙ M_{r(i)}), over the transposed index."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats.block_csr import BlockCSR
from . import dot_precision, max_row_tiles, row_tiles


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
    first = tl.load(tile_first_ptr + tile)
    end = tl.load(offsets_ptr + t + 1).to(tl.int32)
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    rows = tl.load(perm_ptr + pos, mask=row_ok, other=0)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    # int64: T*N*K overflows int32 for large stacks of masks.
    mask_base = mask_ptr + t.to(tl.int64) * N * K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    seg = t * KB + kb
    lo = tl.load(t_col_ptr_ptr + seg)
    hi = tl.load(t_col_ptr_ptr + seg + 1)
    for e in range(lo, hi):
        nb = tl.load(t_row_idx_ptr + e)
        partial = tl.load(t_full_ptr + e) == 0
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        g = tl.load(dy_ptr + rows[:, None] * N + n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w_off = n.to(tl.int64)[:, None] * K + k[None, :]
        w_in = n_ok[:, None] & k_ok[None, :]
        # A full block predicates the mask load off entirely and reads as all-kept.
        keep = tl.load(mask_base + w_off, mask=w_in & partial, other=1)
        # The mask predicates the weight load: pruned weights are never read, and no where() pass over the tile in
        # registers is needed (that pass made fp32 tiles spill).
        w = tl.load(w_ptr + w_off, mask=w_in & (keep != 0), other=0.0)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

    dx_off = rows[:, None] * K + k[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


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
    grid = (max_row_tiles(B, layout.num_tickets, block_m), layout.n_blocks_k)
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
