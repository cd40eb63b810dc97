"""The triton backend of routed_masked_conv2d against per-image F.conv2d in float64.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA;
fp32/fp16, small shapes, a representative subset of geometries rather than a full product: the interpreter is
slow); on a GPU the same tests run compiled (``-m gpu``), bf16 and larger shapes included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels
from rtl_kernels.backends.triton import BACKEND as TRITON

_CPU_REASON = TRITON.unavailable_reason(torch.device("cpu"), torch.float32)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CPU_REASON is not None, reason=f"triton on CPU: {_CPU_REASON}")),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
_GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# -- inputs and the float64 reference --------------------------------------------------------------------------------

# name: (B, C, O, H, W, (kh, kw), stride, padding, dilation, groups, T, routing)
# routing: "uniform" (random tickets), "sparse" (only tickets 1 and T-1 get images: ticket 0 and the middle ones
# are empty), "one" (every image on ticket T-1).
CASES = {
    "1x1": (3, 5, 7, 6, 5, (1, 1), 1, 0, 1, 1, 3, "uniform"),
    "3x3_pad1": (4, 3, 6, 7, 9, (3, 3), 1, 1, 1, 1, 3, "uniform"),
    "3x5_stride2_pad1x2": (3, 4, 5, 9, 8, (3, 5), 2, (1, 2), 1, 1, 2, "uniform"),
    "stride1x2_dilation2": (2, 4, 6, 9, 9, (3, 3), (1, 2), 1, 2, 1, 3, "uniform"),
    "groups2_empty_ticket": (3, 6, 4, 7, 6, (3, 3), 1, 1, 1, 2, 3, "sparse"),
    "depthwise_stride2": (3, 5, 5, 8, 7, (3, 3), 2, 1, 1, 5, 2, "uniform"),
    "depthwise_multiplier2_dilation2": (2, 4, 8, 9, 7, (3, 3), 1, 2, 2, 4, 2, "uniform"),
    "single_image": (1, 5, 6, 7, 8, (3, 5), 2, 0, 1, 1, 3, "uniform"),
    "single_ticket": (3, 4, 5, 6, 7, (3, 3), 1, 1, 1, 1, 1, "uniform"),
    # K = 8 * 3 * 5 = 120: two K blocks, the second partial; 81 pixels an image: several row tiles per ticket.
    "two_k_blocks": (4, 8, 8, 9, 9, (3, 5), 1, (1, 2), 1, 1, 2, "uniform"),
}
# Several row tiles per ticket, several channel and K blocks (K > 64), edge blocks: too slow for the interpreter.
GPU_CASES = {
    "large_3x3": (6, 40, 70, 17, 15, (3, 3), 1, 1, 1, 1, 3, "uniform"),
    "large_grouped_stride2": (5, 48, 36, 19, 13, (3, 5), 2, (1, 2), (2, 1), 4, 4, "sparse"),
    "large_depthwise": (7, 96, 96, 15, 16, (3, 3), 1, 1, 1, 96, 3, "uniform"),
}


def _make(case, *, seed=0, bias=True, density=0.6):
    """Fresh random float64 CPU inputs (x, weight, masks, route, bias, grad_y) and the geometry of ``case``."""
    B, C, O, H, W, (kh, kw), stride, padding, dilation, groups, T, routing = {**CASES, **GPU_CASES}[case]
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    geometry = (pair(stride), pair(padding), pair(dilation), groups)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(O, C // groups, kh, kw, generator=g, dtype=torch.float64)
    masks = torch.rand(T, O, C // groups, kh, kw, generator=g) < density
    if routing == "uniform":
        route = torch.randint(0, T, (B,), generator=g)
    elif routing == "sparse":
        route = torch.tensor([1, T - 1])[torch.randint(0, 2, (B,), generator=g)]
    else:
        route = torch.full((B,), T - 1, dtype=torch.int64)
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    Ho = (H + 2 * geometry[1][0] - geometry[2][0] * (kh - 1) - 1) // geometry[0][0] + 1
    Wo = (W + 2 * geometry[1][1] - geometry[2][1] * (kw - 1) - 1) // geometry[0][1] + 1
    grad_y = torch.randn(B, O, Ho, Wo, generator=g, dtype=torch.float64)
    return (x, weight, masks, route, b, grad_y), geometry


def _per_image(x, weight, masks, route, bias, grad_y, geometry):
    """(y, dx, dW, db) of per-image F.conv2d with weight * masks[route[i]], gradients by autograd."""
    stride, padding, dilation, groups = geometry
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    xs, w, b = leaves
    y = torch.cat(
        [
            F.conv2d(xs[i : i + 1], w * masks[int(route[i])], b, stride, padding, dilation, groups)
            for i in range(x.shape[0])
        ]
    )
    y.backward(grad_y)
    return (y.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def _to(tensors, device, dtype=None):
    return [
        None if t is None else t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        for t in tensors
    ]


def _assert_close_fp32(ours, ref, what):
    # Exact-fp32 dots (input_precision="ieee") over short reductions: errors near fp32 rounding of the operands.
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


def _backend_methods(x, weight, masks, route, bias, grad_y, geometry):
    """(y, dx, dW) from the three TritonBackend conv methods called directly."""
    stride, padding, dilation, groups = geometry
    grouping = rtl_kernels.group_by_ticket(route, masks.shape[0])
    perm, offsets = grouping.perm, grouping.offsets
    return (
        TRITON.conv2d_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups),
        TRITON.conv2d_grad_input(
            grad_y, weight, masks, perm, offsets, tuple(x.shape), stride, padding, dilation, groups
        ),
        TRITON.conv2d_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups),
    )


def _assert_zero_outside_present(dw, masks, route, what="dW"):
    present = torch.unique(route.cpu())
    outside = ~masks.cpu()[present].any(0)
    assert bool((dw.cpu()[outside] == 0).all()), f"{what} is not exactly zero outside the present tickets' masks"
    return outside


# -- correctness sweeps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES) + [pytest.param(name, marks=_GPU_ONLY) for name in GPU_CASES])
def test_backend_methods_match_per_image_conv_fp32(case, device):
    inputs, geometry = _make(case)
    x, weight, masks, route, bias, grad_y = inputs
    if masks.shape[0] > 1:
        masks[route[0]] = False  # a fully pruned ticket that has images: its outputs are the bias
    ref = _per_image(x, weight, masks, route, bias, grad_y, geometry)
    got = _backend_methods(*_to((x, weight, masks, route, bias, grad_y), device, torch.float32), geometry)
    for name, o, r in zip(("y", "dx", "dW"), got, ref):
        assert o.dtype == torch.float32 and o.device.type == device and o.shape == r.shape
        _assert_close_fp32(o, r, f"{case} {name}")
    _assert_zero_outside_present(got[2], masks, route)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["3x5_stride2_pad1x2", "groups2_empty_ticket"])
def test_op_matches_per_image_conv_fp32(case, device):
    inputs, geometry = _make(case, seed=1)
    stride, padding, dilation, groups = geometry
    ref = _per_image(*inputs, geometry)
    x, weight, masks, route, bias, grad_y = _to(inputs, device, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    with rtl_kernels.set_backend("triton"):
        y = rtl_kernels.routed_masked_conv2d(
            leaves[0], leaves[1], masks, route, leaves[2], stride, padding, dilation, groups
        )
        y.backward(grad_y)
    for name, o, r in zip(("y", "dx", "dW", "db"), (y.detach(),) + tuple(t.grad for t in leaves), ref):
        _assert_close_fp32(o, r, f"{case} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_single_ticket_equals_masked_dense_conv(device):
    (x, weight, masks, route, bias, _), (stride, padding, dilation, groups) = _make("single_ticket", seed=2)
    x, weight, masks, route, bias = _to((x, weight, masks, route, bias), device, torch.float32)
    with rtl_kernels.set_backend("triton"):
        y = rtl_kernels.routed_masked_conv2d(x, weight, masks, route, bias, stride, padding, dilation, groups)
    expected = F.conv2d(x, weight * masks[0], bias, stride, padding, dilation, groups)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_transpose2d_through_grad_input_kernel(device):
    # The op builds the transposed conv from conv2d_grad_input (and its backward from the other two kernels).
    g = torch.Generator().manual_seed(3)
    B, C_in, C_out, T, groups = 3, 4, 6, 2, 2
    x = torch.randn(B, C_in, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(C_in, C_out // groups, 3, 3, generator=g, dtype=torch.float64)
    masks = torch.rand(T, *weight.shape, generator=g) < 0.6
    route = torch.randint(0, T, (B,), generator=g)
    kwargs = dict(stride=2, padding=1, output_padding=1, groups=groups)
    ref = torch.cat([F.conv_transpose2d(x[i : i + 1], weight * masks[int(route[i])], **kwargs) for i in range(B)])
    xd, wd, md, rd = _to((x, weight, masks, route), device, torch.float32)
    with rtl_kernels.set_backend("triton"):
        y = rtl_kernels.routed_masked_conv_transpose2d(xd, wd, md, rd, **kwargs)
    _assert_close_fp32(y, ref, "conv_transpose2d")


LOW_PRECISION = [
    pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}", marks=marks)
    for device, marks in (("cpu", DEVICES[0].marks), ("cuda", DEVICES[1].marks))
    for dtype in (torch.float16, torch.bfloat16)
    if not (device == "cpu" and dtype == torch.bfloat16)  # the interpreter has no bfloat16
]


@pytest.mark.parametrize("device,dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", ["3x3_pad1", "depthwise_stride2"])
def test_low_precision_error_within_twice_torch(case, device, dtype):
    inputs, geometry = _make(case, seed=4)
    exact = _per_image(*inputs, geometry)
    x, weight, masks, route, bias, grad_y = _to(inputs, device, dtype)
    # The same computation done by torch in that precision: per-image F.conv2d on the rounded inputs.
    torch_low = _per_image(x, weight, masks, route, bias, grad_y, geometry)
    ours = _backend_methods(x, weight, masks, route, bias, grad_y, geometry)
    for name, o, t, e in zip(("y", "dx", "dW"), ours, torch_low, exact):
        assert o.dtype == dtype
        our_err = (o.double().cpu() - e).abs().max().item()
        torch_err = (t.double().cpu() - e).abs().max().item()
        assert our_err <= 2 * torch_err, f"{name}: error {our_err:.3g} > 2 x torch's {torch_err:.3g}"


# -- exactness and determinism of dW ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.parametrize("device", DEVICES)
def test_grad_weight_exactly_zero_outside_present_masks_and_deterministic(device):
    from rtl_kernels.triton_kernels.conv2d_grad_weight import conv2d_grad_weight

    (x, weight, masks, route, _, grad_y), geometry = _make("groups2_empty_ticket", seed=5, density=0.3)
    masks[0] = True  # ticket 0 has no images: its (full) mask must not open any weight
    grad_y[0, :2, 1, 1] = float("nan")  # non-finite gradients must not leak outside the masks either
    grad_y[1, 2:, 0, 3] = float("inf")
    x, masks, route, grad_y = _to((x, masks, route, grad_y), device, torch.float32)
    stride, padding, dilation, groups = geometry
    grouping = rtl_kernels.group_by_ticket(route, masks.shape[0])
    args = (grad_y, x, masks, grouping.perm, grouping.offsets, stride, padding, dilation, groups)
    dw = TRITON.conv2d_grad_weight(*args)
    outside = _assert_zero_outside_present(dw, masks, route)
    assert outside.any()
    # Deterministic: no atomics, a fixed order, so a second run is bit-identical (NaNs in the same places).
    again = TRITON.conv2d_grad_weight(*args)
    assert torch.equal(dw.nan_to_num(), again.nan_to_num()) and torch.equal(dw.isnan(), again.isnan())
    # The split path (partial sums per part of the pixel tiles, reduced by torch): same zeros, same values.
    parts = conv2d_grad_weight(*args, block_m=16, block_n=16, block_k=16, split=3)
    _assert_zero_outside_present(parts, masks, route, "split dW")
    finite = dw.isfinite()
    assert torch.equal(parts.isfinite(), finite)
    torch.testing.assert_close(parts[finite], dw[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_weight_split_matches_reference(device):
    from rtl_kernels.triton_kernels.conv2d_grad_weight import conv2d_grad_weight

    inputs, geometry = _make("stride1x2_dilation2", seed=6)
    ref = _per_image(*inputs, geometry)
    x, weight, masks, route, bias, grad_y = _to(inputs, device, torch.float32)
    grouping = rtl_kernels.group_by_ticket(route, masks.shape[0])
    for split in (1, 2, 5):
        dw = conv2d_grad_weight(
            grad_y,
            x,
            masks,
            grouping.perm,
            grouping.offsets,
            *geometry,
            block_m=16,
            block_n=16,
            block_k=16,
            split=split,
        )
        _assert_close_fp32(dw, ref[2], f"dW split={split}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    inputs, geometry = _make("3x3_pad1")
    x, weight, masks, route, bias, grad_y = _to(inputs, device, torch.float32)
    x, route, grad_y = x[:0], route[:0], grad_y[:0]
    y, dx, dw = _backend_methods(x, weight, masks, route, bias, grad_y, geometry)
    assert y.shape == grad_y.shape and dx.shape == x.shape
    assert dw.shape == weight.shape and bool((dw == 0).all())


# -- GPU only: no host synchronisation -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_kernels_capture_in_a_cuda_graph():
    inputs, geometry = _make("large_grouped_stride2", seed=7)
    x, weight, masks, route, bias, grad_y = inputs
    xc, wc, mc, bc, gc = _to((x, weight, masks, bias, grad_y), "cuda", torch.float32)
    T = masks.shape[0]
    grouping = rtl_kernels.group_by_ticket(route.cuda(), T)
    perm, offsets = grouping.perm.clone(), grouping.offsets.clone()
    stride, padding, dilation, groups = geometry

    def step():
        return (
            TRITON.conv2d_forward(xc, wc, mc, bc, perm, offsets, stride, padding, dilation, groups),
            TRITON.conv2d_grad_input(gc, wc, mc, perm, offsets, tuple(xc.shape), stride, padding, dilation, groups),
            TRITON.conv2d_grad_weight(gc, xc, mc, perm, offsets, stride, padding, dilation, groups),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # any host synchronisation inside would make the capture fail
        outputs = step()
    new_route = torch.randint(0, T, (x.shape[0],), generator=torch.Generator().manual_seed(8)) ** 2 % T
    new = rtl_kernels.group_by_ticket(new_route.cuda(), T)
    perm.copy_(new.perm)
    offsets.copy_(new.offsets)
    graph.replay()
    torch.cuda.synchronize()
    expected = _per_image(x, weight, masks, new_route, bias, grad_y, geometry)
    for name, got, ref in zip(("forward", "grad_input", "grad_weight"), outputs, expected):
        _assert_close_fp32(got, ref, name)
