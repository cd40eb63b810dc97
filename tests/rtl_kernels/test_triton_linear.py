"""The triton backend of routed_masked_linear against the float64 reference.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA;
fp32/fp16, small shapes); on a GPU the same tests run compiled (``-m gpu``), bf16 included.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels
from rtl_kernels.backends import get_backend_module
from rtl_kernels.backends.triton import BACKEND as TRITON

REFERENCE = get_backend_module("reference")
_CPU_REASON = TRITON.unavailable_reason(torch.device("cpu"), torch.float32)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CPU_REASON is not None, reason=f"triton on CPU: {_CPU_REASON}")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


# -- inputs ------------------------------------------------------------------------------------------------------


def _make(B, N, K, T, density, routing, *, seed=0, bias=True):
    """Fresh random float64 CPU inputs: x (B, K), weight (N, K), masks (T, N, K), route (B,), bias (N,) or None.

    routing: "uniform" (random tickets), "sparse" (only tickets 1 and T-1 get rows: the others have none),
    "one" (every row on ticket T-1). density: a float, or "blocks" (64x64 blocks all kept, all pruned or thinned,
    which exercises the kernels' full-block path and skipped blocks).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g, dtype=torch.float64)
    weight = torch.randn(N, K, generator=g, dtype=torch.float64)
    if density == "blocks":
        nb, kb = -(-N // 64), -(-K // 64)
        grid = torch.rand(T, nb, kb, generator=g)
        up = lambda m: m.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :N, :K]  # noqa: E731
        masks = up(grid < 0.6) & ~(up(grid < 0.2) & (torch.rand(T, N, K, generator=g) < 0.5))
    else:
        masks = torch.rand(T, N, K, generator=g) < density
    if routing == "uniform":
        route = torch.randint(0, T, (B,), generator=g)
    elif routing == "sparse":
        route = torch.tensor([1, T - 1])[torch.randint(0, 2, (B,), generator=g)]
    else:
        route = torch.full((B,), T - 1, dtype=torch.int64)
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return x, weight, masks, route, b


def _through_op(backend, x, weight, masks, route, bias, grad_y):
    """(y, dx, dW, db) of routed_masked_linear under ``backend``, gradients by autograd."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    with rtl_kernels.set_backend(backend):
        y = rtl_kernels.routed_masked_linear(leaves[0], leaves[1], masks, route, leaves[2])
        y.backward(grad_y)
    return (y.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def _to(tensors, device, dtype=None):
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t.to(device) if t is not None else None)
        else:
            out.append(t.to(device=device, dtype=dtype))
    return out


def _assert_close_fp32(ours, ref, what):
    # Exact-fp32 dots over short reductions: errors stay near fp32 rounding of the operands.
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


# -- correctness sweeps --------------------------------------------------------------------------------------------

CASES = {
    # name: (B, N, K, T, density, routing)
    "odd_shapes": (37, 19, 23, 3, 0.5, "uniform"),
    "single_row": (1, 19, 23, 3, 0.5, "uniform"),
    "tickets_without_rows": (29, 21, 17, 5, 0.5, "sparse"),
    "all_rows_one_ticket": (33, 19, 23, 4, 0.5, "one"),
    "density_0": (37, 19, 23, 3, 0.0, "uniform"),
    "density_0.1": (37, 19, 23, 3, 0.1, "uniform"),
    "density_0.9": (37, 19, 23, 3, 0.9, "uniform"),
    "density_1": (37, 19, 23, 3, 1.0, "uniform"),
    # Several block rows/columns with partial edge blocks, and several row tiles per ticket.
    "multi_block": (150, 70, 90, 2, 0.5, "uniform"),
    "block_structured": (61, 130, 150, 3, "blocks", "uniform"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_reference_fp32(case, device):
    B, N, K, T, density, routing = CASES[case]
    x, weight, masks, route, bias = _make(B, N, K, T, density, routing)
    grad_y = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _through_op("reference", x, weight, masks, route, bias, grad_y)
    ours = _through_op("triton", *_to((x, weight, masks, route, bias, grad_y), device, torch.float32))
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert o.dtype == torch.float32 and o.device.type == device
        _assert_close_fp32(o, r, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["odd_shapes", "tickets_without_rows", "multi_block"])
def test_backend_methods_match_reference_fp32(case, device):
    B, N, K, T, density, routing = CASES[case]
    x, weight, masks, route, bias = _make(B, N, K, T, density, routing, seed=2)
    masks[T - 1] = False  # a fully pruned ticket that has rows: its outputs are the bias, its gradients zero
    grad_y = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grouping = rtl_kernels.group_by_ticket(route, T)
    perm, offsets = grouping.perm, grouping.offsets
    expected = (
        REFERENCE.linear_forward(x, weight, masks, bias, perm, offsets),
        REFERENCE.linear_grad_input(grad_y, weight, masks, perm, offsets),
        REFERENCE.linear_grad_weight(grad_y, x, masks, perm, offsets),
    )
    x, weight, masks, bias, grad_y, perm, offsets = _to(
        (x, weight, masks, bias, grad_y, perm, offsets), device, torch.float32
    )
    got = (
        TRITON.linear_forward(x, weight, masks, bias, perm, offsets),
        TRITON.linear_grad_input(grad_y, weight, masks, perm, offsets),
        TRITON.linear_grad_weight(grad_y, x, masks, perm, offsets),
    )
    for name, o, r in zip(("linear_forward", "linear_grad_input", "linear_grad_weight"), got, expected):
        _assert_close_fp32(o, r, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_single_ticket_equals_masked_dense(device, bias):
    x, weight, masks, route, b = _make(45, 27, 31, 1, 0.5, "uniform", seed=4, bias=bias)
    x, weight, masks, route, b = _to((x, weight, masks, route, b), device, torch.float32)
    with rtl_kernels.set_backend("triton"):
        y = rtl_kernels.routed_masked_linear(x, weight, masks, route, b)
    torch.testing.assert_close(y, F.linear(x, weight * masks[0], b), rtol=1e-5, atol=1e-5)


LOW_PRECISION = [
    pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}", marks=marks)
    for device, marks in (("cpu", DEVICES[0].marks), ("cuda", DEVICES[1].marks))
    for dtype in (torch.float16, torch.bfloat16)
    if not (device == "cpu" and dtype == torch.bfloat16)  # the interpreter has no bfloat16
]


@pytest.mark.parametrize("device,dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", ["odd_shapes", "multi_block", "block_structured"])
def test_low_precision_error_within_twice_torch(case, device, dtype):
    B, N, K, T, density, routing = CASES[case]
    x, weight, masks, route, bias = _make(B, N, K, T, density, routing, seed=5)
    grad_y = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    exact = _through_op("reference", x, weight, masks, route, bias, grad_y)
    low = _to((x, weight, masks, route, bias, grad_y), device, dtype)
    # The same computation done by torch in that precision: the reference loop on the rounded inputs.
    torch_low = _through_op("reference", *low)
    ours = _through_op("triton", *low)
    for name, o, t, e in zip(("y", "dx", "dweight", "dbias"), ours, torch_low, exact):
        assert o.dtype == dtype
        our_err = (o.double().cpu() - e).abs().max().item()
        torch_err = (t.double().cpu() - e).abs().max().item()
        assert our_err <= 2 * torch_err, f"{name}: error {our_err:.3g} > 2 x torch's {torch_err:.3g}"


# -- exactness and determinism of dW -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("device", DEVICES)
def test_grad_weight_exactly_zero_outside_present_masks(device):
    B, N, K, T = 40, 70, 90, 4
    x, weight, masks, route, _ = _make(B, N, K, T, 0.3, "sparse", seed=7)
    masks[0] = True  # ticket 0 has no rows: its (full) mask must not open any weight
    grad_y = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grad_y[0, :5] = float("nan")  # non-finite gradients must not leak outside the masks either
    grad_y[1, 5:9] = float("inf")
    x, masks, route, grad_y = _to((x, masks, route, grad_y), device, torch.float32)
    grouping = rtl_kernels.group_by_ticket(route, T)
    dw = TRITON.linear_grad_weight(grad_y, x, masks, grouping.perm, grouping.offsets)
    present = torch.unique(route)
    outside = ~masks[present].any(0)
    assert outside.any()
    assert bool((dw[outside] == 0).all())
    # Deterministic: no atomics, a fixed order, so a second run is bit-identical (NaNs in the same places).
    again = TRITON.linear_grad_weight(grad_y, x, masks, grouping.perm, grouping.offsets)
    assert torch.equal(dw.nan_to_num(), again.nan_to_num()) and torch.equal(dw.isnan(), again.isnan())


# -- layout cache ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_layout_compiled_once_and_recompiled_after_mask_edit(device):
    x, weight, masks, route, bias = _make(37, 19, 23, 3, 0.5, "uniform", seed=9)
    x32, w32, m, r, b32 = _to((x, weight, masks.clone(), route, bias), device, torch.float32)
    with rtl_kernels.set_backend("triton"):
        rtl_kernels.routed_masked_linear(x32, w32, m, r, b32)
        compiles = rtl_kernels.layout_cache_stats()["compiles"]
        rtl_kernels.routed_masked_linear(x32, w32, m, r, b32)
        assert rtl_kernels.layout_cache_stats()["compiles"] == compiles
        m[1].logical_not_()  # in place: bumps the version, so the layout must be rebuilt
        y = rtl_kernels.routed_masked_linear(x32, w32, m, r, b32)
        assert rtl_kernels.layout_cache_stats()["compiles"] == compiles + 1
    masks[1].logical_not_()
    with rtl_kernels.set_backend("reference"):
        expected = rtl_kernels.routed_masked_linear(x, weight, masks, route, bias)
    _assert_close_fp32(y, expected, "y after the mask edit")


# -- availability ---------------------------------------------------------------------------------------------------


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


# -- GPU only: no host synchronisation --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_routed_kernels_capture_in_a_cuda_graph():
    B, N, K, T = 300, 200, 150, 5
    x, weight, masks, route, bias = _make(B, N, K, T, 0.5, "uniform", seed=10)
    grad_y = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    xc, wc, mc, bc, gc = _to((x, weight, masks, bias, grad_y), "cuda", torch.float32)
    grouping = rtl_kernels.group_by_ticket(route.cuda(), T)
    perm, offsets = grouping.perm.clone(), grouping.offsets.clone()

    def step():
        return (
            TRITON.linear_forward(xc, wc, mc, bc, perm, offsets),
            TRITON.linear_grad_input(gc, wc, mc, perm, offsets),
            TRITON.linear_grad_weight(gc, xc, mc, perm, offsets),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles the kernels and the layout outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # any host synchronisation inside would make the capture fail
        outputs = step()

    # A new route, written into the captured grouping buffers, with a different count per ticket.
    new_route = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(12)) ** 2 % T
    new = rtl_kernels.group_by_ticket(new_route.cuda(), T)
    perm.copy_(new.perm)
    offsets.copy_(new.offsets)
    graph.replay()
    torch.cuda.synchronize()
    p, o = new.perm.cpu(), new.offsets.cpu()
    expected = (
        REFERENCE.linear_forward(x, weight, masks, bias, p, o),
        REFERENCE.linear_grad_input(grad_y, weight, masks, p, o),
        REFERENCE.linear_grad_weight(grad_y, x, masks, p, o),
    )
    for name, got, ref in zip(("forward", "grad_input", "grad_weight"), outputs, expected):
        _assert_close_fp32(got, ref, name)
