"""Row-compressed indices of a routed linear layer's masks, as the cpu backend's sparse kernels read them.

For masks (T, N, K): per (ticket, output row) the kept inputs (CSR, forward and weight gradient), per (ticket,
input) the kept outputs (CSC, input gradient), each also cut every ``CHUNK`` inputs so that a kernel can walk a
64-row tile one L1-sized chunk of inputs at a time. Only the tickets sparse enough to ever take a sparse kernel are
indexed (``indexed``); the others get empty rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import check_int32_columns
from .conv_index import count_kept, ticket_twins

# Inputs per chunk of the chunked walk of the kernels (csrc/cpu reads the chunk pointers, whatever their size):
# 64 inputs of a 64-row tile are 16 KB, half of L1.
CHUNK = 64


@dataclass(frozen=True)
class CpuLinearLayout:
    """Compiled masks of one routed linear layer for the cpu backend.

    Attributes:
        indexed (T,) bool: tickets sparse enough to ever take the sparse kernel (indexed below); whether a
            ticket does in one call also depends on its rows in that batch.
        csr_ptr (T * N + 1,) int64 / csr_idx int32: kept inputs of output n of sparse ticket t.
        csr_chunk_ptr (T * N * ceil(K / CHUNK) + 1,) int64: the same entries cut every CHUNK inputs.
        csc_ptr (T * K + 1,) int64 / csc_idx int32: kept outputs of input k of sparse ticket t.
        csc_chunk_ptr (T * K * ceil(N / CHUNK) + 1,) int64: likewise.
        density (T,) float: kept fraction of each ticket.
        all_ones (T,) bool: tickets keeping every weight.
        twin (T,) int64: the first ticket with an identical mask (tickets with one twin run as one).
        float_masks: ticket -> masks[t] as float32 (N, K), made on first use by the dense path.
    """

    indexed: Tensor
    csr_ptr: Tensor
    csr_chunk_ptr: Tensor
    csr_idx: Tensor
    csc_ptr: Tensor
    csc_chunk_ptr: Tensor
    csc_idx: Tensor
    density: Tensor
    all_ones: Tensor
    twin: Tensor
    float_masks: dict


def _index(masks: Tensor, indexed: Tensor):
    """Row pointer (T * rows + 1,), chunk pointer (T * rows * C + 1,) int64 and column indices int32 of the
    indexed tickets of (T, rows, cols) bool masks (the others get empty rows), C = ceil(cols / CHUNK). Ticket by
    ticket, so that nonzero()'s int64 rows and the padded copy stay the size of one ticket."""
    t, rows, cols = masks.shape
    check_int32_columns("a linear mask", cols)
    n_chunks = max(1, -(-cols // CHUNK))
    per_chunk = torch.zeros(t, rows * n_chunks, dtype=torch.int64)
    parts = []
    for i in range(t):
        if not bool(indexed[i]):
            continue
        padded = F.pad(masks[i], (0, n_chunks * CHUNK - cols))
        per_chunk[i] = count_kept(padded.reshape(rows * n_chunks, CHUNK))
        parts.append(masks[i].nonzero()[:, 1].to(torch.int32))  # (row, col) in order: CSR order
    chunk_ptr = torch.zeros(t * rows * n_chunks + 1, dtype=torch.int64)
    torch.cumsum(per_chunk.reshape(-1), 0, out=chunk_ptr[1:])
    ptr = chunk_ptr[::n_chunks].contiguous()  # row boundaries are every C-th chunk boundary
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    return ptr, chunk_ptr, idx


def compile_cpu_layout(masks: Tensor, sparse_max_density: float) -> CpuLinearLayout:
    """Compile (T, N, K) bool masks, indexing the tickets whose density is under ``sparse_max_density``."""
    t = masks.shape[0]
    kept = count_kept(masks.reshape(t, -1))
    density = kept.float() / max(1, masks[0].numel())
    sparse = density < sparse_max_density
    csr_ptr, csr_chunk_ptr, csr_idx = _index(masks, sparse)
    csc_ptr, csc_chunk_ptr, csc_idx = _index(masks.transpose(1, 2), sparse)
    return CpuLinearLayout(
        indexed=sparse,
        csr_ptr=csr_ptr,
        csr_chunk_ptr=csr_chunk_ptr,
        csr_idx=csr_idx,
        csc_ptr=csc_ptr,
        csc_chunk_ptr=csc_chunk_ptr,
        csc_idx=csc_idx,
        density=density,
        all_ones=kept == masks[0].numel(),
        twin=ticket_twins(masks),
        float_masks={},
    )
