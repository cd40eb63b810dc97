"""grad_weight kernel of the routed masked linear: dW = Σ_t M_t ⊙ (dy_tᵀ x_t), each W block written once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats.block_csr import BlockCSR
from . import dot_precision
from .tiles import add_kept, gather_rows, load_rows, span, weight_block


@triton.jit
def _linear_grad_weight_kernel(
    dy_ptr,
    x_ptr,
    mask_ptr,
    dw_ptr,
    perm_ptr,
    offsets_ptr,
    w_ptr_ptr,
    w_tickets_ptr,
    N,
    K,
    KB,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per W block (nb, kb); it alone writes that block: no atomics, a fixed summation order.
    blk = tl.program_id(0)
    nb = blk // KB
    kb = blk % KB
    n, n_ok = span(nb * BLOCK_N, BLOCK_N, N)
    k, k_ok = span(kb * BLOCK_K, BLOCK_K, K)
    w_off, w_in = weight_block(n.to(tl.int64), n_ok, k, k_ok, K)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    lo = tl.load(w_ptr_ptr + blk)
    hi = tl.load(w_ptr_ptr + blk + 1)
    # Tickets in ascending order, each ticket's rows in grouped order: the result is deterministic.
    for e in range(lo, hi):
        t = tl.load(w_tickets_ptr + e)
        start = tl.load(offsets_ptr + t).to(tl.int32)
        end = tl.load(offsets_ptr + t + 1).to(tl.int32)
        if end > start:  # a ticket with no rows in this batch adds nothing
            part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for r in range(start, end, BLOCK_M):
                rows, ok = gather_rows(perm_ptr, r, end, BLOCK_M)
                # dy rows read transposed through the pointers, a (BLOCK_N, BLOCK_M) tile.
                g = tl.load(dy_ptr + rows[None, :] * N + n[:, None], mask=ok[None, :] & n_ok[:, None], other=0.0)
                a = load_rows(x_ptr, rows, ok, k, k_ok, K)
                part = tl.dot(g, a, part, input_precision=DOT_PRECISION)
            # The mask tile is loaded even for full blocks: it is read once per (block, ticket), against the
            # ticket's whole run of dy and x rows, so skipping it would not pay (the layout has no per-ticket
            # full flag in this order either).
            keep = tl.load(mask_ptr + t.to(tl.int64) * N * K + w_off, mask=w_in, other=0)
            acc = add_kept(acc, part, keep)

    # Every block is written, those kept by no ticket present as zeros.
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=w_in)


def linear_grad_weight(
    grad_y: Tensor,
    x: Tensor,
    masks: Tensor,
    perm: Tensor,
    offsets: Tensor,
    layout: BlockCSR,
    block_m: int,
    num_warps: int = 4,
) -> Tensor:
    """dW of the routed masked linear, exactly zero outside the union of the present tickets' masks.

    Args:
        grad_y (B, N), x (B, K): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, N, K) bool, contiguous.
        perm (B,) int64, offsets (T + 1,) int64: the batch grouped by ticket.
        layout: ``compile_block_csr(masks, block_n, block_k)`` (its per-block ticket lists are used).
        block_m: rows reduced per step (power of two >= 16).
        num_warps: warps per program.

    Returns:
        dW (N, K) in grad_y's dtype, accumulated in fp32 over all tickets and rounded once.
    """
    N = grad_y.shape[1]
    K = x.shape[1]
    dw = torch.empty((N, K), dtype=grad_y.dtype, device=grad_y.device)
    grid = (layout.n_blocks_n * layout.n_blocks_k,)
    _linear_grad_weight_kernel[grid](
        grad_y,
        x,
        masks.view(torch.uint8),
        dw,
        perm,
        offsets,
        layout.w_ptr,
        layout.w_tickets,
        N,
        K,
        layout.n_blocks_k,
        BLOCK_M=block_m,
        BLOCK_N=layout.block_n,
        BLOCK_K=layout.block_k,
        DOT_PRECISION=dot_precision(grad_y.dtype),
        num_warps=num_warps,
    )
    return dw
