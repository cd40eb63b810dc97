"""Block-CSR layout of a stack of ticket masks, shared by the triton and cuda backends.

The weight (N, K) is cut into a grid of (block_n x block_k) blocks, NB = cdiv(N, block_n) block rows and
KB = cdiv(K, block_k) block columns; edge blocks are partial when N or K is not a multiple of the block. For each
ticket the layout lists the blocks in which the ticket keeps at least one weight, three ways:

- by (ticket, block row) for the forward pass, y = x (W ⊙ M_t)ᵀ walks a block row of W;
- by (ticket, block column) for grad_input, dx = dy (W ⊙ M_t) walks a block column;
- by W block, the tickets keeping it, for grad_weight, which writes each W block once.

Blocks a ticket keeps entirely are flagged ``full`` so a kernel may skip loading that mask tile; inside a
partially kept block kernels read the bool mask itself, so the result is exact for any mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BlockCSR:
    """Nonzero blocks of T masks (T, N, K) on a (block_n x block_k) grid; all index tensors live on the masks' device.

    Attributes:
        block_n, block_k: block shape (rows of W x columns of W).
        num_tickets: T.
        n_blocks_n: NB = cdiv(N, block_n).
        n_blocks_k: KB = cdiv(K, block_k).
        row_ptr (T*NB + 1,) int32: the nonzero blocks of (ticket t, block row nb) are entries
            row_ptr[t*NB + nb] .. row_ptr[t*NB + nb + 1] of col_idx and full.
        col_idx (nnz,) int32: their block column kb, ascending within each (t, nb).
        full (nnz,) int8: 1 when the ticket keeps every (in-bounds) weight of the block.
        t_col_ptr (T*KB + 1,) int32: the nonzero blocks of (ticket t, block column kb) are entries
            t_col_ptr[t*KB + kb] .. t_col_ptr[t*KB + kb + 1] of t_row_idx and t_full.
        t_row_idx (nnz,) int32: their block row nb, ascending within each (t, kb).
        t_full (nnz,) int8: as full, in the transposed order.
        w_ptr (NB*KB + 1,) int32: the tickets keeping any weight of W block (nb, kb) are
            w_tickets[w_ptr[nb*KB + kb] .. w_ptr[nb*KB + kb + 1]].
        w_tickets (nnz,) int32: ticket ids, ascending within each W block.
        occupancy: nonzero (ticket, block) pairs / (T*NB*KB), the fraction of block work a kernel cannot skip.
    """

    block_n: int
    block_k: int
    num_tickets: int
    n_blocks_n: int
    n_blocks_k: int
    row_ptr: Tensor
    col_idx: Tensor
    full: Tensor
    t_col_ptr: Tensor
    t_row_idx: Tensor
    t_full: Tensor
    w_ptr: Tensor
    w_tickets: Tensor
    occupancy: float

    @property
    def nnz(self) -> int:
        """Number of nonzero (ticket, block) pairs."""
        return int(self.col_idx.shape[0])

    def validate(self) -> None:
        """Check the layout is internally consistent (syncs with the device; for tests and debugging).

        Raises:
            ValueError: naming the first inconsistency found.
        """
        T, NB, KB = self.num_tickets, self.n_blocks_n, self.n_blocks_k
        if min(self.block_n, self.block_k, T, NB, KB) < 1:
            raise ValueError(
                f"block_n, block_k, num_tickets, n_blocks_n, n_blocks_k must be >= 1, got "
                f"{self.block_n}, {self.block_k}, {T}, {NB}, {KB}"
            )
        nnz = self.nnz
        _check_index("row_ptr", self.row_ptr, T * NB + 1, torch.int32)
        _check_index("col_idx", self.col_idx, nnz, torch.int32)
        _check_index("full", self.full, nnz, torch.int8)
        _check_index("t_col_ptr", self.t_col_ptr, T * KB + 1, torch.int32)
        _check_index("t_row_idx", self.t_row_idx, nnz, torch.int32)
        _check_index("t_full", self.t_full, nnz, torch.int8)
        _check_index("w_ptr", self.w_ptr, NB * KB + 1, torch.int32)
        _check_index("w_tickets", self.w_tickets, nnz, torch.int32)
        _check_segments("row_ptr/col_idx", self.row_ptr, self.col_idx, KB)
        _check_segments("t_col_ptr/t_row_idx", self.t_col_ptr, self.t_row_idx, NB)
        _check_segments("w_ptr/w_tickets", self.w_ptr, self.w_tickets, T)
        for name, flags in (("full", self.full), ("t_full", self.t_full)):
            if flags.numel() and not bool(((flags == 0) | (flags == 1)).all()):
                raise ValueError(f"{name} must hold only 0 and 1")
        # The three indices must describe one set of (ticket, nb, kb) blocks with the same full flags.
        forward = _dense_flags(self.row_ptr, self.col_idx, self.full, T, NB, KB)
        transposed = _dense_flags(self.t_col_ptr, self.t_row_idx, self.t_full, T, KB, NB).transpose(1, 2)
        if not torch.equal(forward, transposed):
            raise ValueError("the transposed index (t_col_ptr, t_row_idx, t_full) disagrees with row_ptr/col_idx/full")
        per_block = torch.zeros(NB * KB, T, dtype=torch.bool, device=self.w_ptr.device)
        if nnz:
            seg = _segment_ids(self.w_ptr)
            per_block[seg, self.w_tickets.long()] = True
        if not torch.equal(per_block.view(NB, KB, T).permute(2, 0, 1), forward > 0):
            raise ValueError("the per-block ticket lists (w_ptr, w_tickets) disagree with row_ptr/col_idx")
        expected = nnz / float(T * NB * KB)
        if abs(self.occupancy - expected) > 1e-12:
            raise ValueError(f"occupancy is {self.occupancy}, but nnz / (T*NB*KB) = {expected}")


def compile_block_csr(masks: Tensor, block_n: int, block_k: int) -> BlockCSR:
    """Compile bool masks (T, N, K) into a :class:`BlockCSR` on the masks' device (vectorised, no per-block loop).

    Args:
        masks (T, N, K) bool: one mask per ticket.
        block_n: block height (rows of W), >= 1.
        block_k: block width (columns of W), >= 1.

    Returns:
        The layout; all-zero blocks are left out, partial edge blocks are included when they keep any weight.

    Example:
        >>> m = torch.zeros(2, 5, 7, dtype=torch.bool); m[1, 4, 6] = True
        >>> csr = compile_block_csr(m, 4, 4)
        >>> csr.row_ptr.tolist(), csr.col_idx.tolist(), csr.w_tickets.tolist()
        ([0, 0, 0, 0, 1], [1], [1])
    """
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(
            f"masks must be a bool tensor (T, N, K), got "
            f"{masks.dtype if isinstance(masks, Tensor) else type(masks).__name__} "
            f"{tuple(masks.shape) if isinstance(masks, Tensor) else ''}"
        )
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    T, N, K = masks.shape
    if min(T, N, K) < 1:
        raise ValueError(f"masks must have T, N, K >= 1, got shape {tuple(masks.shape)}")
    NB, KB = -(-N // block_n), -(-K // block_k)
    pad = (0, KB * block_k - K, 0, NB * block_n - N)
    # Padding with False leaves "any weight kept" unchanged; padding with True leaves "every in-bounds weight
    # kept" unchanged, so partial edge blocks are judged on their real weights only.
    as_blocks = (T, NB, block_n, KB, block_k)
    kept = F.pad(masks, pad, value=False).view(as_blocks).any(dim=4).any(dim=2)  # (T, NB, KB)
    full = F.pad(masks, pad, value=True).view(as_blocks).all(dim=4).all(dim=2)

    # nonzero() lists indices in row-major order, which gives every index its ascending inner order.
    t_i, nb_i, kb_i = kept.nonzero(as_tuple=True)
    kept_t = kept.transpose(1, 2)  # (T, KB, NB)
    tt_i, tkb_i, tnb_i = kept_t.nonzero(as_tuple=True)
    kept_w = kept.permute(1, 2, 0)  # (NB, KB, T)
    wnb_i, wkb_i, wt_i = kept_w.nonzero(as_tuple=True)
    nnz = int(t_i.shape[0])

    return BlockCSR(
        block_n=block_n,
        block_k=block_k,
        num_tickets=T,
        n_blocks_n=NB,
        n_blocks_k=KB,
        row_ptr=_pointers(kept.sum(dim=2).flatten()),
        col_idx=kb_i.to(torch.int32),
        full=full[t_i, nb_i, kb_i].to(torch.int8),
        t_col_ptr=_pointers(kept_t.sum(dim=2).flatten()),
        t_row_idx=tnb_i.to(torch.int32),
        t_full=full[tt_i, tnb_i, tkb_i].to(torch.int8),
        w_ptr=_pointers(kept_w.sum(dim=2).flatten()),
        w_tickets=wt_i.to(torch.int32),
        occupancy=nnz / float(T * NB * KB),
    )


def _pointers(counts: Tensor) -> Tensor:
    """Exclusive prefix sum of per-segment counts (S,) -> int32 pointers (S + 1,)."""
    ptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    ptr[1:] = counts.cumsum(0)
    return ptr


def _segment_ids(ptr: Tensor) -> Tensor:
    """Segment id of every entry of a CSR pointer array (ptr must already be checked monotone)."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=ptr.device), counts)


def _dense_flags(ptr: Tensor, idx: Tensor, full: Tensor, T: int, rows: int, cols: int) -> Tensor:
    """(T, rows, cols) int8: 0 for a block left out, 1 for a partial block, 2 for a full block."""
    dense = torch.zeros(T * rows, cols, dtype=torch.int8, device=ptr.device)
    if idx.numel():
        dense[_segment_ids(ptr), idx.long()] = 1 + full
    return dense.view(T, rows, cols)


def _check_index(name: str, value: Tensor, length: int, dtype: torch.dtype) -> None:
    if not isinstance(value, Tensor) or value.dtype != dtype or value.dim() != 1 or value.shape[0] != length:
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 1-D {dtype} tensor of length {length}, got {got}")


def _check_segments(name: str, ptr: Tensor, idx: Tensor, bound: int) -> None:
    """ptr starts at 0, never decreases and ends at len(idx); idx lies in [0, bound), ascending within a segment."""
    if int(ptr[0]) != 0 or int(ptr[-1]) != idx.shape[0]:
        raise ValueError(f"{name}: pointers must run from 0 to {idx.shape[0]}, got {int(ptr[0])} .. {int(ptr[-1])}")
    if bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{name}: pointers must not decrease")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= bound:
        raise ValueError(f"{name}: indices must lie in [0, {bound}), got {int(idx.min())} .. {int(idx.max())}")
    seg = _segment_ids(ptr)
    same_segment = seg[1:] == seg[:-1]
    if bool((same_segment & (idx[1:] <= idx[:-1])).any()):
        raise ValueError(f"{name}: indices must be strictly ascending within each segment")
