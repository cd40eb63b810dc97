"""What only the cuda backend has (rtl_kernels/backends/cuda.py + rtl_kernels._C_cuda): its dtypes on a GPU, native
ops that write every output element, pruned weights read by select (a NaN there never leaks), and, on any machine,
a built extension that registers its ops and refuses CPU tensors. The contract shared with the other backends is in
test_*_contract.py; the GPU tests here are marked ``gpu`` and skip without CUDA or without the extension.
"""

from __future__ import annotations

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension
from rtl_kernels.backends import get_backend_module

_MODULE, _LOAD_REASON = _extension.load("_C_cuda")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(_MODULE is None, reason=f"rtl_kernels._C_cuda not built: {_LOAD_REASON}")
CONV_OPS = ("_cuda_conv2d_forward", "_cuda_conv2d_grad_input", "_cuda_conv2d_grad_weight")


def _cuda():
    return get_backend_module("cuda")


def _on_gpu(dtype, *tensors):
    return [None if t is None else t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in tensors]


# -- GPU ------------------------------------------------------------------------------------------------------------
@gpu
@needs_gpu
@needs_ext
def test_available_on_this_gpu():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _cuda().unavailable_reason(torch.device("cuda"), dtype) is None, dtype
    assert "cuda" in rk.available_backends("cuda", torch.float32)


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_linear_ops_write_every_output_element(dtype, linear_case):
    """The internal ops called with outputs poisoned with NaN: any element the kernels skip stays NaN."""
    from rtl_kernels.backends.cuda import BLOCK_K, BLOCK_N, _layout

    b, n, k, t = 77, 131, 97, 4
    x, w, masks, route, bias = linear_case(b, n, k, t, 0.2, 9)
    route[route == 2] = 3  # ticket 2 has no rows
    masks[0, :64] = False  # ticket 0 keeps no block in the first block row
    gy = torch.randn(b, n, generator=torch.Generator().manual_seed(9))
    x, w, masks, route, bias, gy = _on_gpu(dtype, x, w, masks, route, bias, gy)
    g = rk.group_by_ticket(route, t)
    lay = _layout(masks)
    ops = torch.ops.rtl_kernels
    y = torch.full((b, n), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_forward(
        x, w, masks, bias, g.perm, g.offsets, lay.row_ptr, lay.col_idx, lay.full, BLOCK_N, BLOCK_K, y
    )
    dx = torch.full((b, k), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_grad_input(
        gy, w, masks, g.perm, g.offsets, lay.t_col_ptr, lay.t_row_idx, lay.t_full, BLOCK_N, BLOCK_K, dx
    )
    dw = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    ops._cuda_linear_grad_weight(gy, x, masks, g.perm, g.offsets, lay.w_ptr, lay.w_tickets, BLOCK_N, BLOCK_K, dw)
    for name, out in (("y", y), ("dx", dx), ("dw", dw)):
        assert bool(torch.isfinite(out).all()), f"{name} has elements the kernel did not write"


# (B, C, O, (H, W), (kh, kw), stride, padding, dilation, groups, T)
_POISON_CONFIGS = [
    (4, 6, 10, (12, 11), (3, 5), (2, 1), (1, 2), (1, 1), 2, 3),
    (4, 6, 12, (10, 11), (3, 3), (2, 2), (1, 1), (1, 1), 6, 3),
    (9, 3, 8, (20, 17), (5, 5), (3, 3), (2, 2), (1, 1), 1, 40),
]


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cfg", _POISON_CONFIGS, ids=lambda c: f"c{c[1]}o{c[2]}g{c[8]}t{c[9]}")
def test_conv_ops_write_every_output_element(dtype, cfg, conv_case):
    """The internal ops called with outputs poisoned with NaN: any element the kernels skip stays NaN."""
    b, c, o, hw, k, stride, padding, dilation, groups, t = cfg
    x, w, masks, route, bias = conv_case(b, c, o, hw, k, t, 0.4, 9, groups=groups)
    route[route == 0] = t - 1  # ticket 0 has no images
    y_ref = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(9))
    x, w, masks, route, bias, gy = _on_gpu(dtype, x, w, masks, route, bias, gy)
    g = rk.group_by_ticket(route, t)
    ops = torch.ops.rtl_kernels
    geo = (list(stride), list(padding), list(dilation), groups)
    y = torch.full(gy.shape, float("nan"), dtype=dtype, device="cuda")
    ops._cuda_conv2d_forward(x, w, masks, bias, g.perm, g.offsets, *geo, y)
    dx = torch.full(x.shape, float("nan"), dtype=dtype, device="cuda")
    ops._cuda_conv2d_grad_input(gy, w, masks, g.perm, g.offsets, *geo, dx)
    dw = torch.full(w.shape, float("nan"), dtype=dtype, device="cuda")
    ops._cuda_conv2d_grad_weight(gy, x, masks, g.perm, g.offsets, *geo, dw)
    for name, out in (("y", y), ("dx", dx), ("dw", dw)):
        assert bool(torch.isfinite(out).all()), f"{name} has elements the kernel did not write"


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_nan_in_pruned_linear_weights_does_not_leak(dtype, linear_case, zero_outside):
    """Pruned weights are selected away, not multiplied by zero: a NaN there changes no bit of y or dx; a NaN
    gradient row leaves dW exactly zero outside the present masks."""
    x, w, masks, route, bias = linear_case(40, 33, 70, 3, 0.5, 5)
    gy = torch.randn(40, 33, generator=torch.Generator().manual_seed(5))
    x, w, masks, route, bias, gy = _on_gpu(dtype, x, w, masks, route, bias, gy)
    g = rk.group_by_ticket(route, 3)
    w_nan = torch.where(masks.any(dim=0), w, torch.full_like(w, float("nan")))
    be = _cuda()
    assert torch.equal(
        be.linear_forward(x, w_nan, masks, bias, g.perm, g.offsets),
        be.linear_forward(x, w, masks, bias, g.perm, g.offsets),
    )
    assert torch.equal(
        be.linear_grad_input(gy, w_nan, masks, g.perm, g.offsets), be.linear_grad_input(gy, w, masks, g.perm, g.offsets)
    )
    gy[0, :] = float("nan")
    dw = be.linear_grad_weight(gy, x, masks, g.perm, g.offsets)
    assert bool((dw.cpu()[zero_outside(masks, route)] == 0).all())


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_nan_in_pruned_conv_weights_does_not_leak(dtype, conv_case, zero_outside):
    """As for the linear kernels: a NaN in a pruned weight changes no bit of y or dx; a NaN image of gradients
    leaves dW exactly zero outside the present masks."""
    x, w, masks, route, bias = conv_case(6, 4, 5, (9, 8), (3, 3), 3, 0.5, 5)
    gy = torch.randn(6, 5, 9, 8, generator=torch.Generator().manual_seed(5))
    x, w, masks, route, bias, gy = _on_gpu(dtype, x, w, masks, route, bias, gy)
    g = rk.group_by_ticket(route, 3)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    w_nan = torch.where(masks.any(dim=0), w, torch.full_like(w, float("nan")))
    be = _cuda()
    for wt in (w, w_nan):
        y = be.conv2d_forward(x, wt, masks, bias, g.perm, g.offsets, *geo)
        dx = be.conv2d_grad_input(gy, wt, masks, g.perm, g.offsets, tuple(x.shape), *geo)
        if wt is w:
            y_clean, dx_clean = y, dx
    assert torch.equal(y, y_clean) and torch.equal(dx, dx_clean)
    gy[0] = float("nan")
    dw = be.conv2d_grad_weight(gy, x, masks, g.perm, g.offsets, *geo)
    assert bool((dw.cpu()[zero_outside(masks, route)] == 0).all())


# -- any machine: the built extension and the backend's reasons -----------------------------------------------------
@needs_ext
def test_extension_registers_its_ops_with_out_arguments():
    import rtl_kernels._C_cuda  # noqa: F401

    for op in ("_cuda_linear_forward", "_cuda_linear_grad_input", "_cuda_linear_grad_weight", "_cuda_device_problem"):
        assert hasattr(torch.ops.rtl_kernels, op), op
    assert "Tensor(a!) out" in str(torch.ops.rtl_kernels._cuda_linear_forward.default._schema)
    for op in CONV_OPS:
        assert hasattr(torch.ops.rtl_kernels, op), op
        schema = str(getattr(torch.ops.rtl_kernels, op).default._schema)
        assert "Tensor(a!) out" in schema and "int groups" in schema, schema


@needs_ext
def test_ops_reject_cpu_tensors_clearly():
    from rtl_kernels.backends.cuda import BLOCK_K, BLOCK_N

    z = torch.zeros(1, dtype=torch.int32)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.rtl_kernels._cuda_linear_forward(
            torch.randn(3, 4),
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
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.rtl_kernels._cuda_conv2d_forward(
            torch.randn(2, 3, 5, 5),
            torch.randn(4, 3, 3, 3),
            torch.ones(1, 4, 3, 3, 3, dtype=torch.bool),
            None,
            torch.arange(2),
            torch.tensor([0, 2]),
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            torch.empty(2, 4, 5, 5),
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


def test_backend_implements_the_conv_methods():
    be = _cuda()
    for name in ("conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight"):
        assert getattr(type(be), name) is not getattr(type(be).__mro__[1], name), name
