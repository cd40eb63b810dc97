"""Row tiles of the routed kernels: their tables, built with torch on the device, and the tile set-up the kernels share.

Every layer of a routed model reads the same grouping (one ``offsets`` tensor per call of the model), so a table is
built once per ``offsets`` tensor and tile shape and reused by the other layers and the backward: the cache keys on
the tensor (weakly, so an entry dies with it), its version counter and data pointer, like the layout cache. While a
CUDA graph is being captured nothing is cached: the table's construction must be part of the graph, so that a replay
with new offsets builds new tables.

The device functions here (``@triton.jit``) are inlined into the kernels that call them, so a kernel compiles to
the same code as with their lines written out in place.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


def max_tiles(num_images: int, num_tickets: int, block_m: int, pixels: int = 1) -> int:
    """Upper bound on the row tiles of ``num_images`` images of ``pixels`` rows each, grouped into ``num_tickets``.

    Every ticket with images rounds its last tile up, adding at most one tile, and at most min(T, B) tickets have
    images, so sum_t cdiv(count_t * pixels, block_m) <= cdiv(B * pixels, block_m) + min(T, B). The bound depends on
    shapes only, which is what lets the kernels launch without reading the counts back to the host.
    """
    return -(-(num_images * pixels) // block_m) + min(num_tickets, num_images)


_lock = threading.Lock()
# id(offsets) -> (weakref to offsets, version, data_ptr, {tile shape: tables})
_tables: Dict[int, Tuple[Any, int, int, Dict[tuple, Tuple[Tensor, ...]]]] = {}


def _capturing(offsets: Tensor) -> bool:
    return offsets.is_cuda and torch.cuda.is_current_stream_capturing()


def _cached(offsets: Tensor, shape: tuple, build: Callable[[], Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
    """``build()`` once per version of ``offsets`` and tile ``shape`` (always, while a CUDA graph is captured)."""
    if _capturing(offsets):
        return build()
    key, version, ptr = id(offsets), offsets._version, offsets.data_ptr()
    with _lock:
        entry = _tables.get(key)
        if entry is not None and entry[0]() is offsets and entry[1] == version and entry[2] == ptr:
            if shape in entry[3]:
                return entry[3][shape]
        else:
            entry = None
    tables = build()
    with _lock:
        if entry is None:

            def drop(_ref, key=key) -> None:
                with _lock:
                    if _tables.get(key, (None,))[0] is _ref:
                        _tables.pop(key, None)

            entry = (weakref.ref(offsets, drop), version, ptr, {})
            _tables[key] = entry
        entry[3][shape] = tables
    return tables


def _tile_table(row_offsets: Tensor, num_tiles: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(tile_ticket, tile_first, ticket clamped to a real one) (J,) int64 each, J = ``num_tiles``.

    row_offsets (T + 1,) int64: ticket t owns rows row_offsets[t] .. row_offsets[t + 1].
    """
    num_tickets = row_offsets.shape[0] - 1
    counts = row_offsets[1:] - row_offsets[:-1]
    tiles = (counts + (block_m - 1)) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile = torch.arange(num_tiles, device=row_offsets.device)
    ticket = torch.searchsorted(tile_end, tile, right=True)  # T for tiles past the last real one
    safe = ticket.clamp(max=num_tickets - 1)
    first = row_offsets[safe] + (tile - (tile_end - tiles)[safe]) * block_m
    return ticket, first, safe


def row_tiles(offsets: Tensor, num_rows: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """Per-tile tables of the routed linear kernels, built on the device with torch ops (no host synchronisation).

    Tile j of the upper-bound grid covers grouped positions tile_first[j] .. min(tile_first[j] + block_m,
    offsets[t + 1]) of ticket t = tile_ticket[j]; tiles past the last real one get tile_ticket = T and the
    kernels return at once.

    Args:
        offsets (T + 1,) int64: ticket t owns grouped positions offsets[t] .. offsets[t + 1].
        num_rows: B, the batch size (offsets[T]), known from shapes.
        block_m: rows per tile.

    Returns:
        tile_ticket (J,) int32 and tile_first (J,) int32, J = :func:`max_tiles` (the launch grid's first axis).
    """

    def build() -> Tuple[Tensor, Tensor]:
        ticket, first, _ = _tile_table(offsets, max_tiles(num_rows, offsets.shape[0] - 1, block_m), block_m)
        return ticket.to(torch.int32), first.to(torch.int32)

    return _cached(offsets, ("rows", num_rows, block_m), build)


def pixel_tiles(offsets: Tensor, num_images: int, pixels: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-tile tables over the ticket-sorted pixel rows of the conv kernels, built on the device (no host sync).

    Grouped image position q of ticket t owns pixel rows q * pixels .. (q + 1) * pixels. Tile j covers rows
    tile_first[j] .. tile_end[j] of ticket tile_ticket[j]; tiles past the last real one get ticket T.

    Args:
        offsets (T + 1,) int64: ticket t owns grouped image positions offsets[t] .. offsets[t + 1].
        num_images: B.
        pixels: rows per image (Ho * Wo for the forward and grad_weight, H * W for grad_input).
        block_m: rows per tile.

    Returns:
        tile_ticket, tile_first, tile_end: (J,) int32 each, J = :func:`max_tiles` (the launch grid's first axis).
    """
    # Row positions are int32 inside the kernels (memory offsets are int64).
    assert num_images * pixels < 2**31, "more than 2**31 pixel rows in one batch"

    def build() -> Tuple[Tensor, Tensor, Tensor]:
        num_tickets = offsets.shape[0] - 1
        row_offsets = offsets * pixels
        num_tiles = max_tiles(num_images, num_tickets, block_m, pixels)
        ticket, first, safe = _tile_table(row_offsets, num_tiles, block_m)
        end = row_offsets[safe + 1]
        return ticket.to(torch.int32), first.to(torch.int32), end.to(torch.int32)

    return _cached(offsets, ("pixels", num_images, pixels, block_m), build)


@triton.jit
def span(start, BLOCK: tl.constexpr, limit):
    """Indices start .. start + BLOCK (BLOCK,) and which of them are below ``limit`` (BLOCK,)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < limit


@triton.jit
def gather_rows(perm_ptr, first, end, BLOCK_M: tl.constexpr):
    """Batch rows (BLOCK_M,) int64 of grouped positions first .. first + BLOCK_M, and which are before ``end``.

    Reading the rows through the permutation lets the loads gather and the stores scatter: no permuted copy is made.
    """
    pos, ok = span(first, BLOCK_M, end)
    rows = tl.load(perm_ptr + pos, mask=ok, other=0)
    return rows, ok


@triton.jit
def tile_rows(perm_ptr, offsets_ptr, tile_first_ptr, tile, t, BLOCK_M: tl.constexpr):
    """Batch rows (BLOCK_M,) int64 of row tile ``tile`` of ticket ``t``, and which belong to it (BLOCK_M,)."""
    first = tl.load(tile_first_ptr + tile)
    end = tl.load(offsets_ptr + t + 1).to(tl.int32)
    return gather_rows(perm_ptr, first, end, BLOCK_M)


@triton.jit
def tile_pixels(perm_ptr, tile_first_ptr, tile_end_ptr, tile, P, BLOCK_M: tl.constexpr):
    """Image (BLOCK_M,) int64, pixel and in-tile flag (BLOCK_M,) of the rows of pixel tile ``tile``, P per image."""
    first = tl.load(tile_first_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    pos, ok = span(first, BLOCK_M, end)
    img = tl.load(perm_ptr + pos // P, mask=ok, other=0).to(tl.int64)
    return img, pos % P, ok


@triton.jit
def window_origin(pix, Wo, SH, SW, PH, PW):
    """Input row and column (BLOCK_M,) each of the top-left tap of output pixels ``pix``; negative in the padding."""
    return (pix // Wo) * SH - PH, (pix % Wo) * SW - PW


@triton.jit
def tap_coords(k, KH: tl.constexpr, KW: tl.constexpr):
    """Input channel, tap row and tap column (BLOCK_K,) each of reduction indices ``k``, ordered (c, r, s) like W."""
    return k // (KH * KW), (k % (KH * KW)) // KW, k % KW


@triton.jit
def load_patch(x_ptr, row_off, chan_off, h0, w0, r, s, row_ok, k_ok, H, W, DH, DW):
    """(BLOCK_M, BLOCK_K) tile of input patches, x[row_off[m] + chan_off[k] + hi * W + wi], zero in the padding.

    row_off (BLOCK_M,) and chan_off (BLOCK_K,) int64 locate each row's image and each column's channel plane;
    h0, w0 (BLOCK_M,) from :func:`window_origin`; r, s (BLOCK_K,) from :func:`tap_coords`.
    """
    hi = h0[:, None] + r[None, :] * DH
    wi = w0[:, None] + s[None, :] * DW
    inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    return tl.load(
        x_ptr + row_off[:, None] + chan_off[None, :] + hi * W + wi,
        mask=row_ok[:, None] & k_ok[None, :] & inside,
        other=0.0,
    )


@triton.jit
def weight_block(o, o_ok, k, k_ok, K):
    """Offsets (BLOCK_N, BLOCK_K) of W[o, k] in the row-major (O, K) view, o int64, and which lie inside it."""
    return o[:, None] * K + k[None, :], o_ok[:, None] & k_ok[None, :]


@triton.jit
def weight_block_t(o, o_ok, k, k_ok, K):
    """:func:`weight_block` read transposed through the pointers, (BLOCK_K, BLOCK_N): the B operand of x Wᵀ."""
    return o[None, :] * K + k[:, None], k_ok[:, None] & o_ok[None, :]


@triton.jit
def load_kept_weights(w_ptr, mask_base, w_off, w_in, partial):
    """The block of W at ``w_off`` with the ticket's pruned weights as zeros; ``partial`` is 0 for a fully kept block.

    A full block predicates the mask load off entirely (no memory traffic) and reads as all-kept. The mask predicates
    the weight load, not a where() on a loaded tile: a pruned weight, finite or not, is never read, and the tile goes
    straight to shared memory, which keeps fp32 tiles from spilling.
    """
    keep = tl.load(mask_base + w_off, mask=w_in & partial, other=1)
    return tl.load(w_ptr + w_off, mask=w_in & (keep != 0), other=0.0)


@triton.jit
def add_kept(acc, part, keep):
    """acc + part where ``keep`` is set, acc elsewhere; all (BLOCK_N, BLOCK_K).

    where(), not a multiply: zeros stay exact next to a non-finite gradient.
    """
    return acc + tl.where(keep != 0, part, tl.zeros_like(part))


@triton.jit
def load_rows(ptr, rows, row_ok, cols, col_ok, stride):
    """(BLOCK_M, BLOCK) tile ptr[rows[m] * stride + cols[j]] of a row-major matrix, zero outside row_ok x col_ok."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_rows(ptr, acc, rows, row_ok, cols, col_ok, stride):
    """Store acc (BLOCK_M, BLOCK) at ptr[rows[m] * stride + cols[j]] in ptr's dtype, inside row_ok x col_ok."""
    off = rows[:, None] * stride + cols[None, :]
    tl.store(ptr + off, acc.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def store_pixels(ptr, acc, img, pix, row_ok, ch, ch_ok, CH, P):
    """Store acc (BLOCK_M, BLOCK) at [img[m], ch[j], pix[m]] of a contiguous (B, CH, P) tensor, ch int64."""
    off = img[:, None] * CH * P + ch[None, :] * P + pix[:, None]
    tl.store(ptr + off, acc.to(ptr.dtype.element_ty), mask=row_ok[:, None] & ch_ok[None, :])
