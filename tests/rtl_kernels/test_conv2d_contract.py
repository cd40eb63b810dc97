"""The contract of routed_masked_conv2d and routed_masked_conv_transpose2d, checked once per backend target.

Targets (tests/rtl_kernels/conftest.py): the reference and cpu backends on CPU tensors (the cpu backend also with
each of its conv paths forced in the sweeps), triton under its interpreter on CPU and compiled on a GPU, cuda on a
GPU (``gpu``). The oracle runs F.conv2d / F.conv_transpose2d image by image with that image's masked weight in
float64 and takes its gradients by autograd. Backend-specific details live in test_cpu_backend.py,
test_triton_backend.py and test_cuda_backend.py.
"""

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels as rk
from rtl_kernels.backends import get_backend_module

# (B, C, O, (H, W), (kh, kw), T, groups, geometry)
CPU_CASES = [
    (5, 3, 7, (9, 11), (3, 3), 3, 1, dict(padding=1)),
    (4, 6, 5, (8, 7), (1, 1), 2, 1, dict()),
    (3, 4, 6, (10, 13), (3, 5), 4, 1, dict(stride=(1, 2), padding=(1, 2))),
    (6, 5, 9, (11, 9), (5, 5), 3, 1, dict(stride=2, padding=2, dilation=1)),
    (4, 3, 4, (12, 12), (3, 3), 2, 1, dict(dilation=2, padding=2)),
    (1, 4, 6, (7, 7), (3, 3), 3, 2, dict(padding=1)),
    (5, 6, 6, (9, 8), (3, 3), 3, 6, dict(padding=1, stride=2)),  # depthwise
    (3, 4, 8, (9, 9), (5, 5), 2, 4, dict(padding=2)),  # depthwise with channel multiplier 2
    (7, 11, 11, (4, 4), (3, 3), 3, 11, dict(padding=1)),  # depthwise on a tiny map: channels as vector lanes
    (5, 9, 9, (5, 5), (3, 3), 2, 9, dict(padding=1, stride=2)),
    (7, 3, 5, (6, 6), (3, 3), 1, 1, dict(padding=1)),  # T = 1
    (6, 5, 7, (3, 2), (1, 1), 3, 1, dict()),  # 1x1 on a 3x2 map: the cpu backend's pointwise "rows" path
    # rows of at most 8 packed columns (the cpu kernel copies them as 8-float vectors): many images per ticket
    (13, 6, 7, (4, 4), (3, 3), 2, 1, dict(padding=1)),
    (11, 5, 6, (2, 3), (3, 3), 2, 1, dict(padding=1)),
]
# Tile edges of the GPU kernels: kernel sizes 1x1 to 5x5, mixed strides, dilation, groups and depthwise, B = 1,
# channels past one 64-wide tile, T > 32, several 64-pixel tiles per image, a dilation larger than the output.
GPU_CASES = [
    (5, 3, 7, (11, 9), (1, 1), 3, 1, dict()),
    (6, 5, 9, (13, 10), (3, 3), 3, 1, dict(padding=1)),
    (4, 6, 10, (12, 11), (3, 5), 3, 2, dict(stride=(2, 1), padding=(1, 2))),
    (5, 4, 6, (15, 14), (3, 3), 4, 1, dict(stride=2, padding=2, dilation=2)),
    (3, 8, 8, (9, 9), (3, 3), 2, 8, dict(padding=1)),
    (4, 6, 12, (10, 11), (3, 3), 3, 6, dict(stride=2, padding=1)),
    (1, 5, 7, (9, 7), (3, 3), 3, 1, dict(padding=1)),
    (7, 5, 70, (8, 9), (3, 3), 1, 1, dict()),
    (2, 70, 5, (9, 9), (1, 3), 2, 1, dict(stride=(1, 2), padding=(0, 1))),
    (9, 3, 8, (20, 17), (5, 5), 40, 1, dict(stride=3, padding=2)),
    (3, 4, 5, (33, 31), (3, 3), 2, 1, dict(padding=1)),
    (4, 3, 5, (7, 6), (3, 3), 3, 1, dict(dilation=(3, 2))),
]
# Several row tiles per ticket, several channel and K blocks (K > 64), two K blocks of which the second is partial.
LARGE_CASES = [
    (4, 8, 8, (9, 9), (3, 5), 2, 1, dict(padding=(1, 2))),
    (6, 40, 70, (17, 15), (3, 3), 3, 1, dict(padding=1)),
    (5, 48, 36, (19, 13), (3, 5), 4, 4, dict(stride=2, padding=(1, 2), dilation=(2, 1))),
    (7, 96, 96, (15, 16), (3, 3), 3, 96, dict(padding=1)),
]
# The Triton interpreter's cases (one run each, density 0.6): every geometry family on small maps.
INTERPRETED_CASES = {
    "1x1": (3, 5, 7, (6, 5), (1, 1), 3, 1, dict(), "random"),
    "3x3_pad1": (4, 3, 6, (7, 9), (3, 3), 3, 1, dict(padding=1), "random"),
    "3x5_stride2_pad1x2": (3, 4, 5, (9, 8), (3, 5), 2, 1, dict(stride=2, padding=(1, 2)), "random"),
    "stride1x2_dilation2": (2, 4, 6, (9, 9), (3, 3), 3, 1, dict(stride=(1, 2), padding=1, dilation=2), "random"),
    "groups2_empty_ticket": (3, 6, 4, (7, 6), (3, 3), 3, 2, dict(padding=1), "empty_tickets"),
    "depthwise_stride2": (3, 5, 5, (8, 7), (3, 3), 2, 5, dict(stride=2, padding=1), "random"),
    "depthwise_multiplier2_dilation2": (2, 4, 8, (9, 7), (3, 3), 2, 4, dict(padding=2, dilation=2), "random"),
    "single_image": (1, 5, 6, (7, 8), (3, 5), 3, 1, dict(stride=2), "random"),
    "single_ticket": (3, 4, 5, (6, 7), (3, 3), 1, 1, dict(padding=1), "one_ticket"),
    "two_k_blocks": (4, 8, 8, (9, 9), (3, 5), 2, 1, dict(padding=(1, 2)), "random"),
}
# (routing, bias) of each run of a case: random tickets, every other ticket empty (without bias), one ticket.
RUNS = (("random", True), ("empty_tickets", False), ("one_ticket", True))


def _case_id(case):
    b, c, o, (h, w), (kh, kw), t, g, geometry = case[:8]
    extra = "".join(f"_{k[0]}{v}" for k, v in geometry.items()).replace(" ", "")
    return f"b{b}c{c}o{o}_{h}x{w}_k{kh}x{kw}t{t}g{g}{extra}"


def _sweep(cases, densities, runs=RUNS):
    return {f"{_case_id(c)}-d{d}": (*c[:8], d, runs) for c in cases for d in densities}


SWEEP = _sweep(CPU_CASES + GPU_CASES + LARGE_CASES, (0.0, 0.3, 0.9, 1.0))
CPU_PATH_SWEEP = _sweep(CPU_CASES, (0.0, 0.3, 0.9))
INTERPRETED_SWEEP = {name: (*c[:8], 0.6, ((c[8], True),)) for name, c in INTERPRETED_CASES.items()}

TRANSPOSED_CASES = {  # the speech U-Net decoder's shapes in miniature (3x3 and 3x5, stride (1, 2)), grouped, 2x2
    "k3x3_s1x2": (3, 6, 4, (5, 7), (3, 3), 3, 1, dict(stride=(1, 2), padding=1, output_padding=(0, 1))),
    "k3x5_s1x2": (4, 4, 2, (6, 5), (3, 5), 3, 1, dict(stride=(1, 2), padding=(1, 2), output_padding=(0, 1))),
    "k3x3_g2": (2, 4, 6, (5, 5), (3, 3), 2, 2, dict(stride=2, padding=1, dilation=1)),
    "k2x2_s2": (3, 3, 3, (4, 6), (2, 2), 2, 1, dict(stride=2)),
    "k3x3_g2_op1": (3, 4, 6, (5, 4), (3, 3), 2, 2, dict(stride=2, padding=1, output_padding=1)),
}

LOW_SWEEP = _sweep(GPU_CASES, (0.5, 1.0), (("random", True), ("empty_tickets", True)))
LOW_SWEEP.update(
    {
        name: (*INTERPRETED_CASES[name][:8], 0.6, ((INTERPRETED_CASES[name][8], True),))
        for name in ("3x3_pad1", "depthwise_stride2")
    }
)
LOW_INTERPRETED = {name: INTERPRETED_SWEEP[name] for name in ("3x3_pad1", "depthwise_stride2")}


def run_op(target, x, weight, masks, route, bias, grad_y, dtype=torch.float32, *, transposed=False, **geometry):
    """(y, dx, dweight, dbias) of the op on ``target`` in ``dtype``; with grad_y, gradients of (y * grad_y).sum()."""
    x, weight, bias, masks, route, grad_y = target.put(x, weight, bias, masks, route, grad_y, dtype=dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
    with target.selected():
        y = op(leaves[0], leaves[1], masks, route, leaves[2], **geometry)
        if grad_y is None:
            return (y.detach(), None, None, None)
        y.backward(grad_y)
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def _grad_like(x, weight, masks, route, bias, seed, transposed=False, **geometry):
    """A fresh float64 gradient of the output's shape (taken from the oracle's forward)."""
    conv = F.conv_transpose2d if transposed else F.conv2d
    shape = conv(x[:1].double(), weight.double(), None, **geometry).shape[1:]
    return torch.randn(x.shape[0], *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


NAMES = ("y", "dx", "dweight", "dbias")


def _check_all(check_float64, got, exact, what, theirs=(None,) * 4):
    for name, g, e, t in zip(NAMES, got, exact, theirs):
        check_float64(g, e, f"{what}: {name}", torch_low=t)


# -- values and gradients -------------------------------------------------------------------------------------------


@pytest.mark.contract(cases=SWEEP, interpreted_cases=INTERPRETED_SWEEP, cpu_path_cases=CPU_PATH_SWEEP)
def test_conv2d_forward_and_gradients_match_float64(
    target, case, seed, conv_case, conv_oracle, check_float64, zero_outside
):
    batch, c, o, hw, kernel, tickets, groups, geometry, density, runs = case
    for i, (routing, bias) in enumerate(runs):
        x, w, masks, route, b = conv_case(
            batch, c, o, hw, kernel, tickets, density, seed + i, groups=groups, routing=routing, bias=bias
        )
        grad_y = _grad_like(x, w, masks, route, b, seed + i, groups=groups, **geometry)
        got = run_op(target, x, w, masks, route, b, grad_y, groups=groups, **geometry)
        for g in got:
            assert g is None or (g.dtype == torch.float32 and g.device.type == target.device)
        exact = conv_oracle(x, w, masks, route, b, grad_y, groups=groups, **geometry)
        _check_all(check_float64, got, exact, f"{routing}, bias={bias}")
        dw, outside = got[2].cpu(), zero_outside(masks, route)
        assert torch.equal(dw[outside], torch.zeros_like(dw[outside])), "dW must be exactly zero outside the masks"


@pytest.mark.contract(cases=TRANSPOSED_CASES, cpu_path_cases=TRANSPOSED_CASES)
def test_conv_transpose2d_forward_and_gradients_match_float64(
    target, case, seed, conv_case, conv_oracle, check_float64, zero_outside
):
    batch, c, o, hw, kernel, tickets, groups, geometry = case
    x, w, masks, route, b = conv_case(batch, c, o, hw, kernel, tickets, 0.4, seed, groups=groups, transposed=True)
    grad_y = _grad_like(x, w, masks, route, b, seed, transposed=True, groups=groups, **geometry)
    got = run_op(target, x, w, masks, route, b, grad_y, transposed=True, groups=groups, **geometry)
    exact = conv_oracle(x, w, masks, route, b, grad_y, transposed=True, groups=groups, **geometry)
    _check_all(check_float64, got, exact, "conv_transpose2d")
    outside = zero_outside(masks, route)
    assert torch.equal(got[2].cpu()[outside], torch.zeros_like(got[2].cpu()[outside]))


@pytest.mark.contract(dtypes="all")
def test_single_ticket_equals_masked_dense_conv(target, dtype, seed, conv_case, check_float64):
    """With one ticket the op is F.conv2d with the masked weight: compared with it in float64 (and in dtype)."""
    for batch, c, o, hw, geometry in [
        (4, 3, 5, (8, 8), dict(padding=1)),
        (6, 7, 9, (12, 13), dict(stride=(2, 1), padding=1)),
    ]:
        x, w, masks, route, b = conv_case(batch, c, o, hw, (3, 3), 1, 0.5, seed, routing="one_ticket")
        x, w, masks, route, b = target.put(x, w, masks, route, b, dtype=dtype)
        with target.selected():
            y = rk.routed_masked_conv2d(x, w, masks, route, b, **geometry)
        wm = torch.where(masks[0], w, torch.zeros((), dtype=dtype, device=w.device))
        exact = F.conv2d(x.double(), wm.double(), b.double(), **geometry).cpu()
        check_float64(y, exact, f"{geometry}", torch_low=F.conv2d(x, wm, b, **geometry))


@pytest.mark.contract(dtypes="low", cases=LOW_SWEEP, interpreted_cases=LOW_INTERPRETED)
def test_low_precision_error_at_most_twice_torchs(
    target, dtype, case, seed, conv_case, conv_oracle, check_float64, zero_outside
):
    batch, c, o, hw, kernel, tickets, groups, geometry, density, runs = case
    for i, (routing, bias) in enumerate(runs):
        x, w, masks, route, b = conv_case(
            batch, c, o, hw, kernel, tickets, density, seed + i, groups=groups, routing=routing, bias=bias
        )
        grad_y = _grad_like(x, w, masks, route, b, seed + i, groups=groups, **geometry)
        exact = conv_oracle(x, w, masks, route, b, grad_y, groups=groups, **geometry)
        ours = run_op(target, x, w, masks, route, b, grad_y, dtype, groups=groups, **geometry)
        # The same computation done by torch in that dtype: the reference backend on the rounded inputs.
        theirs = run_op(target.as_reference(), x, w, masks, route, b, grad_y, dtype, groups=groups, **geometry)
        assert all(o is None or o.dtype == dtype for o in ours)
        _check_all(check_float64, ours, exact, routing, theirs)
        assert bool((ours[2].cpu()[zero_outside(masks, route)] == 0).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.contract(dtypes="all")
def test_weight_gradient_is_exactly_zero_outside_present_masks_even_for_nonfinite_gradients(
    target, dtype, seed, conv_case, zero_outside
):
    """Ticket 0 gets no images but keeps every weight: its mask must open no weight, even when the gradient holds
    NaN and inf; NaNs land in the same places on a second run."""
    geometry = dict(padding=1, groups=2)
    x, w, masks, route, _ = conv_case(6, 6, 4, (7, 6), (3, 3), 3, 0.3, seed, groups=2)
    route = torch.tensor([1, 2, 2, 1, 2, 1])
    masks[0] = True
    grad_y = _grad_like(x, w, masks, route, None, seed, **geometry)
    grad_y[0, :2, 1, 1] = float("nan")
    grad_y[1, 2:, 0, 3] = float("inf")
    dw = run_op(target, x, w, masks, route, None, grad_y, dtype, **geometry)[2].cpu()
    outside = zero_outside(masks, route)
    assert outside.any()
    assert torch.equal(dw[outside], torch.zeros_like(dw[outside]))
    again = run_op(target, x, w, masks, route, None, grad_y, dtype, **geometry)[2].cpu()
    assert torch.equal(dw.nan_to_num(), again.nan_to_num()) and torch.equal(dw.isnan(), again.isnan())


DETERMINISM = {"b24c16o24_20x20": (24, 16, 24, (20, 20)), "b4c3o6_7x9": (4, 3, 6, (7, 9))}


@pytest.mark.contract(dtypes="all", cases=DETERMINISM, interpreted_cases={"b4c3o6_7x9": DETERMINISM["b4c3o6_7x9"]})
def test_gradients_are_bitwise_deterministic(target, dtype, case, seed, conv_case):
    batch, c, o, hw = case
    x, w, masks, route, b = conv_case(batch, c, o, hw, (3, 3), 3, 0.5, seed)
    grad_y = _grad_like(x, w, masks, route, b, seed, padding=1)
    first = run_op(target, x, w, masks, route, b, grad_y, dtype, padding=1)
    second = run_op(target, x, w, masks, route, b, grad_y, dtype, padding=1)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"


@pytest.mark.contract()
def test_gradcheck_in_float64(target):
    reason = get_backend_module(target.backend).unavailable_reason(torch.device(target.device), torch.float64)
    if reason is not None:
        pytest.skip(f"{target.backend} does not compute in float64: {reason}")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(6, dtype=torch.float64, generator=gen)
    m = torch.rand(2, 6, 2, 3, 3, generator=gen) < 0.5
    mt = torch.rand(2, 4, 3, 3, 3, generator=gen) < 0.5
    x, w, wt, b, m, mt, r = target.put(x, w, wt, b, m, mt, torch.tensor([1, 0, 1]))
    for t in (x, w, wt, b):
        t.requires_grad_()
    with target.selected():
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: rk.routed_masked_conv2d(a, ww, m, r, bb, stride=(2, 1), padding=1, groups=2), (x, w, b)
        )
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: rk.routed_masked_conv_transpose2d(
                a, ww, mt, r, bb, stride=(1, 2), padding=1, output_padding=(0, 1), groups=2
            ),
            (x, wt, b),
        )


# -- geometry and memory format ------------------------------------------------------------------------------------


@pytest.mark.contract()
def test_padding_same_and_valid_match_f_conv2d(target, seed, conv_case, conv_oracle, check_float64):
    """'same' with an even kernel height pads asymmetrically; 'valid' pads nothing."""
    x, w, masks, route, _ = conv_case(3, 2, 4, (7, 6), (4, 3), 2, 0.6, seed)
    for padding in ("same", "valid"):
        (y,) = run_op(target, x, w, masks, route, None, None, padding=padding, dilation=(1, 2))[:1]
        check_float64(y, conv_oracle(x, w, masks, route, None, padding=padding, dilation=(1, 2)).y, padding)


@pytest.mark.contract()
def test_channels_last_input_gives_the_contiguous_result(target, seed, conv_case, conv_oracle, check_float64):
    x, w, masks, route, _ = conv_case(4, 3, 5, (9, 9), (3, 3), 2, 0.5, seed)
    x, w, masks, route = target.put(x, w, masks, route)
    with target.selected():
        y = rk.routed_masked_conv2d(x.to(memory_format=torch.channels_last), w, masks, route, padding=1)
        y_ref = rk.routed_masked_conv2d(x.contiguous(), w, masks, route, padding=1)
    torch.testing.assert_close(y, y_ref)
    check_float64(y, conv_oracle(x, w, masks, route, None, padding=1).y, "channels_last")


# -- edge cases -----------------------------------------------------------------------------------------------------


@pytest.mark.contract()
def test_empty_batch_gives_empty_output_and_zero_weight_gradient(target, conv_case):
    x, w, masks, route, b = target.put(*conv_case(0, 3, 4, (5, 5), (3, 3), 2, 1.0))
    xt, wt, mt, _, bt = target.put(*conv_case(0, 4, 3, (5, 5), (3, 3), 2, 1.0, transposed=True))
    for t in (x, w, xt, wt):
        t.requires_grad_()
    with target.selected():
        y = rk.routed_masked_conv2d(x, w, masks, route, b)
        assert y.shape == (0, 4, 3, 3)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
        yt = rk.routed_masked_conv_transpose2d(xt, wt, mt, route, bt, stride=2)
        assert yt.shape == (0, 3, 11, 11)
        dxt, dwt = torch.autograd.grad(yt.sum(), (xt, wt))
    assert dx.shape == x.shape and torch.equal(dw.cpu(), torch.zeros(w.shape))
    assert dxt.shape == xt.shape and torch.equal(dwt.cpu(), torch.zeros(wt.shape))


@pytest.mark.contract()
def test_fully_pruned_ticket_outputs_the_bias_and_passes_no_gradient(
    target, seed, conv_case, conv_oracle, check_float64
):
    x, w, masks, route, b = conv_case(6, 4, 5, (7, 8), (3, 3), 3, 0.5, seed)
    route[:2] = 1
    masks[1] = False
    grad_y = _grad_like(x, w, masks, route, b, seed, padding=1)
    got = run_op(target, x, w, masks, route, b, grad_y, padding=1)
    rows = route == 1
    assert torch.equal(got[0].cpu()[rows], b[None, :, None, None].expand(int(rows.sum()), 5, 7, 8))
    assert torch.equal(got[1].cpu()[rows], torch.zeros(int(rows.sum()), 4, 7, 8))
    _check_all(check_float64, got, conv_oracle(x, w, masks, route, b, grad_y, padding=1), "pruned ticket")


@pytest.mark.contract()
def test_nonfinite_input_reaches_only_its_own_image(target, seed, conv_case):
    """An inf in one image makes its own outputs under a kept tap non-finite and leaves every other image finite."""
    x, w, masks, route, b = conv_case(5, 3, 4, (6, 6), (3, 3), 2, 0.3, seed)
    masks[:, :, 1, 1, 1] = True  # the centre tap of channel 1 is kept by every ticket
    x[2, 1, 3, 3] = float("inf")
    x, w, masks, route, b = target.put(x, w, masks, route, b)
    with target.selected():
        y = rk.routed_masked_conv2d(x, w, masks, route, b, padding=1).cpu()
    assert not torch.isfinite(y[2, :, 3, 3]).any()
    assert torch.isfinite(y[torch.arange(5) != 2]).all()


@pytest.mark.contract()
def test_in_place_mask_and_weight_edits_are_seen(target, seed, conv_case, conv_oracle, check_float64):
    x, w, masks, route, _ = target.put(*conv_case(5, 4, 6, (6, 6), (3, 3), 2, 0.5, seed))
    with target.selected():
        y1 = rk.routed_masked_conv2d(x, w, masks, route, padding=1)
        masks[0, :2].logical_not_()
        y2 = rk.routed_masked_conv2d(x, w, masks, route, padding=1)
        with torch.no_grad():
            w.mul_(3)
        y3 = rk.routed_masked_conv2d(x, w, masks, route, padding=1)
    check_float64(y2, conv_oracle(x, w / 3, masks, route, None, padding=1).y, "y after the mask edit")
    check_float64(y3, conv_oracle(x, w, masks, route, None, padding=1).y, "y after the weight edit")
    assert not torch.allclose(y1, y2)


# -- registration with torch ----------------------------------------------------------------------------------------


@pytest.mark.contract()
def test_opcheck(target):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 6, 5, generator=gen)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    wt = torch.randn(4, 3, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen)
    m, mt = torch.rand(2, 6, 4, 3, 3, generator=gen) < 0.5, torch.rand(2, 4, 3, 3, 3, generator=gen) < 0.5
    x, w, wt, b, m, mt, r = target.put(x, w, wt, b, m, mt, torch.tensor([1, 0, 1]))
    for t in (x, w, wt, b):
        t.requires_grad_()
    ops = torch.ops.rtl_kernels
    with target.selected():
        torch.library.opcheck(ops.routed_masked_conv2d, (x, w, m, r, b, [1, 2], [1, 1], [1, 1], 1))
        torch.library.opcheck(ops.routed_masked_conv_transpose2d, (x, wt, mt, r, b[:3], [2, 1], [1, 0], [1, 0], 1))


@pytest.mark.contract()
def test_torch_compile_fullgraph_matches_eager(target, seed, conv_case):
    x, w, m, r, _ = target.put(*conv_case(4, 3, 5, (8, 8), (3, 3), 3, 0.4, seed))
    w.requires_grad_()

    def step(x_, w_):
        return rk.routed_masked_conv2d(torch.relu(x_), w_, m, r, padding=1).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with target.selected():
        loss, loss_ref = compiled(x, w), step(x, w)
        (dw,), (dw_ref,) = torch.autograd.grad(loss, (w,)), torch.autograd.grad(loss_ref, (w,))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


# -- GPU: no host synchronisation -----------------------------------------------------------------------------------

# The backend methods each GPU backend promises to run without a host sync, so that they capture in a CUDA graph.
GRAPH_CAPTURED = {"triton": ("forward", "grad_input", "grad_weight"), "cuda": ("forward",)}


@pytest.mark.contract(dtypes=(torch.float32, torch.bfloat16), targets=lambda t: t.device == "cuda")
def test_kernels_capture_in_a_cuda_graph_and_replay_a_new_routing(
    target, dtype, seed, conv_case, conv_oracle, check_float64
):
    """Captured once, replayed with new images and a new routing written into perm/offsets: this only works when
    the kernels find tickets and image ranges on the device."""
    batch, c, o, hw, kernel, tickets, groups, geo = LARGE_CASES[2]
    stride, padding, dilation = geo["stride"], geo["padding"], geo["dilation"]
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x0, w0, masks0, route0, b0 = conv_case(batch, c, o, hw, kernel, tickets, 0.5, seed, groups=groups)
    gy0 = _grad_like(x0, w0, masks0, route0, b0, seed, **geometry)
    x, w, masks, b, grad_y = target.put(x0, w0, masks0, b0, gy0, dtype=dtype)
    grouping = rk.group_by_ticket(route0.cuda(), tickets)
    perm, offsets = grouping.perm.clone(), grouping.offsets.clone()
    backend = get_backend_module(target.backend)
    s, p, d = (stride, stride), padding, dilation
    methods = {
        "forward": lambda: backend.conv2d_forward(x, w, masks, b, perm, offsets, s, p, d, groups),
        "grad_input": lambda: backend.conv2d_grad_input(
            grad_y, w, masks, perm, offsets, tuple(x.shape), s, p, d, groups
        ),
        "grad_weight": lambda: backend.conv2d_grad_weight(grad_y, x, masks, perm, offsets, s, p, d, groups),
    }
    captured = GRAPH_CAPTURED[target.backend]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        for name in captured:
            methods[name]()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # any host synchronisation inside would make the capture fail
        outputs = {name: methods[name]() for name in captured}
    for replay in (1, 2):
        x1 = conv_case(batch, c, o, hw, kernel, tickets, 0.5, seed + replay, groups=groups)[0]
        route1 = (route0**2 + replay) % tickets  # a different count per ticket, one ticket without images
        gy1 = _grad_like(x1, w0, masks0, route1, b0, seed + replay, **geometry)
        new = rk.group_by_ticket(route1.cuda(), tickets)
        x.copy_(x1)
        grad_y.copy_(gy1)
        perm.copy_(new.perm)
        offsets.copy_(new.offsets)
        graph.replay()
        torch.cuda.synchronize()
        exact = conv_oracle(x1, w0, masks0, route1, b0, gy1, **geometry)
        theirs = run_op(target.as_reference(), x1, w0, masks0, route1, b0, gy1, dtype, **geometry)
        for i, name in enumerate(("forward", "grad_input", "grad_weight")):
            if name in captured:
                check_float64(outputs[name], exact[i], f"replay {replay}: {name}", torch_low=theirs[i])


# -- argument checks (before any backend runs) ----------------------------------------------------------------------


def _good():
    gen = torch.Generator().manual_seed(9)
    return dict(
        x=torch.randn(3, 4, 6, 6, generator=gen),
        weight=torch.randn(6, 4, 3, 3, generator=gen),
        masks=torch.rand(2, 6, 4, 3, 3, generator=gen) < 0.5,
        route=torch.tensor([0, 1, 1]),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(route=torch.tensor([0, 2, 1])), ValueError, r"ticket id 2, outside \[0, 2\)"),
        (dict(route=torch.tensor([0.0, 1.0, 1.0])), TypeError, "route must be an integer tensor"),
        (dict(route=torch.tensor([0, 1])), ValueError, "route has 2 entries but x has 3 images"),
        (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight must be 4-D"),
        (
            dict(masks=torch.ones(2, 6, 4, 3, 2, dtype=torch.bool)),
            ValueError,
            r"masks must have shape \(T, 6, 4, 3, 3\)",
        ),
        (dict(masks=torch.ones(2, 6, 4, 3, 3)), TypeError, "masks must be a bool tensor"),
        (dict(x=torch.randn(3, 5, 6, 6)), ValueError, "x has 5 channels but weight"),
        (dict(groups=3), ValueError, "x has 4 channels, not divisible by groups = 3"),
        (dict(x=torch.randn(3, 4, 2, 2)), ValueError, r"smaller than the dilated kernel"),
        (dict(padding="full"), ValueError, "padding must be an int, a pair of ints, 'same' or 'valid'"),
        (dict(stride=0), ValueError, r"stride must be >= 1"),
        (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
        (dict(x=torch.randn(3, 4, 6, 6).double()), TypeError, "weight dtype torch.float32 differs from x dtype"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
    ],
)
def test_conv2d_bad_input_names_argument_and_value(change, error, match):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=match):
        rk.routed_masked_conv2d(**args)


def test_conv_transpose2d_bad_input_names_argument_and_value():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3)
    m, r = torch.ones(2, 4, 3, 3, 3, dtype=torch.bool), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="output_padding"):
        rk.routed_masked_conv_transpose2d(x, w, m, r, stride=1, output_padding=1)
    with pytest.raises(ValueError, match="x has 3 channels but the transposed weight"):
        rk.routed_masked_conv_transpose2d(torch.randn(2, 3, 5, 5), w, m, r)
