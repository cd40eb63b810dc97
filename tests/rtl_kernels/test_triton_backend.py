"""What only the triton backend has: its availability rules, a lazy import, the split grad_weight of the conv (block
sizes chosen by the test) and backend methods that take an empty batch themselves.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA); on a
GPU the same tests run compiled (``gpu``). The contract shared with the other backends is in test_*_contract.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels.backends.triton import BACKEND as TRITON

triton_targets = pytest.mark.contract(targets=lambda t: t.backend == "triton")


def test_unavailable_reasons(monkeypatch):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert TRITON.unavailable_reason(torch.device("cuda"), dtype) is None
    assert "float64" in TRITON.unavailable_reason(torch.device("cuda"), torch.float64)
    assert "not on meta" in TRITON.unavailable_reason(torch.device("meta"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TRITON.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert "interpreter" in TRITON.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in TRITON.unavailable_reason(torch.device("cpu"), torch.float32)


def test_import_rtl_kernels_does_not_import_triton():
    code = "import sys, rtl_kernels; assert 'triton' not in sys.modules, 'rtl_kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _grouping(route, tickets):
    g = rk.group_by_ticket(route, tickets)
    return g.perm, g.offsets


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@triton_targets
def test_conv_split_grad_weight_keeps_the_zeros_and_values_of_the_whole_one(target, seed, conv_case, zero_outside):
    """The split path (partial sums per part of the pixel tiles, reduced by torch) with NaN/inf in the gradient: the
    same exact zeros outside the present masks, the same non-finite places, the same finite values."""
    from rtl_kernels.triton_kernels.conv2d_grad_weight import conv2d_grad_weight

    x, _, masks, _, _ = conv_case(3, 6, 4, (7, 6), (3, 3), 3, 0.3, seed, groups=2)
    route = torch.tensor([1, 2, 1])
    masks[0] = True  # ticket 0 has no images: its (full) mask must not open any weight
    grad_y = torch.randn(3, 4, 7, 6, generator=torch.Generator().manual_seed(seed))
    grad_y[0, :2, 1, 1] = float("nan")
    grad_y[1, 2:, 0, 3] = float("inf")
    x, masks, route, grad_y = target.put(x, masks, route, grad_y)
    args = (grad_y, x, masks, *_grouping(route, 3), (1, 1), (1, 1), (1, 1), 2)
    whole = TRITON.conv2d_grad_weight(*args).cpu()
    parts = conv2d_grad_weight(*args, block_m=16, block_n=16, block_k=16, split=3).cpu()
    outside = zero_outside(masks, route)
    assert outside.any() and bool((parts[outside] == 0).all()) and bool((whole[outside] == 0).all())
    finite = whole.isfinite()
    assert torch.equal(parts.isfinite(), finite)
    torch.testing.assert_close(parts[finite], whole[finite], rtol=1e-5, atol=1e-5)


@triton_targets
def test_conv_split_grad_weight_matches_float64(target, seed, conv_case, conv_oracle, check_float64):
    from rtl_kernels.triton_kernels.conv2d_grad_weight import conv2d_grad_weight

    geometry = dict(stride=(1, 2), padding=(1, 1), dilation=(2, 2), groups=1)
    x, w, masks, route, _ = conv_case(2, 4, 6, (9, 9), (3, 3), 3, 0.6, seed)
    grad_y = torch.randn(2, 6, 7, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = conv_oracle(x, w, masks, route, None, grad_y, **geometry).dweight
    x, masks, route, grad_y = target.put(x, masks, route, grad_y, dtype=torch.float32)
    for split in (1, 2, 5):
        dw = conv2d_grad_weight(
            grad_y, x, masks, *_grouping(route, 3), *geometry.values(), block_m=16, block_n=16, block_k=16, split=split
        )
        check_float64(dw, exact, f"dW split={split}")


@triton_targets
def test_conv_methods_take_an_empty_batch(target, conv_case):
    """Unlike the reference loop, the triton methods need no guard from the op for a batch without images."""
    x, w, masks, _, b = target.put(*conv_case(0, 3, 6, (7, 9), (3, 3), 3, 0.6))
    perm, offsets = _grouping(torch.zeros(0, dtype=torch.int64, device=target.device), 3)
    grad_y = torch.randn(0, 6, 7, 9, device=target.device)
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    y = TRITON.conv2d_forward(x, w, masks, b, perm, offsets, *geometry)
    dx = TRITON.conv2d_grad_input(grad_y, w, masks, perm, offsets, tuple(x.shape), *geometry)
    dw = TRITON.conv2d_grad_weight(grad_y, x, masks, perm, offsets, *geometry)
    assert y.shape == grad_y.shape and dx.shape == x.shape
    assert dw.shape == w.shape and bool((dw == 0).all())


def test_tile_tables_are_built_once_per_grouping_and_rebuilt_on_edit_or_capture(monkeypatch):
    # every layer of a model reads the same offsets: its tile tables are built once and shared; an in-place edit of
    # the offsets, or a CUDA graph capture (simulated), builds them again
    import gc
    import weakref

    from rtl_kernels.triton_kernels import tiles

    offsets = torch.tensor([0, 5, 5, 17, 20])
    rows = tiles.row_tiles(offsets, 20, 4)
    assert all(a is b for a, b in zip(tiles.row_tiles(offsets, 20, 4), rows))
    assert tiles.row_tiles(offsets, 20, 8)[0] is not rows[0]  # another tile shape
    pixels = tiles.pixel_tiles(offsets, 20, 9, 16)
    assert all(a is b for a, b in zip(tiles.pixel_tiles(offsets, 20, 9, 16), pixels))
    fresh = tiles.row_tiles(offsets.clone(), 20, 4)  # same values, another tensor: built on its own, equal
    assert fresh[0] is not rows[0] and all(torch.equal(a, b) for a, b in zip(fresh, rows))

    offsets[1:4] = torch.tensor([8, 12, 17])  # the grouping changed in place
    edited = tiles.row_tiles(offsets, 20, 4)
    want = tiles.row_tiles(offsets.clone(), 20, 4)
    assert edited[0] is not rows[0] and all(torch.equal(a, b) for a, b in zip(edited, want))
    assert int((edited[0] < 4).sum()) == sum(-(-c // 4) for c in (8, 4, 5, 3))  # real tiles per ticket

    monkeypatch.setattr(tiles, "_capturing", lambda t: True)
    assert tiles.row_tiles(offsets, 20, 4)[0] is not edited[0]  # under capture the build is part of the graph
    monkeypatch.undo()

    table = weakref.ref(edited[0])
    del offsets, rows, pixels, edited, want, fresh
    gc.collect()
    assert table() is None  # the entry died with its offsets
