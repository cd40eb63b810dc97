"""Tests of the cuda backend's routed masked conv2d (csrc/cuda/routed_conv2d_kernels.cu + rtl_kernels/backends/cuda.py).

GPU tests (marked ``gpu``) compare the three kernels with F.conv2d run per image in float64 (weight * masks[route[i]]
with a select, autograd for dx and dW) on fresh random inputs: kernel sizes 1x1 / 3x3 / 3x5 / 5x5, strides,
paddings, dilation, groups 1 / 2 / depthwise (multiplier 1 and 2), B = 1, T = 1, T > 32, channel counts past one
64-wide tile, empty tickets, densities 0 / 0.5 / 1. float32 runs with TF32 off and must be close to float64;
float16 / bfloat16 pass when our error is at most twice the error of the same computation done by PyTorch in that
dtype. dW must be exactly zero outside the union of the masks of the tickets present; outputs are poisoned before
the kernels write them. They skip without a GPU or without the built extension. The CPU tests check that the built
extension registers the conv ops.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from rtl_kernels import _extension, group_by_ticket
from rtl_kernels.backends import get_backend_module

_MODULE, _LOAD_REASON = _extension.load("_C_cuda")
HAS_GPU = torch.cuda.is_available()

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(_MODULE is None, reason=f"rtl_kernels._C_cuda not built: {_LOAD_REASON}")

LOW_PRECISION = (torch.float16, torch.bfloat16)
CONV_OPS = ("_cuda_conv2d_forward", "_cuda_conv2d_grad_input", "_cuda_conv2d_grad_weight")

# (B, C, H, W, O, (kh, kw), stride, padding, dilation, groups, T)
CONFIGS = [
    (5, 3, 11, 9, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, 3),  # 1x1
    (6, 5, 13, 10, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3),  # 3x3 "same"
    (4, 6, 12, 11, 10, (3, 5), (2, 1), (1, 2), (1, 1), 2, 3),  # 3x5, mixed stride, groups 2
    (5, 4, 15, 14, 6, (3, 3), (2, 2), (2, 2), (2, 2), 1, 4),  # dilation 2, stride 2
    (3, 8, 9, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8, 2),  # depthwise
    (4, 6, 10, 11, 12, (3, 3), (2, 2), (1, 1), (1, 1), 6, 3),  # depthwise, multiplier 2, stride 2
    (1, 5, 9, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3),  # B = 1
    (7, 5, 8, 9, 70, (3, 3), (1, 1), (0, 0), (1, 1), 1, 1),  # T = 1, O past one 64-wide tile
    (2, 70, 9, 9, 5, (1, 3), (1, 2), (0, 1), (1, 1), 1, 2),  # C past one tile (grad_input columns, dW rows)
    (9, 3, 20, 17, 8, (5, 5), (3, 3), (2, 2), (1, 1), 1, 40),  # T > 32, stride 3, many empty tickets
    (3, 4, 33, 31, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2),  # several 64-pixel tiles per image
    (4, 3, 7, 6, 5, (3, 3), (1, 1), (0, 0), (3, 2), 1, 3),  # dilation larger than the output
]


def _cfg_id(c):
    b, ch, h, w, o, (kh, kw), s, p, d, g, t = c
    return f"B{b}_C{ch}_{h}x{w}_O{o}_k{kh}x{kw}_s{s[0]}{s[1]}_p{p[0]}{p[1]}_d{d[0]}{d[1]}_g{g}_T{t}"


def _seed(*parts) -> int:
    """A seed per test case that is stable across processes (str hashing is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _cuda():
    return get_backend_module("cuda")


def _out_hw(h, w, k, stride, padding, dilation):
    sizes = zip((h, w), k, stride, padding, dilation)
    return tuple((n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in sizes)


def _case(cfg, density, dtype, seed, *, absent=(), bias=True, device="cuda"):
    """Fresh random x (B, C, H, W), weight (O, C/g, kh, kw), masks (T, O, C/g, kh, kw), bias (O), route (B),
    grad_y (B, O, Ho, Wo)."""
    b, c, h, w, o, k, stride, padding, dilation, groups, t = cfg
    gen = torch.Generator().manual_seed(seed)
    fan_in = (c // groups) * k[0] * k[1]
    x = torch.randn(b, c, h, w, generator=gen)
    weight = torch.randn(o, c // groups, *k, generator=gen) / max(fan_in, 1) ** 0.5
    masks = torch.rand(t, o, c // groups, *k, generator=gen) < density
    present = torch.tensor([i for i in range(t) if i not in absent])
    route = present[torch.randint(len(present), (b,), generator=gen)]
    bias_t = torch.randn(o, generator=gen) if bias else None
    ho, wo = _out_hw(h, w, k, stride, padding, dilation)
    grad_y = torch.randn(b, o, ho, wo, generator=gen)
    to = dict(device=device, dtype=dtype)
    return (
        x.to(**to),
        weight.to(**to),
        masks.to(device),
        None if bias_t is None else bias_t.to(**to),
        route.to(device),
        grad_y.to(**to),
    )


def _geometry(cfg):
    _, _, _, _, _, _, stride, padding, dilation, groups, _ = cfg
    return stride, padding, dilation, groups


def _ours(cfg, x, weight, masks, bias, route, grad_y):
    stride, padding, dilation, groups = _geometry(cfg)
    g = group_by_ticket(route, masks.shape[0])
    be = _cuda()
    y = be.conv2d_forward(x, weight, masks, bias, g.perm, g.offsets, stride, padding, dilation, groups)
    dx = be.conv2d_grad_input(
        grad_y, weight, masks, g.perm, g.offsets, tuple(x.shape), stride, padding, dilation, groups
    )
    dw = be.conv2d_grad_weight(grad_y, x, masks, g.perm, g.offsets, stride, padding, dilation, groups)
    return y, dx, dw


def _torch(cfg, x, weight, masks, bias, route, grad_y, *, per_image):
    """y, dx, dW by F.conv2d + autograd in the tensors' dtype, per image (ground truth in float64) or per ticket
    (PyTorch's own computation in low precision: one conv over the images of each present ticket)."""
    stride, padding, dilation, groups = _geometry(cfg)
    xs = x.detach().clone().requires_grad_()
    ws = weight.detach().clone().requires_grad_()
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    y = None
    if per_image:
        groups_of_rows = [(int(route[i]), torch.tensor([i], device=x.device)) for i in range(x.shape[0])]
    else:
        groups_of_rows = [(t, (route == t).nonzero().flatten()) for t in torch.unique(route).tolist()]
    parts = []
    for t, rows in groups_of_rows:
        wm = torch.where(masks[t], ws, zero)
        parts.append((rows, F.conv2d(xs[rows], wm, bias, stride, padding, dilation, groups)))
    y = torch.empty((x.shape[0],) + tuple(parts[0][1].shape[1:]), dtype=x.dtype, device=x.device)
    y = y.index_put((torch.cat([r for r, _ in parts]),), torch.cat([p for _, p in parts]))
    y.backward(grad_y)
    return y.detach(), xs.grad, ws.grad


def _f64(*tensors):
    return [None if v is None else v.double() for v in tensors]


def _exact(cfg, x, weight, masks, bias, route, grad_y):
    xd, wd, bd, gd = _f64(x, weight, bias, grad_y)
    return _torch(cfg, xd, wd, masks, bd, route, gd, per_image=True)


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _check_fp32(ours, ref, what):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = _max_err(ours, ref)
    assert err <= 2e-5 * scale, f"{what}: max error {err:.3e} vs float64 (scale {scale:.3g})"


def _outside_union(masks, route):
    """bool (O, C/g, kh, kw): weights kept by no ticket present in route."""
    return ~masks[torch.unique(route)].any(dim=0)


NAMES = ("forward", "grad_input", "grad_weight")


# ------------------------------------------------------------------------------------------------------------------
# GPU: against per-image F.conv2d in float64
# ------------------------------------------------------------------------------------------------------------------
@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("density", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_matches_float64(cfg, density, bias):
    args = _case(cfg, density, torch.float32, seed=_seed(cfg, density, bias), bias=bias)
    ours = _ours(cfg, *args)
    ref = _exact(cfg, *args)
    for name, o, r in zip(NAMES, ours, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape, name
        _check_fp32(o, r, name)
    masks, route = args[2], args[4]
    assert bool((ours[2][_outside_union(masks, route)] == 0).all()), "dW must be exactly zero outside the masks"


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("density", (0.5, 1.0))
def test_low_precision_error_at_most_twice_torch(dtype, cfg, density):
    args = _case(cfg, density, dtype, seed=_seed(cfg, density, str(dtype)))
    ours = _ours(cfg, *args)
    theirs = _torch(cfg, *args, per_image=False)  # PyTorch itself, in this dtype
    exact = _exact(cfg, *args)
    for name, o, th, ex in zip(NAMES, ours, theirs, exact):
        assert o.dtype == dtype and o.shape == ex.shape, name
        assert bool(torch.isfinite(o).all()), name
        ours_err, torch_err = _max_err(o, ex), _max_err(th, ex)
        assert ours_err <= 2 * torch_err, f"{name}: our error {ours_err:.3e} > 2 x torch's {torch_err:.3e}"
    assert bool((ours[2][_outside_union(args[2], args[4])] == 0).all())


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_empty_tickets_and_zero_outside_masks(dtype):
    # Tickets 1 and 3 get no images but keep every weight: dW must stay exactly zero where the others prune.
    cfg = (8, 6, 10, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1, 5)
    for absent in ((1, 3), (0, 1, 2, 3)):  # the second: every image on ticket 4
        args = _case(cfg, 0.3, dtype, seed=len(absent), absent=absent)
        masks, route = args[2], args[4]
        masks[1] = True
        masks[3] = True
        ours = _ours(cfg, *args)
        exact = _exact(cfg, *args)
        outside = _outside_union(masks, route)
        assert bool(outside.any())
        assert bool((ours[2][outside] == 0).all())
        if dtype == torch.float32:
            for name, o, r in zip(NAMES, ours, exact):
                _check_fp32(o, r, name)
        else:
            theirs = _torch(cfg, *args, per_image=False)
            for o, th, r in zip(ours, theirs, exact):
                assert _max_err(o, r) <= 2 * _max_err(th, r)


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_single_ticket_equals_dense_masked_conv(dtype):
    cfg = (6, 7, 12, 13, 9, (3, 3), (2, 1), (1, 1), (1, 1), 1, 1)
    x, w, masks, bias, route, gy = _case(cfg, 0.6, dtype, seed=11)
    y = _ours(cfg, x, w, masks, bias, route, gy)[0]
    dense = F.conv2d(x.double(), torch.where(masks[0], w, 0).double(), bias.double(), (2, 1), (1, 1))
    if dtype == torch.float32:
        _check_fp32(y, dense, "T=1 forward")
    else:
        torch_err = _max_err(F.conv2d(x, torch.where(masks[0], w, 0), bias, (2, 1), (1, 1)), dense)
        assert _max_err(y, dense) <= 2 * torch_err


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_nan_outside_masks_does_not_leak(dtype):
    # NaN in pruned weights must not reach y or dx (select, not multiply); a NaN in the pixels of one image must
    # leave dW exactly zero outside the present masks.
    cfg = (6, 4, 9, 8, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3)
    x, w, masks, bias, route, gy = _case(cfg, 0.5, dtype, seed=5)
    union = masks.any(dim=0)
    w_nan = torch.where(union, w, torch.full_like(w, float("nan")))
    ours = _ours(cfg, x, w, masks, bias, route, gy)
    ours_nan = _ours(cfg, x, w_nan, masks, bias, route, gy)
    assert torch.equal(ours[0], ours_nan[0])
    assert torch.equal(ours[1], ours_nan[1])
    gy_nan = gy.clone()
    gy_nan[0] = float("nan")
    dw = _ours(cfg, x, w, masks, bias, route, gy_nan)[2]
    assert bool((dw[_outside_union(masks, route)] == 0).all())


@gpu
@needs_gpu
@needs_ext
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[5], CONFIGS[9]], ids=_cfg_id)
def test_every_output_element_written(dtype, cfg):
    # Call the internal ops directly with outputs poisoned with NaN: any element the kernels skip stays NaN.
    x, w, masks, bias, route, gy = _case(cfg, 0.4, dtype, seed=9, absent=(0,))
    stride, padding, dilation, groups = _geometry(cfg)
    g = group_by_ticket(route, masks.shape[0])
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
def test_grad_weight_is_deterministic(dtype):
    cfg = (24, 16, 20, 20, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1, 3)
    args = _case(cfg, 0.5, dtype, seed=21)
    first = _ours(cfg, *args)
    second = _ours(cfg, *args)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} must be bitwise deterministic"


@gpu
@needs_gpu
@needs_ext
def test_forward_captures_in_cuda_graph():
    # No host sync: captured once, replayed with new images and a new routing (perm/offsets rewritten in place).
    cfg = (10, 5, 11, 12, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4)
    stride, padding, dilation, groups = _geometry(cfg)
    x, w, masks, bias, route, _ = _case(cfg, 0.5, torch.float32, seed=31)
    g = group_by_ticket(route, 4)
    perm, offsets = g.perm.clone(), g.offsets.clone()
    be = _cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        be.conv2d_forward(x, w, masks, bias, perm, offsets, stride, padding, dilation, groups)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = be.conv2d_forward(x, w, masks, bias, perm, offsets, stride, padding, dilation, groups)
    for seed in (1, 2):
        x2, _, _, _, route2, gy2 = _case(cfg, 0.5, torch.float32, seed=100 + seed, absent=(seed,))
        g2 = group_by_ticket(route2, 4)
        x.copy_(x2)
        perm.copy_(g2.perm)
        offsets.copy_(g2.offsets)
        graph.replay()
        torch.cuda.synchronize()
        exact = _exact(cfg, x, w, masks, bias, route2, gy2)[0]
        _check_fp32(y_static, exact, "graph replay")


# ------------------------------------------------------------------------------------------------------------------
# CPU: the built extension registers the conv ops
# ------------------------------------------------------------------------------------------------------------------
@needs_ext
def test_extension_registers_conv_ops():
    import rtl_kernels._C_cuda  # noqa: F401

    for op in CONV_OPS:
        assert hasattr(torch.ops.rtl_kernels, op), op
        schema = str(getattr(torch.ops.rtl_kernels, op).default._schema)
        assert "Tensor(a!) out" in schema and "int groups" in schema, schema


@needs_ext
def test_conv_ops_reject_cpu_tensors_clearly():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    masks = torch.ones(1, 4, 3, 3, 3, dtype=torch.bool)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.rtl_kernels._cuda_conv2d_forward(
            x,
            w,
            masks,
            None,
            torch.arange(2),
            torch.tensor([0, 2]),
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            torch.empty(2, 4, 5, 5),
        )


def test_backend_has_conv_methods():
    be = _cuda()
    for name in ("conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight"):
        assert getattr(type(be), name) is not getattr(type(be).__mro__[1], name), name
