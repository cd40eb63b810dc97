"""Tests of the cuda backend (rtl_kernels/backends/cuda.py + rtl_kernels._C_cuda).

GPU tests (marked ``gpu``) compare every kernel with the reference backend run in float64 on fresh random inputs:
odd shapes, B = 1, T = 1, empty and skewed tickets, densities 0 / 0.1 / 0.5 / 0.9 / 1, float32 (TF32 off, close
to float64) and float16 / bfloat16 (our error at most twice the error of the same computation done by PyTorch in
that dtype), exact zeros of dW outside the masks of the tickets present, outputs poisoned before the kernels write
them, split grad_weight determinism, CUDA-graph capture. They skip without a GPU or without the built extension.
The CPU tests check that the built extension loads and registers its ops, and the backend's reasons.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels
from rtl_kernels import _extension, group_by_ticket
from rtl_kernels.backends import get_backend_module

_MODULE, _LOAD_REASON = _extension.load("_C_cuda")
HAS_GPU = torch.cuda.is_available()

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(_MODULE is None, reason=f"rtl_kernels._C_cuda not built: {_LOAD_REASON}")

LOW_PRECISION = (torch.float16, torch.bfloat16)
DENSITIES = (0.0, 0.1, 0.5, 0.9, 1.0)
# (B, N, K, T): odd shapes (not multiples of 16), a single row, T = 1, several 64-blocks with partial edges,
# 16-byte-aligned rows (K, N multiples of 8: the vector-load path) and T > 32 (several rounds of the tile search).
SHAPES = [
    (37, 19, 23, 3),
    (1, 19, 23, 3),
    (37, 19, 23, 1),
    (130, 70, 150, 4),
    (300, 129, 257, 5),
    (200, 72, 128, 3),
    (75, 40, 24, 40),
]


def _seed(*parts) -> int:
    """A seed per test case that is stable across processes (str hashing is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _cuda():
    return get_backend_module("cuda")


def _ref():
    return get_backend_module("reference")


def _case(b, n, k, t, density, dtype, seed, *, absent=(), bias=True, device="cuda"):
    """Fresh random inputs: x (B, K), weight (N, K), masks (T, N, K), bias (N), route (B), grad_y (B, N)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5
    masks = torch.rand(t, n, k, generator=gen) < density
    present = torch.tensor([i for i in range(t) if i not in absent])
    route = present[torch.randint(len(present), (b,), generator=gen)]
    bias_t = torch.randn(n, generator=gen) if bias else None
    grad_y = torch.randn(b, n, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (
        x.to(**to),
        weight.to(**to),
        masks.to(device),
        None if bias_t is None else bias_t.to(**to),
        route.to(device),
        grad_y.to(**to),
    )


def _grouping(route, t):
    g = group_by_ticket(route, t)
    return g.perm, g.offsets


def _f64(*tensors):
    return [None if v is None else v.double() for v in tensors]


def _all_three(backend, x, weight, masks, bias, perm, offsets, grad_y):
    y = backend.linear_forward(x, weight, masks, bias, perm, offsets)
    dx = backend.linear_grad_input(grad_y, weight, masks, perm, offsets)
    dw = backend.linear_grad_weight(grad_y, x, masks, perm, offsets)
    return y, dx, dw


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _check_fp32(ours, ref, what):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = _max_err(ours, ref)
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3e} vs float64 (scale {scale:.3g})"


def _outside_union(masks, route):
    """bool (N, K): weights kept by no ticket present in route."""
    present = torch.unique(route)
    return ~masks[present].any(dim=0)


# ------------------------------------------------------------------------------------------------------------------
# GPU: against the float64 reference
# ------------------------------------------------------------------------------------------------------------------
@gpu
@needs_gpu
@needs_ext
def test_available_on_this_gpu():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _cuda().unavailable_reason(torch.device("cuda"), dtype) is None, dtype
    assert "cuda" in rtl_kernels.available_backends("cuda", torch.float32)


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_K{}_T{}".format(*s))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_matches_float64_reference(shape, density, bias):
    b, n, k, t = shape
    seed = _seed(shape, density, bias)
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, density, torch.float32, seed=seed, bias=bias)
    perm, offsets = _grouping(route, t)
    ours = _all_three(_cuda(), x, w, masks, bias_t, perm, offsets, gy)
    xd, wd, bd, gyd = _f64(x, w, bias_t, gy)
    ref = _all_three(_ref(), xd, wd, masks, bd, perm, offsets, gyd)
    for name, o, r in zip(("forward", "grad_input", "grad_weight"), ours, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        _check_fp32(o, r, name)
    dw = ours[2]
    assert bool((dw[_outside_union(masks, route)] == 0).all()), "dW must be exactly zero outside the present masks"


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_K{}_T{}".format(*s))
@pytest.mark.parametrize("density", DENSITIES)
def test_low_precision_error_at_most_twice_torch(dtype, shape, density):
    b, n, k, t = shape
    seed = _seed(shape, density, str(dtype))
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, density, dtype, seed=seed)
    perm, offsets = _grouping(route, t)
    ours = _all_three(_cuda(), x, w, masks, bias_t, perm, offsets, gy)
    theirs = _all_three(_ref(), x, w, masks, bias_t, perm, offsets, gy)  # PyTorch itself, in this dtype
    xd, wd, bd, gyd = _f64(x, w, bias_t, gy)
    exact = _all_three(_ref(), xd, wd, masks, bd, perm, offsets, gyd)
    for name, o, th, ex in zip(("forward", "grad_input", "grad_weight"), ours, theirs, exact):
        assert o.dtype == dtype and o.shape == ex.shape, name
        assert bool(torch.isfinite(o).all()), name
        ours_err, torch_err = _max_err(o, ex), _max_err(th, ex)
        assert ours_err <= 2 * torch_err, f"{name}: our error {ours_err:.3e} > 2 x torch's {torch_err:.3e}"
    assert bool((ours[2][_outside_union(masks, route)] == 0).all())


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32,) + LOW_PRECISION, ids=str)
def test_single_ticket_equals_dense_masked_linear(dtype):
    b, n, k = 53, 45, 77
    x, w, masks, bias_t, route, gy = _case(b, n, k, 1, 0.6, dtype, seed=11)
    perm, offsets = _grouping(route, 1)
    y = _cuda().linear_forward(x, w, masks, bias_t, perm, offsets)
    dense = F.linear(x.double(), (w * masks[0]).double(), bias_t.double())
    if dtype == torch.float32:
        _check_fp32(y, dense, "T=1 forward")
    else:
        torch_err = _max_err(F.linear(x, w * masks[0], bias_t), dense)
        assert _max_err(y, dense) <= 2 * torch_err


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_empty_and_skewed_tickets(dtype):
    # Tickets 1 and 3 get no rows, but their masks keep weights the others do not: dW must stay zero there.
    b, n, k, t = 90, 67, 70, 5
    for absent in ((1, 3), (0, 1, 2, 3)):  # the second: every row on ticket 4
        x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.3, dtype, seed=len(absent), absent=absent)
        masks[1] = True
        perm, offsets = _grouping(route, t)
        ours = _all_three(_cuda(), x, w, masks, bias_t, perm, offsets, gy)
        xd, wd, bd, gyd = _f64(x, w, bias_t, gy)
        ref = _all_three(_ref(), xd, wd, masks, bd, perm, offsets, gyd)
        outside = _outside_union(masks, route)
        assert bool(outside.any())
        assert bool((ours[2][outside] == 0).all())
        if dtype == torch.float32:
            for name, o, r in zip(("forward", "grad_input", "grad_weight"), ours, ref):
                _check_fp32(o, r, name)
        else:
            theirs = _all_three(_ref(), x, w, masks, bias_t, perm, offsets, gy)
            for o, th, r in zip(ours, theirs, ref):
                assert _max_err(o, r) <= 2 * _max_err(th, r)


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_nan_outside_masks_does_not_leak(dtype):
    # NaN in pruned weights must not reach y or dx (select, not multiply); a NaN gradient row must leave dW exactly
    # zero outside the present masks.
    b, n, k, t = 40, 33, 70, 3
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.5, dtype, seed=5)
    perm, offsets = _grouping(route, t)
    union = masks.any(dim=0)
    w_nan = torch.where(union, w, torch.full_like(w, float("nan")))
    y = _cuda().linear_forward(x, w_nan, masks, bias_t, perm, offsets)
    dx = _cuda().linear_grad_input(gy, w_nan, masks, perm, offsets)
    # Pruned weights become zeros whatever they hold, so the results equal those of the finite W bit for bit.
    assert torch.equal(y, _cuda().linear_forward(x, w, masks, bias_t, perm, offsets))
    assert torch.equal(dx, _cuda().linear_grad_input(gy, w, masks, perm, offsets))
    gy_nan = gy.clone()
    gy_nan[0, :] = float("nan")
    dw = _cuda().linear_grad_weight(gy_nan, x, masks, perm, offsets)
    assert bool((dw[_outside_union(masks, route)] == 0).all())


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_every_output_element_written(dtype):
    # Call the internal ops directly with outputs poisoned with NaN: any element the kernels skip stays NaN.
    from rtl_kernels.backends.cuda import BLOCK_K, BLOCK_N, _layout

    b, n, k, t = 77, 131, 97, 4
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.2, dtype, seed=9, absent=(2,))
    masks[0, :64] = False  # ticket 0 keeps no block in the first block row
    perm, offsets = _grouping(route, t)
    lay = _layout(masks)
    ops = torch.ops.rtl_kernels
    y = torch.full((b, n), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_forward(
        x, w, masks, bias_t, perm, offsets, lay.row_ptr, lay.col_idx, lay.full, BLOCK_N, BLOCK_K, y
    )
    dx = torch.full((b, k), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_grad_input(
        gy, w, masks, perm, offsets, lay.t_col_ptr, lay.t_row_idx, lay.t_full, BLOCK_N, BLOCK_K, dx
    )
    dw = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_grad_weight(gy, x, masks, perm, offsets, lay.w_ptr, lay.w_tickets, BLOCK_N, BLOCK_K, dw)
    for name, out in (("y", y), ("dx", dx), ("dw", dw)):
        assert bool(torch.isfinite(out).all()), f"{name} has elements the kernel did not write"


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_split_grad_weight_is_correct_and_deterministic(dtype):
    # A small W with many rows: grad_weight splits the rows over blocks (fp32 partials + an ordered sum).
    b, n, k, t = 9000, 70, 66, 3
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.5, dtype, seed=21)
    perm, offsets = _grouping(route, t)
    dw1 = _cuda().linear_grad_weight(gy, x, masks, perm, offsets)
    dw2 = _cuda().linear_grad_weight(gy, x, masks, perm, offsets)
    assert torch.equal(dw1, dw2), "grad_weight must be bitwise deterministic"
    exact = _ref().linear_grad_weight(*_f64(gy, x), masks, perm, offsets)
    if dtype == torch.float32:
        _check_fp32(dw1, exact, "grad_weight")
    else:
        theirs = _ref().linear_grad_weight(gy, x, masks, perm, offsets)
        assert _max_err(dw1, exact) <= 2 * _max_err(theirs, exact)
    assert bool((dw1[_outside_union(masks, route)] == 0).all())


@gpu
@needs_gpu
@needs_ext
def test_layout_follows_in_place_mask_edits():
    b, n, k, t = 50, 40, 30, 2
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.5, torch.float32, seed=3)
    perm, offsets = _grouping(route, t)
    _cuda().linear_forward(x, w, masks, bias_t, perm, offsets)
    masks.logical_not_()  # bumps the version: the cached layout must be recompiled
    y = _cuda().linear_forward(x, w, masks, bias_t, perm, offsets)
    ref = _ref().linear_forward(*_f64(x, w), masks, bias_t.double(), perm, offsets)
    _check_fp32(y, ref, "forward after a mask edit")


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_public_op_forward_backward(dtype):
    b, n, k, t = 45, 27, 31, 3
    x, w, masks, bias_t, route, gy = _case(b, n, k, t, 0.5, dtype, seed=17)
    leaves = [v.clone().requires_grad_() for v in (x, w, bias_t)]
    with rtl_kernels.set_backend("cuda"):
        y = rtl_kernels.routed_masked_linear(leaves[0], leaves[1], masks, route, leaves[2])
        y.backward(gy)
    refs = [v.double().requires_grad_() for v in (x, w, bias_t)]
    with rtl_kernels.set_backend("reference"):
        y_ref = rtl_kernels.routed_masked_linear(refs[0], refs[1], masks, route, refs[2])
        y_ref.backward(gy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, o, r in (
        ("y", y, y_ref),
        ("dx", leaves[0].grad, refs[0].grad),
        ("dW", leaves[1].grad, refs[1].grad),
        ("db", leaves[2].grad, refs[2].grad),
    ):
        assert o.dtype == dtype
        assert _max_err(o, r.detach()) <= tol * max(1.0, r.abs().max().item()), name


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_forward_captures_in_cuda_graph(dtype):
    # No host synchronisation: the forward is captured once and replayed with new inputs *and a new routing*
    # (perm/offsets rewritten in place), which only works if tickets and row ranges are found on the device.
    b, n, k, t = 150, 70, 90, 4
    x, w, masks, bias_t, route, _ = _case(b, n, k, t, 0.5, dtype, seed=31)
    perm, offsets = _grouping(route, t)
    backend = _cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.linear_forward(x, w, masks, bias_t, perm, offsets)  # warm-up: loads the extension, compiles layout
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = backend.linear_forward(x, w, masks, bias_t, perm, offsets)

    for seed in (1, 2):
        x2, _, _, _, route2, _ = _case(b, n, k, t, 0.5, dtype, seed=100 + seed, absent=(seed,))
        perm2, offsets2 = _grouping(route2, t)
        x.copy_(x2)
        perm.copy_(perm2)
        offsets.copy_(offsets2)
        graph.replay()
        torch.cuda.synchronize()
        exact = _ref().linear_forward(*_f64(x, w), masks, bias_t.double(), perm, offsets)
        if dtype == torch.float32:
            _check_fp32(y_static, exact, "graph replay")
        else:
            theirs = _ref().linear_forward(x, w, masks, bias_t, perm, offsets)
            assert _max_err(y_static, exact) <= 2 * _max_err(theirs, exact)


# ------------------------------------------------------------------------------------------------------------------
# CPU: the built extension and the backend's reasons
# ------------------------------------------------------------------------------------------------------------------
@needs_ext
def test_extension_loads_and_registers_ops():
    import rtl_kernels._C_cuda  # noqa: F401

    for op in ("_cuda_linear_forward", "_cuda_linear_grad_input", "_cuda_linear_grad_weight", "_cuda_device_problem"):
        assert hasattr(torch.ops.rtl_kernels, op), op
    schema = str(torch.ops.rtl_kernels._cuda_linear_forward.default._schema)
    assert "Tensor(a!) out" in schema


@needs_ext
def test_ops_reject_cpu_tensors_clearly():
    from rtl_kernels.backends.cuda import BLOCK_K, BLOCK_N

    x = torch.randn(3, 4)
    z = torch.zeros(1, dtype=torch.int32)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.rtl_kernels._cuda_linear_forward(
            x,
            torch.randn(5, 4),
            torch.ones(1, 5, 4, dtype=torch.bool),
            None,
            torch.arange(3),
            torch.tensor([0, 3]),
            z,
            z,
            z.to(torch.int8),
            BLOCK_N,
            BLOCK_K,
            torch.empty(3, 5),
        )


def test_unavailable_reason_on_cpu_device():
    backend = _cuda()
    reason = backend.unavailable_reason(torch.device("cpu"), torch.float32)
    if _MODULE is None:
        assert reason is not None and "_C_cuda" in reason
    else:
        assert reason == "the cuda backend runs on CUDA tensors only"
        bad_dtype = backend.unavailable_reason(torch.device("cuda"), torch.float64)
        assert bad_dtype is not None and "float64" in bad_dtype
