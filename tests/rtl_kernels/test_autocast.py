"""Autocast: inside torch.autocast the routed ops take their floating inputs in the autocast dtype (as torch's
linear and convolution do), their result is in that dtype, and the float32 parameters get float32 gradients.
Checked on CPU with bfloat16 (the same code path serves torch.autocast("cuda", ...))."""

import pytest
import torch

import rtl_kernels as rk

BF16 = torch.bfloat16


def _case(shape_x, shape_w, tickets=3, rows=6, out_features=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape_x, generator=gen)
    weight = torch.randn(*shape_w, generator=gen, requires_grad=True)
    bias = torch.randn(out_features or shape_w[0], generator=gen, requires_grad=True)
    masks = torch.rand(tickets, *shape_w, generator=gen) > 0.4
    route = torch.randint(0, tickets, (rows,), generator=gen)
    return x, weight, bias, masks, route


OPS = {
    "linear": (rk.routed_masked_linear, (6, 16), (8, 16), {}),
    "conv2d": (rk.routed_masked_conv2d, (6, 4, 7, 7), (5, 4, 3, 3), {"padding": 1}),
    # the transposed conv's weight is (in, out, kh, kw): its bias has out = 3 entries
    "conv_transpose2d": (rk.routed_masked_conv_transpose2d, (6, 5, 4, 4), (5, 3, 3, 3), {"stride": 2}),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_autocast_runs_the_op_in_the_autocast_dtype(name):
    op, shape_x, shape_w, kwargs = OPS[name]
    x, weight, bias, masks, route = _case(shape_x, shape_w, out_features=3 if name == "conv_transpose2d" else None)
    with torch.autocast("cpu", dtype=BF16):
        y = op(x, weight, masks, route, bias, **kwargs)
    assert y.dtype == BF16
    # the same op on inputs cast by hand: what autocast must amount to
    expected = op(x.to(BF16), weight.detach().to(BF16), masks, route, bias.detach().to(BF16), **kwargs)
    torch.testing.assert_close(y.detach(), expected)
    # and close to the float64 result, at bfloat16's precision
    exact = op(x.double(), weight.detach().double(), masks, route, bias.detach().double(), **kwargs)
    torch.testing.assert_close(y.detach().double(), exact, rtol=5e-2, atol=5e-2 * exact.abs().max().item())
    y.float().square().sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert weight.grad.abs().sum() > 0
    assert torch.all(weight.grad[~masks[route.unique()].any(0)] == 0)  # still nothing outside the masks used


def test_outside_autocast_nothing_is_cast():
    op, shape_x, shape_w, kwargs = OPS["linear"]
    x, weight, bias, masks, route = _case(shape_x, shape_w)
    assert op(x, weight, masks, route, bias).dtype == torch.float32
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert op(x, weight, masks, route, bias).dtype == torch.float32


def test_float64_inputs_stay_float64_under_autocast():
    op, shape_x, shape_w, kwargs = OPS["linear"]
    x, weight, bias, masks, route = _case(shape_x, shape_w)
    with torch.autocast("cpu", dtype=BF16):
        assert op(x.double(), weight.double(), masks, route, bias.double()).dtype == torch.float64
