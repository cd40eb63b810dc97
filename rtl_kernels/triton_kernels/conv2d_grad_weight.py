"""grad_weight kernel of the routed masked conv2d: dW = Σ_t M_t ⊙ Σ_{i of t} conv2d weight gradient of image i.

GEMM view, per group: dW[o, k] (the (O, K) view, K ordered (c, r, s)) = Σ over pixel rows of dy[row, o] times the
gathered input patch[row, k]. One program owns one (output-channel block, K block) of one group and walks a
contiguous range of the ticket-sorted pixel tiles in order, applying each tile's ticket mask to that tile's
product before adding it: the result is exactly zero outside the masks of the tickets present, and the fixed
order makes it deterministic without atomics. With ``split`` > 1 the tile range is cut into ``split`` parts
whose fp32 partial sums land in a buffer, reduced over the split axis by torch (a fixed-order reduction) and
rounded once: more programs when the weight is small and the batch large.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import dot_precision
from .tiles import add_kept, load_patch, pixel_tiles, span, tap_coords, tile_pixels, weight_block, window_origin


@triton.jit
def _conv2d_grad_weight_kernel(
    dy_ptr,
    x_ptr,
    mask_ptr,
    out_ptr,
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
    KB,
    NUM_TILES,
    TILES_PER_SPLIT,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: a (BLOCK_N, BLOCK_K) block of group g's dW over one range of pixel tiles.
    blk = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    nb = blk // KB
    kb = blk % KB
    n, n_ok = span(nb * BLOCK_N, BLOCK_N, Og)
    k, k_ok = span(kb * BLOCK_K, BLOCK_K, K)
    o = (g * Og + n).to(tl.int64)
    w_off, w_in = weight_block(o, n_ok, k, k_ok, K)
    # The patch coordinates of this K block are the same for every tile.
    c, r, s = tap_coords(k, KH, KW)
    x_chan = (g * Cg + c).to(tl.int64) * H * W
    P = Ho * Wo

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    tile_lo = sp * TILES_PER_SPLIT
    tile_hi = tl.minimum(tile_lo + TILES_PER_SPLIT, NUM_TILES)
    for tile in range(tile_lo, tile_hi):
        t = tl.load(tile_ticket_ptr + tile)
        real = t < T  # tiles past the last real one have ticket T
        t_safe = tl.minimum(t, T - 1)
        keep = tl.load(mask_ptr + t_safe.to(tl.int64) * O * K + w_off, mask=w_in & real, other=0)
        # Tiles whose ticket keeps nothing of this block (and padding tiles) add nothing: skip their loads.
        if tl.max(keep.to(tl.int32)) != 0:
            img, pix, row_ok = tile_pixels(perm_ptr, tile_first_ptr, tile_end_ptr, tile, P, BLOCK_M)
            h0, w0 = window_origin(pix, Wo, SH, SW, PH, PW)
            # dy read transposed through the pointers, a (BLOCK_N, BLOCK_M) tile.
            gy = tl.load(
                dy_ptr + img[None, :] * O * P + o[:, None] * P + pix[None, :],
                mask=n_ok[:, None] & row_ok[None, :],
                other=0.0,
            )
            a = load_patch(x_ptr, img * C * H * W, x_chan, h0, w0, r, s, row_ok, k_ok, H, W, DH, DW)
            part = tl.dot(gy, a, input_precision=DOT_PRECISION)
            acc = add_kept(acc, part, keep)

    # Every element is written, those kept by no ticket present as zeros.
    out = out_ptr + sp.to(tl.int64) * O * K + w_off
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=w_in)


def default_split(device: torch.device, num_programs: int, num_tiles: int) -> int:
    """Parts to cut the pixel tiles into so the grid fills the GPU: shapes and device properties only.

    Two programs per SM is the usual occupancy floor for a reduction-heavy kernel (not yet tuned here); each part
    keeps at least 8 tiles so the partial buffer and its reduction stay small next to the kernel. On CPU (the
    interpreter, for tests) one part: programs run one after another there.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, num_programs))
    return max(1, min(want, num_tiles // 8))


def conv2d_grad_weight(
    grad_y: Tensor,
    x: Tensor,
    masks: Tensor,
    perm: Tensor,
    offsets: Tensor,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    block_m: int,
    block_n: int,
    block_k: int,
    split: int | None = None,
    num_warps: int = 8,
) -> Tensor:
    """dW of the routed masked conv2d, exactly zero outside the union of the present tickets' masks.

    Args:
        grad_y (B, O, Ho, Wo), x (B, C, H, W): contiguous, one dtype (fp32, fp16, bf16).
        masks (T, O, C // groups, kh, kw) bool, contiguous.
        perm (B,) int64, offsets (T + 1,) int64: the images grouped by ticket.
        stride, padding, dilation: (int, int); padding symmetric.
        groups: channel groups.
        block_m: pixel rows reduced per step; block_n: output channels per block; block_k: K per block
            (powers of two >= 16).
        split: parts the pixel tiles are cut into (None: :func:`default_split`).
        num_warps: warps per program (8 keeps the per-row gather state of a 64-row tile in registers).

    Returns:
        dW (O, C // groups, kh, kw) in grad_y's dtype, accumulated in fp32 and rounded once.
    """
    B, C, H, W = x.shape
    _, O, Ho, Wo = grad_y.shape
    T, _, Cg, KH, KW = masks.shape
    dw = torch.empty((O, Cg, KH, KW), dtype=grad_y.dtype, device=grad_y.device)
    if dw.numel() == 0:
        return dw
    if grad_y.numel() == 0:  # no pixels: nothing reaches the weight
        return dw.zero_()
    Og = O // groups
    K = Cg * KH * KW
    tile_ticket, tile_first, tile_end = pixel_tiles(offsets, B, Ho * Wo, block_m)
    num_tiles = tile_ticket.shape[0]
    kb = triton.cdiv(K, block_k)
    num_programs = triton.cdiv(Og, block_n) * kb * groups
    if split is None:
        split = default_split(grad_y.device, num_programs, num_tiles)
    split = max(1, min(int(split), num_tiles))
    per_split = -(-num_tiles // split)
    split = -(-num_tiles // per_split)  # no empty trailing parts
    out = dw if split == 1 else torch.empty((split, O, Cg, KH, KW), dtype=torch.float32, device=dw.device)
    grid = (triton.cdiv(Og, block_n) * kb, groups, split)
    _conv2d_grad_weight_kernel[grid](
        grad_y,
        x,
        masks.view(torch.uint8),
        out,
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
        kb,
        num_tiles,
        per_split,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        KH=KH,
        KW=KW,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(grad_y.dtype),
        num_warps=num_warps,
    )
    if split > 1:
        dw.copy_(out.sum(0))  # fp32 sum over the parts in a fixed order, then one rounding
    return dw
