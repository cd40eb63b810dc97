"""Triton kernels of the routed masked ops, one kernel a module, each with its launcher.

This package module itself imports no Triton (only torch): it holds what the kernels share (the linear kernels' row-tile
table, the dot precision); the conv kernels' pixel-tile table lives in conv2d_forward.py.
The kernel modules import Triton and are imported lazily by :mod:`rtl_kernels.backends.triton`.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for operands of this dtype.

    fp32 operands get "ieee" (exact fp32 products on the FMA units) so fp32 results match an fp32 reference, unless
    torch allows TF32 for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul precision
    other than "highest"): then "tf32", the tensor-core path, as torch's own fp32 matmuls take. 16-bit operands are
    unaffected by the setting, so they keep Triton's default ("tf32") rather than rely on how "ieee" is lowered for
    them.
    """
    if dtype != torch.float32:
        return "tf32"
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def max_row_tiles(num_rows: int, num_tickets: int, block_m: int) -> int:
    """Upper bound on the row tiles of a batch of ``num_rows`` rows grouped into ``num_tickets`` tickets.

    Every ticket with rows rounds its last tile up, adding at most one tile, and at most min(T, B) tickets have
    rows, so sum_t cdiv(count_t, block_m) <= cdiv(B, block_m) + min(T, B). The bound depends on shapes only,
    which is what lets the kernels launch without reading the counts back to the host.
    """
    return -(-num_rows // block_m) + min(num_tickets, num_rows)


def row_tiles(offsets: Tensor, num_rows: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """Per-tile tables of the routed kernels, built on the device with torch ops (no host synchronisation).

    Tile j of the upper-bound grid covers grouped positions tile_first[j] .. min(tile_first[j] + block_m,
    offsets[t + 1]) of ticket t = tile_ticket[j]; tiles past the last real one get tile_ticket = T and the
    kernels return at once.

    Args:
        offsets (T + 1,) int64: ticket t owns grouped positions offsets[t] .. offsets[t + 1].
        num_rows: B, the batch size (offsets[T]), known from shapes.
        block_m: rows per tile.

    Returns:
        tile_ticket (J,) int32 and tile_first (J,) int32, J = :func:`max_row_tiles`.
    """
    num_tickets = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + (block_m - 1)) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile = torch.arange(max_row_tiles(num_rows, num_tickets, block_m), device=offsets.device)
    ticket = torch.searchsorted(tile_end, tile, right=True)  # T for tiles past the last real one
    safe = ticket.clamp(max=num_tickets - 1)
    first = offsets[safe] + (tile - (tile_end - tiles)[safe]) * block_m
    return ticket.to(torch.int32), first.to(torch.int32)
