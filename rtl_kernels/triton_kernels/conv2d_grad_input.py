"""grad_input kernel of the routed masked conv2d: dx[i] = conv2d's input gradient through W ⊙ M_{r(i)}.

Scatter-free: each program owns a tile of input pixels (image, h, w) of one ticket and gathers, for every tap
(r, s) and output channel n of its group, the output pixel that read it: ho = (h + ph - r * dh) / sh when that
division is exact and lands inside the output (likewise for wo). GEMM view, per group and ticket: rows = input
pixels, reduction J = (O / groups) * kh * kw ordered (n, r, s), N = the group's input channels. Every dx element
is written by exactly one program, in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import dot_precision
from .tiles import pixel_tiles, span, store_pixels, tile_pixels


@triton.jit
def _conv2d_grad_input_kernel(
    dy_ptr,
    w_ptr,
    mask_ptr,
    dx_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M input pixels of one ticket x BLOCK_C input channels of group g.
    tile = tl.program_id(0)
    cb = tl.program_id(1)
    g = tl.program_id(2)
    t = tl.load(tile_ticket_ptr + tile)
    if t >= T:  # beyond the last real tile of the upper-bound grid
        return
    HW = H * W
    P = Ho * Wo
    img, pix, row_ok = tile_pixels(perm_ptr, tile_first_ptr, tile_end_ptr, tile, HW, BLOCK_M)
    hp = pix // W + PH
    wp = pix % W + PW
    dy_row = img * O * P
    c, c_ok = span(cb * BLOCK_C, BLOCK_C, Cg)
    mask_base = mask_ptr + t.to(tl.int64) * O * K
    J = Og * KH * KW

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        j, j_ok = span(j0, BLOCK_J, J)
        o = (g * Og + j // (KH * KW)).to(tl.int64)
        rs = j % (KH * KW)
        # (BLOCK_J, BLOCK_C) tile of W: W[o, c, r, s] in the (O, K) view, K ordered (c, r, s).
        w_off = o[:, None] * K + c[None, :] * (KH * KW) + rs[:, None]
        w_in = j_ok[:, None] & c_ok[None, :]
        keep = tl.load(mask_base + w_off, mask=w_in, other=0)
        # A tile the ticket prunes entirely costs only its mask load: no gradient gather, no dot.
        if tl.max(keep.to(tl.int32)) != 0:
            hn = hp[:, None] - (rs // KW)[None, :] * DH
            wn = wp[:, None] - (rs % KW)[None, :] * DW
            # Clamp before dividing so // and % never see a negative operand.
            hc = tl.where(hn >= 0, hn, 0)
            wc = tl.where(wn >= 0, wn, 0)
            ho = hc // SH
            wo = wc // SW
            hit = (hn >= 0) & (hc - ho * SH == 0) & (ho < Ho) & (wn >= 0) & (wc - wo * SW == 0) & (wo < Wo)
            gy = tl.load(
                dy_ptr + dy_row[:, None] + o[None, :] * P + ho * Wo + wo,
                mask=row_ok[:, None] & j_ok[None, :] & hit,
                other=0.0,
            )
            # The mask predicates the weight load (keep is 0 outside the tile's bounds): pruned weights are never read.
            w = tl.load(w_ptr + w_off, mask=keep != 0, other=0.0)
            acc = tl.dot(gy, w, acc, input_precision=DOT_PRECISION)

    store_pixels(dx_ptr, acc, img, pix, row_ok, (g * Cg + c).to(tl.int64), c_ok, C, HW)


def conv2d_grad_input(
    grad_y: Tensor,
    weight: Tensor,
    masks: Tensor,
    perm: Tensor,
    offsets: Tensor,
    input_shape: Tuple[int, int, int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    block_m: int,
    block_c: int,
    block_j: int,
    num_warps: int = 8,
) -> Tensor:
    """dx of the routed masked conv2d, launched without host synchronisation.

    Args:
        grad_y (B, O, Ho, Wo), weight (O, C // groups, kh, kw): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, O, C // groups, kh, kw) bool, contiguous.
        perm (B,) int64, offsets (T + 1,) int64: the images grouped by ticket.
        input_shape: (B, C, H, W) of x.
        stride, padding, dilation: (int, int); padding symmetric.
        groups: channel groups.
        block_m: input pixels per tile; block_c: input channels per tile; block_j: reduction step over
            (output channel, tap) (powers of two >= 16).
        num_warps: warps per program (8 keeps the per-row gather state of a 64-row tile in registers).

    Returns:
        dx (B, C, H, W) in grad_y's dtype; every element written (zero where no kept tap reads it).
    """
    B, C, H, W = (int(d) for d in input_shape)
    _, O, Ho, Wo = grad_y.shape
    _, Cg, KH, KW = weight.shape
    T = masks.shape[0]
    dx = torch.empty((B, C, H, W), dtype=grad_y.dtype, device=grad_y.device)
    if dx.numel() == 0:
        return dx
    Og = O // groups
    K = Cg * KH * KW
    tile_ticket, tile_first, tile_end = pixel_tiles(offsets, B, H * W, block_m)
    grid = (tile_ticket.shape[0], triton.cdiv(Cg, block_c), groups)
    _conv2d_grad_input_kernel[grid](
        grad_y,
        weight,
        masks.view(torch.uint8),
        dx,
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
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_J=block_j,
        DOT_PRECISION=dot_precision(grad_y.dtype),
        num_warps=num_warps,
    )
    return dx
