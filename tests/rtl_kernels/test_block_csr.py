"""compile_block_csr: the GPU block-CSR layout, checked against a per-block Python oracle on small masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rtl_kernels.formats.block_csr import BlockCSR, compile_block_csr

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]

# (T, N, K, block_n, block_k): edge blocks in one or both dims, exact multiples, 1x1 weights, 1-row blocks.
SHAPES = [
    (3, 19, 23, 16, 16),
    (2, 70, 90, 64, 64),
    (1, 5, 7, 4, 4),
    (4, 64, 128, 32, 64),
    (2, 1, 1, 16, 16),
    (2, 9, 33, 1, 8),
]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0, "blocks"]


def _masks(T, N, K, bn, bk, density, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if density == "blocks":
        # Whole blocks on or off, with some kept blocks thinned: full, partial and empty blocks side by side.
        nb, kb = -(-N // bn), -(-K // bk)
        on = torch.rand(T, nb, kb, generator=g) < 0.5
        dense = on.repeat_interleave(bn, 1).repeat_interleave(bk, 2)[:, :N, :K]
        thinned = torch.rand(T, nb, kb, generator=g) < 0.3
        thin = thinned.repeat_interleave(bn, 1).repeat_interleave(bk, 2)[:, :N, :K]
        masks = dense & ~(thin & (torch.rand(T, N, K, generator=g) < 0.5))
    else:
        masks = torch.rand(T, N, K, generator=g) < density
    return masks.to(device)


def _oracle(masks, bn, bk):
    """{(t, nb, kb): full} for every block a ticket keeps, by a plain loop."""
    T, N, K = masks.shape
    blocks = {}
    for t in range(T):
        for nb in range(-(-N // bn)):
            for kb in range(-(-K // bk)):
                tile = masks[t, nb * bn : (nb + 1) * bn, kb * bk : (kb + 1) * bk]
                if bool(tile.any()):
                    blocks[(t, nb, kb)] = bool(tile.all())
    return blocks


def _read_segments(ptr, idx, flags=None):
    """[(segment, index, flag)] from a CSR pointer/index pair."""
    ptr, idx = ptr.tolist(), idx.tolist()
    flags = flags.tolist() if flags is not None else [None] * len(idx)
    return [(s, idx[e], flags[e]) for s in range(len(ptr) - 1) for e in range(ptr[s], ptr[s + 1])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle_and_round_trips(shape, density, device):
    T, N, K, bn, bk = shape
    masks = _masks(T, N, K, bn, bk, density, device)
    layout = compile_block_csr(masks, bn, bk)
    layout.validate()
    NB, KB = -(-N // bn), -(-K // bk)
    assert (layout.num_tickets, layout.n_blocks_n, layout.n_blocks_k) == (T, NB, KB)
    for name in ("row_ptr", "col_idx", "full", "t_col_ptr", "t_row_idx", "t_full", "w_ptr", "w_tickets"):
        assert getattr(layout, name).device == masks.device, name

    expected = _oracle(masks.cpu(), bn, bk)
    forward = {
        (s // NB, s % NB, kb): bool(f) for s, kb, f in _read_segments(layout.row_ptr, layout.col_idx, layout.full)
    }
    transposed = {
        (s // KB, nb, s % KB): bool(f) for s, nb, f in _read_segments(layout.t_col_ptr, layout.t_row_idx, layout.t_full)
    }
    per_block = {(t, s // KB, s % KB) for s, t, _ in _read_segments(layout.w_ptr, layout.w_tickets)}
    assert forward == expected
    assert transposed == expected
    assert per_block == set(expected)
    assert layout.nnz == len(expected)
    assert layout.occupancy == pytest.approx(len(expected) / (T * NB * KB))

    # Round trip: the listed blocks, filled from the masks, rebuild the masks (no kept weight outside them).
    rebuilt = torch.zeros_like(masks, device="cpu")
    cpu = masks.cpu()
    for t, nb, kb in forward:
        rows, cols = slice(nb * bn, (nb + 1) * bn), slice(kb * bk, (kb + 1) * bk)
        rebuilt[t, rows, cols] = cpu[t, rows, cols]
    assert torch.equal(rebuilt, cpu)


def test_docstring_example():
    m = torch.zeros(2, 5, 7, dtype=torch.bool)
    m[1, 4, 6] = True
    layout = compile_block_csr(m, 4, 4)
    assert layout.row_ptr.tolist() == [0, 0, 0, 0, 1]
    assert layout.col_idx.tolist() == [1] and layout.w_tickets.tolist() == [1]
    # The edge block (rows 4..4, columns 4..6) is partial: only one of its three in-bounds weights is kept.
    assert layout.full.tolist() == [0]
    m[1, 4, 4:] = True
    assert compile_block_csr(m, 4, 4).full.tolist() == [1]


def _corrupt(layout: BlockCSR, **changes) -> BlockCSR:
    return dataclasses.replace(layout, **changes)


def test_validate_rejects_inconsistent_layouts():
    masks = _masks(3, 19, 23, 8, 8, 0.3, "cpu")
    layout = compile_block_csr(masks, 8, 8)
    layout.validate()
    assert layout.nnz > 2
    col = layout.col_idx.clone()
    col[0] = layout.n_blocks_k
    cases = {
        "indices must lie in": _corrupt(layout, col_idx=col),
        "must be a 1-D torch.int32": _corrupt(layout, row_ptr=layout.row_ptr.long()),
        "pointers must run from 0": _corrupt(layout, w_ptr=layout.w_ptr + 1),
        "strictly ascending": _corrupt(layout, w_tickets=layout.w_tickets.flip(0)),
        "transposed index": _corrupt(layout, t_full=1 - layout.t_full),
        "occupancy": _corrupt(layout, occupancy=layout.occupancy + 0.5),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            bad.validate()


def test_bad_arguments():
    masks = torch.ones(2, 3, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool tensor"):
        compile_block_csr(masks.float(), 16, 16)
    with pytest.raises(TypeError, match="bool tensor"):
        compile_block_csr(masks[0], 16, 16)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        compile_block_csr(masks, 16, 0)
    with pytest.raises(ValueError, match="T, N, K >= 1"):
        compile_block_csr(masks[:0], 16, 16)
