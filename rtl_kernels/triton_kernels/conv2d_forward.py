"""Forward kernel of the routed masked conv2d as an implicit GEMM: y[i] = conv2d(x[i], W ⊙ M_{r(i)}) + b.

GEMM view, per group g and ticket t: rows = output pixels (image, ho, wo) of the images routed to t, in grouped
order; K = (C / groups) * kh * kw, ordered (c, r, s) like a row of W; N = the group's output channels. The input
patch of each row is gathered inside the loads (no im2col buffer), with zeros for taps that fall in the padding.

This module also holds :func:`pixel_tiles`, the row-tile table shared by the three conv kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..conv_geometry import conv_output_size
from . import dot_precision


def max_pixel_tiles(num_images: int, pixels: int, num_tickets: int, block_m: int) -> int:
    """Upper bound on the row tiles of ``num_images`` images of ``pixels`` rows each, grouped by ticket.

    Each ticket with images adds at most one partly filled tile, and at most min(T, B) tickets have images, so
    sum_t cdiv(count_t * pixels, block_m) <= cdiv(B * pixels, block_m) + min(T, B): shapes only, no sync.
    """
    return -(-(num_images * pixels) // block_m) + min(num_tickets, num_images)


def pixel_tiles(offsets: Tensor, num_images: int, pixels: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-tile tables over the ticket-sorted pixel rows, built on the device (no host synchronisation).

    Grouped image position q of ticket t owns pixel rows q * pixels .. (q + 1) * pixels. Tile j covers rows
    tile_first[j] .. tile_end[j] of ticket tile_ticket[j]; tiles past the last real one get ticket T.

    Args:
        offsets (T + 1,) int64: ticket t owns grouped image positions offsets[t] .. offsets[t + 1].
        num_images: B.
        pixels: rows per image (Ho * Wo for the forward and grad_weight, H * W for grad_input).
        block_m: rows per tile.

    Returns:
        tile_ticket, tile_first, tile_end: (J,) int32 each, J = :func:`max_pixel_tiles`.
    """
    num_tickets = offsets.shape[0] - 1
    row_offsets = offsets * pixels
    counts = row_offsets[1:] - row_offsets[:-1]
    tiles = (counts + (block_m - 1)) // block_m
    tile_end_idx = torch.cumsum(tiles, 0)
    tile = torch.arange(max_pixel_tiles(num_images, pixels, num_tickets, block_m), device=offsets.device)
    ticket = torch.searchsorted(tile_end_idx, tile, right=True)  # T past the last real tile
    safe = ticket.clamp(max=num_tickets - 1)
    first = row_offsets[safe] + (tile - (tile_end_idx - tiles)[safe]) * block_m
    end = row_offsets[safe + 1]
    return ticket.to(torch.int32), first.to(torch.int32), end.to(torch.int32)


def check_row_count(num_images: int, pixels: int) -> None:
    # Row positions are int32 inside the kernels (memory offsets are int64).
    assert num_images * pixels < 2**31, "more than 2**31 pixel rows in one batch"


@triton.jit
def _conv2d_forward_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    bias_ptr,
    y_ptr,
    perm_ptr,
    tile_ticket_ptr,
    tile_first_ptr,
    tile_end_ptr,
    C,
    H,
    W,
    O,
    Ho,
    Wo,
    Cg,
    Og,
    K,
    T,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M output pixels of one ticket x BLOCK_N output channels of group g.
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    g = tl.program_id(2)
    t = tl.load(tile_ticket_ptr + tile)
    if t >= T:  # beyond the last real tile of the upper-bound grid
        return
    first = tl.load(tile_first_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    P = Ho * Wo
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    # Gather through the permutation inside the loads: no permuted copy of x or y is made.
    img = tl.load(perm_ptr + pos // P, mask=row_ok, other=0).to(tl.int64)
    pix = pos % P
    h0 = (pix // Wo) * SH - PH
    w0 = (pix % Wo) * SW - PW
    x_row = img * C * H * W + (g * Cg).to(tl.int64) * H * W
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Og
    o = (g * Og + n).to(tl.int64)
    # int64: T*O*K overflows int32 for large stacks of masks.
    mask_base = mask_ptr + t.to(tl.int64) * O * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        # W read transposed through the pointers, a (BLOCK_K, BLOCK_N) tile of the (O, K) view.
        w_off = o[None, :] * K + k[:, None]
        w_in = k_ok[:, None] & n_ok[None, :]
        keep = tl.load(mask_base + w_off, mask=w_in, other=0)
        # A tile the ticket prunes entirely costs only its mask load: no patch gather, no dot.
        if tl.max(keep.to(tl.int32)) != 0:
            c = k // (KH * KW)
            r = (k % (KH * KW)) // KW
            s = k % KW
            hi = h0[:, None] + r[None, :] * DH
            wi = w0[:, None] + s[None, :] * DW
            inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            a = tl.load(
                x_ptr + x_row[:, None] + c[None, :].to(tl.int64) * H * W + hi * W + wi,
                mask=row_ok[:, None] & k_ok[None, :] & inside,
                other=0.0,
            )
            # The mask predicates the weight load (keep is 0 outside the tile's bounds): a pruned weight, finite or
            # not, is never read, and no where() pass over the tile is needed.
            w = tl.load(w_ptr + w_off, mask=keep != 0, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Scatter back to the images' batch positions in the epilogue.
    y_off = img[:, None] * O * P + o[None, :] * P + pix[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def conv2d_forward(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    bias: Optional[Tensor],
    perm: Tensor,
    offsets: Tensor,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int = 8,
) -> Tensor:
    """y = routed masked conv2d of x, launched without host synchronisation.

    Args:
        x (B, C, H, W), weight (O, C // groups, kh, kw): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, O, C // groups, kh, kw) bool, contiguous.
        bias (O,) or None.
        perm (B,) int64, offsets (T + 1,) int64: the images grouped by ticket.
        stride, padding, dilation: (int, int); padding symmetric.
        groups: channel groups.
        block_m: output pixels per tile; block_n: output channels per tile; block_k: reduction step
            (powers of two >= 16).
        num_warps: warps per program (8 keeps the per-row gather state of a 64-row tile in registers).

    Returns:
        y (B, O, Ho, Wo) in x's dtype; every element written (accumulated in fp32).
    """
    B, C, H, W = x.shape
    O, Cg, KH, KW = weight.shape
    T = masks.shape[0]
    Ho = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
    y = torch.empty((B, O, Ho, Wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    check_row_count(B, Ho * Wo)
    Og = O // groups
    K = Cg * KH * KW
    tile_ticket, tile_first, tile_end = pixel_tiles(offsets, B, Ho * Wo, block_m)
    grid = (max_pixel_tiles(B, Ho * Wo, T, block_m), triton.cdiv(Og, block_n), groups)
    _conv2d_forward_kernel[grid](
        x,
        weight,
        masks.view(torch.uint8),
        bias,
        y,
        perm,
        tile_ticket,
        tile_first,
        tile_end,
        C,
        H,
        W,
        O,
        Ho,
        Wo,
        Cg,
        Og,
        K,
        T,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        KH=KH,
        KW=KW,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return y
