"""routed_masked_conv2d / routed_masked_conv_transpose2d on the reference and cpu backends.

The oracle runs F.conv2d / F.conv_transpose2d image by image with that image's masked weight, in float64, and
takes its gradients with autograd: independent of every backend.
"""

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
TOL = dict(rtol=1e-4, atol=1e-4)


def oracle(x, weight, masks, route, bias, transposed=False, **geometry):
    """float64 outputs and the gradients of (out * grad_out).sum() wrt x, weight, bias."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    fn = F.conv_transpose2d if transposed else F.conv2d
    outs = [fn(xd[i : i + 1], wd * masks[int(route[i])].double(), bd, **geometry) for i in range(x.shape[0])]
    return torch.cat(outs), (xd, wd, bd)


def run_case(
    backend, batch, c, o, h, w, k, tickets, density, groups=1, transposed=False, route_kind="random", seed=0, **geometry
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=gen, requires_grad=True)
    wshape = (c, o // groups, *k) if transposed else (o, c // groups, *k)
    weight = torch.randn(*wshape, generator=gen, requires_grad=True)
    bias = torch.randn(o, generator=gen, requires_grad=True)
    # density: one for every ticket, or a sequence of T per-ticket densities
    density = torch.as_tensor(density, dtype=torch.float32).reshape(-1, *([1] * len(wshape)))
    masks = torch.rand(tickets, *wshape, generator=gen) < density
    if route_kind == "random":
        route = torch.randint(0, tickets, (batch,), generator=gen)
    elif route_kind == "one_ticket":
        route = torch.full((batch,), tickets - 1, dtype=torch.int64)
    else:  # every other ticket empty
        route = torch.randint(0, (tickets + 1) // 2, (batch,), generator=gen) * 2
        route = route.clamp(max=tickets - 1)
    op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
    with rk.set_backend(backend):
        y = op(x, weight, masks, route, bias, groups=groups, **geometry)
        grad_y = torch.randn(y.shape, generator=gen)
        dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad_y)
    ref, (xd, wd, bd) = oracle(x, weight, masks, route, bias, transposed, groups=groups, **geometry)
    ref_dx, ref_dw, ref_db = torch.autograd.grad(ref, (xd, wd, bd), grad_y.double())
    torch.testing.assert_close(y.double(), ref, **TOL)
    torch.testing.assert_close(dx.double(), ref_dx, **TOL)
    torch.testing.assert_close(dw.double(), ref_dw, **TOL)
    torch.testing.assert_close(db.double(), ref_db, **TOL)
    present = torch.zeros_like(masks[0])
    for t in route.unique().tolist():
        present |= masks[t]
    assert torch.equal(dw[~present], torch.zeros_like(dw[~present])), "dW must be exactly zero outside masks"
    return y


CONV_CASES = [  # (batch, c, o, h, w, kernel, tickets, groups, geometry)
    (5, 3, 7, 9, 11, (3, 3), 3, 1, dict(padding=1)),
    (4, 6, 5, 8, 7, (1, 1), 2, 1, dict()),
    (3, 4, 6, 10, 13, (3, 5), 4, 1, dict(stride=(1, 2), padding=(1, 2))),
    (6, 5, 9, 11, 9, (5, 5), 3, 1, dict(stride=2, padding=2, dilation=1)),
    (4, 3, 4, 12, 12, (3, 3), 2, 1, dict(dilation=2, padding=2)),
    (1, 4, 6, 7, 7, (3, 3), 3, 2, dict(padding=1)),
    (5, 6, 6, 9, 8, (3, 3), 3, 6, dict(padding=1, stride=2)),  # depthwise
    (3, 4, 8, 9, 9, (5, 5), 2, 4, dict(padding=2)),  # depthwise with channel multiplier 2
    (7, 11, 11, 4, 4, (3, 3), 3, 11, dict(padding=1)),  # depthwise on a tiny map: channels as vector lanes
    (5, 9, 9, 5, 5, (3, 3), 2, 9, dict(padding=1, stride=2)),
    (7, 3, 5, 6, 6, (3, 3), 1, 1, dict(padding=1)),  # T = 1
    (6, 5, 7, 3, 2, (1, 1), 3, 1, dict()),  # 1x1 on a 3x2 map: the cpu backend's pointwise "rows" path
    # rows of at most 8 packed columns (the cpu kernel copies them as 8-float vectors): many images per ticket
    (13, 6, 7, 4, 4, (3, 3), 2, 1, dict(padding=1)),
    (11, 5, 6, 2, 3, (3, 3), 2, 1, dict(padding=1)),
]


# The cpu backend's conv paths (rtl_kernels.backends.cpu.policy), each forced through the public policy override:
# "auto" chooses as in use; "dense" runs torch's convolution per mask class; "image" a masked weight per image;
# "sparse" the direct sparse kernel for every ticket; "split" the sparse kernel for tickets under half density and
# torch's convolution for the others, in the same call.
CPU_CONV_PATHS = {
    "auto": {},
    "dense": dict(conv_path="dense"),
    "image": dict(conv_path="image"),
    "sparse": dict(conv_path="mixed", conv_sparse_max_density=1.01),
    "split": dict(conv_path="mixed", conv_sparse_max_density=0.5),
}


def cpu_policy(path: str):
    """A context that forces the cpu backend's conv path (see CPU_CONV_PATHS)."""
    from rtl_kernels.backends.cpu import policy

    return policy.use_policy(**CPU_CONV_PATHS[path])


@pytest.fixture(params=list(CPU_CONV_PATHS))
def cpu_conv_path(request):
    """Run the cpu backend's conv with each path forced (the reference backend ignores it)."""
    if request.param != "auto" and not HAS_CPU_EXT:
        pytest.skip("the cpu extension is not built")
    if request.param == "auto":
        yield request.param
        return
    with cpu_policy(request.param):
        yield request.param


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"b{c[0]}c{c[1]}o{c[2]}k{c[5][0]}x{c[5][1]}g{c[7]}")
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9])
def test_conv2d_matches_float64(backend, case, density, cpu_conv_path):
    if backend == "reference" and cpu_conv_path != "auto":
        pytest.skip("the path switch is the cpu backend's")
    batch, c, o, h, w, k, tickets, groups, geometry = case
    for route_kind in ("random", "empty_tickets", "one_ticket"):
        run_case(backend, batch, c, o, h, w, k, tickets, density, groups, route_kind=route_kind, seed=batch, **geometry)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the cpu extension is not built")
def test_conv2d_mixes_dense_and_sparse_tickets_in_one_call():
    # Sparse tickets take the direct kernel and dense ones torch's convolution, in the same call.
    from rtl_kernels.backends.cpu import trace

    densities = [0.05, 0.95, 0.3, 1.0, 0.0, 0.5]
    with cpu_policy("split"), trace.record_calls() as calls:
        for seed in range(3):
            run_case("cpu", 11, 4, 6, 9, 8, (3, 3), len(densities), densities, padding=1, seed=seed)
    assert calls and all(c["path"] == "mixed" for c in calls)
    assert any(c["sparse_tickets"] and c["dense_classes"] for c in calls), "no call took both paths"


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the cpu extension is not built")
@pytest.mark.parametrize("path", ["image", "sparse", "dense"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_pointwise_paths_match_float64(path, transposed):
    # 1x1 convs: one batched matrix product per image ("image"), the direct kernel, reading the images in place when
    # their planes are whole vectors (4x4) and packed otherwise ("sparse"), torch's convolution per class ("dense");
    # on mixed-density tickets (dense, sparse, empty), with plain and channels_last inputs.
    densities = [0.05, 0.95, 0.3, 1.0, 0.0]
    with cpu_policy(path):
        for seed, (h, w) in enumerate([(5, 4), (1, 1), (6, 7), (4, 4)]):
            run_case("cpu", 9, 6, 7, h, w, (1, 1), len(densities), densities, transposed=transposed, seed=seed)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(5, 6, 4, 4, generator=gen).to(memory_format=torch.channels_last)
        weight = torch.randn(6, 6, 1, 1, generator=gen)
        masks = torch.rand(3, 6, 6, 1, 1, generator=gen) < 0.4
        route = torch.tensor([2, 0, 2, 1, 0])
        op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
        with rk.set_backend("cpu"):
            y = op(x, weight, masks, route)
    ref, _ = oracle(x, weight, masks, route, None, transposed)
    torch.testing.assert_close(y.double(), ref, **TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_ticket_equals_masked_conv(backend):
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(5, 3, 3, 3, generator=gen)
    masks = torch.rand(1, 5, 3, 3, 3, generator=gen) < 0.5
    with rk.set_backend(backend):
        y = rk.routed_masked_conv2d(x, weight, masks, torch.zeros(4, dtype=torch.int64), padding=1)
    torch.testing.assert_close(y, F.conv2d(x, weight * masks[0], padding=1), rtol=1e-5, atol=1e-5)


TRANSPOSED_CASES = [  # the speech U-Net decoder's shapes in miniature: 3x3 and 3x5, stride (1, 2)
    (3, 6, 4, 5, 7, (3, 3), 3, 1, dict(stride=(1, 2), padding=1, output_padding=(0, 1))),
    (4, 4, 2, 6, 5, (3, 5), 3, 1, dict(stride=(1, 2), padding=(1, 2), output_padding=(0, 1))),
    (2, 4, 6, 5, 5, (3, 3), 2, 2, dict(stride=2, padding=1, dilation=1)),
    (3, 3, 3, 4, 6, (2, 2), 2, 1, dict(stride=2)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", TRANSPOSED_CASES, ids=lambda c: f"k{c[5][0]}x{c[5][1]}g{c[7]}")
def test_conv_transpose2d_matches_float64(backend, case, cpu_conv_path):
    if backend == "reference" and cpu_conv_path != "auto":
        pytest.skip("the path switch is the cpu backend's")
    batch, c, o, h, w, k, tickets, groups, geometry = case
    run_case(backend, batch, c, o, h, w, k, tickets, 0.4, groups, transposed=True, seed=7, **geometry)


def test_padding_same_and_valid():
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 2, 7, 6, generator=gen), torch.randn(4, 2, 4, 3, generator=gen)  # even kernel height
    masks = torch.rand(2, 4, 2, 4, 3, generator=gen) < 0.6
    route = torch.tensor([1, 0, 1])
    for padding in ("same", "valid"):
        y = rk.routed_masked_conv2d(x, weight, masks, route, padding=padding, dilation=(1, 2))
        ref = torch.cat(
            [F.conv2d(x[i : i + 1], weight * masks[route[i]], padding=padding, dilation=(1, 2)) for i in range(3)]
        )
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_input(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 9, 9, generator=gen).to(memory_format=torch.channels_last)
    weight, masks = torch.randn(5, 3, 3, 3, generator=gen), torch.rand(2, 5, 3, 3, 3, generator=gen) < 0.5
    route = torch.tensor([0, 1, 1, 0])
    with rk.set_backend(backend):
        y = rk.routed_masked_conv2d(x, weight, masks, route, padding=1)
        y_ref = rk.routed_masked_conv2d(x.contiguous(), weight, masks, route, padding=1)
    torch.testing.assert_close(y, y_ref)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    m = torch.rand(2, 6, 2, 3, 3, generator=gen) < 0.5
    mt = torch.rand(2, 4, 3, 3, 3, generator=gen) < 0.5
    r = torch.tensor([1, 0, 1])
    with rk.set_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: rk.routed_masked_conv2d(a, ww, m, r, bb, stride=(2, 1), padding=1, groups=2), (x, w, b)
        )
        assert torch.autograd.gradcheck(
            lambda a, ww, bb: rk.routed_masked_conv_transpose2d(
                a, ww, mt, r, bb, stride=(1, 2), padding=1, output_padding=(0, 1), groups=2
            ),
            (x, wt, b),
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 6, 5, generator=gen, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=gen, requires_grad=True)
    wt = torch.randn(4, 3, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    m, mt = torch.rand(2, 6, 4, 3, 3, generator=gen) < 0.5, torch.rand(2, 4, 3, 3, 3, generator=gen) < 0.5
    r = torch.tensor([1, 0, 1])
    with rk.set_backend(backend):
        torch.library.opcheck(torch.ops.rtl_kernels.routed_masked_conv2d, (x, w, m, r, b, [1, 2], [1, 1], [1, 1], 1))
        torch.library.opcheck(
            torch.ops.rtl_kernels.routed_masked_conv_transpose2d, (x, wt, mt, r, b[:3], [2, 1], [1, 0], [1, 0], 1)
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    w = torch.randn(5, 3, 3, 3, generator=gen, requires_grad=True)
    m = torch.rand(3, 5, 3, 3, 3, generator=gen) < 0.4
    r = torch.tensor([2, 0, 1, 2])

    def step(x_, w_):
        return rk.routed_masked_conv2d(torch.relu(x_), w_, m, r, padding=1).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with rk.set_backend(backend):
        loss, loss_ref = compiled(x, w), step(x, w)
        (dw,), (dw_ref,) = torch.autograd.grad(loss, (w,)), torch.autograd.grad(loss_ref, (w,))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    with rk.set_backend(backend):
        y = rk.routed_masked_conv2d(
            torch.randn(0, 3, 5, 5),
            torch.randn(4, 3, 3, 3),
            torch.ones(2, 4, 3, 3, 3, dtype=torch.bool),
            torch.zeros(0, dtype=torch.int64),
        )
    assert y.shape == (0, 4, 3, 3)


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
def test_conv2d_bad_input(change, error, match):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=match):
        rk.routed_masked_conv2d(**args)


def test_conv_transpose2d_bad_input():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3)
    m, r = torch.ones(2, 4, 3, 3, 3, dtype=torch.bool), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="output_padding"):
        rk.routed_masked_conv_transpose2d(x, w, m, r, stride=1, output_padding=1)
    with pytest.raises(ValueError, match="x has 3 channels but the transposed weight"):
        rk.routed_masked_conv_transpose2d(torch.randn(2, 3, 5, 5), w, m, r)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")
def test_conv_layout_is_cached_and_follows_mask_edits():
    args = _good()
    with rk.set_backend("cpu"), cpu_policy("sparse"):
        before = rk.layout_cache_stats()["compiles"]
        y1 = rk.routed_masked_conv2d(**args, padding=1)
        compiles = rk.layout_cache_stats()["compiles"]
        assert compiles > before
        rk.routed_masked_conv2d(**args, padding=1)
        assert rk.layout_cache_stats()["compiles"] == compiles
        # a new pattern at the same density: every ticket keeps its path, so the same layouts compile again
        args["masks"][1].copy_(args["masks"][1].flip(0).clone())
        y2 = rk.routed_masked_conv2d(**args, padding=1)
        assert rk.layout_cache_stats()["compiles"] == compiles + (compiles - before)
    ref, _ = oracle(args["x"], args["weight"], args["masks"], args["route"], None, padding=1)
    torch.testing.assert_close(y2.double(), ref, **TOL)
    assert not torch.allclose(y1, y2)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")
def test_per_image_weight_path_follows_mask_and_weight_edits():
    args = _good()
    with rk.set_backend("cpu"):
        rk.routed_masked_conv2d(**args, padding=1)
        args["masks"][0, :2].logical_not_()
        with torch.no_grad():
            args["weight"].mul_(3)
        y = rk.routed_masked_conv2d(**args, padding=1)
    ref, _ = oracle(args["x"], args["weight"], args["masks"], args["route"], None, padding=1)
    torch.testing.assert_close(y.double(), ref, **TOL)
