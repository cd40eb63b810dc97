"""Forward kernel of the routed masked conv2d as an implicit GEMM: y[i] = conv2d(x[i], W ⊙ M_{r(i)}) + b.

GEMM view, per group g and ticket t: rows = output pixels (image, ho, wo) of the images routed to t, in grouped
order; K = (C / groups) * kh * kw, ordered (c, r, s) like a row of W; N = the group's output channels. The input
patch of each row is gathered inside the loads (no im2col buffer), with zeros for taps that fall in the padding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..conv_geometry import conv_output_size
from . import dot_precision
from .tiles import load_patch, pixel_tiles, span, store_pixels, tap_coords, tile_pixels, weight_block_t, window_origin


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
    P = Ho * Wo
    # Gather through the permutation inside the loads: no permuted copy of x or y is made.
    img, pix, row_ok = tile_pixels(perm_ptr, tile_first_ptr, tile_end_ptr, tile, P, BLOCK_M)
    h0, w0 = window_origin(pix, Wo, SH, SW, PH, PW)
    x_row = img * C * H * W + (g * Cg).to(tl.int64) * H * W
    n, n_ok = span(nb * BLOCK_N, BLOCK_N, Og)
    o = (g * Og + n).to(tl.int64)
    # int64: T*O*K overflows int32 for large stacks of masks.
    mask_base = mask_ptr + t.to(tl.int64) * O * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k, k_ok = span(k0, BLOCK_K, K)
        w_off, w_in = weight_block_t(o, n_ok, k, k_ok, K)
        keep = tl.load(mask_base + w_off, mask=w_in, other=0)
        # A tile the ticket prunes entirely costs only its mask load: no patch gather, no dot.
        if tl.max(keep.to(tl.int32)) != 0:
            c, r, s = tap_coords(k, KH, KW)
            a = load_patch(x_ptr, x_row, c.to(tl.int64) * H * W, h0, w0, r, s, row_ok, k_ok, H, W, DH, DW)
            # The mask predicates the weight load (keep is 0 outside the tile's bounds): a pruned weight, finite or
            # not, is never read, and no where() pass over the tile is needed.
            w = tl.load(w_ptr + w_off, mask=keep != 0, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Scatter back to the images' batch positions in the epilogue.
    store_pixels(y_ptr, acc, img, pix, row_ok, o, n_ok, O, P)


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
    Og = O // groups
    K = Cg * KH * KW
    tile_ticket, tile_first, tile_end = pixel_tiles(offsets, B, Ho * Wo, block_m)
    grid = (tile_ticket.shape[0], triton.cdiv(Og, block_n), groups)
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
