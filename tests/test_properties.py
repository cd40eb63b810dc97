"""Property-based tests (hypothesis): the routed ops against a float64 oracle over drawn shapes, geometries,
densities, routes, strides and dtypes on every backend that runs here, forward and gradients; and the method
layer's invariants (masked optimizer steps, pruning, save/load).

Example counts are fixed and the search derandomised, so `make test` runs the same examples every time in bounded
time; RTL_HYPOTHESIS_EXAMPLES=N scales every count by N / 100 for a longer local search.
"""

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rtl  # noqa: E402
import rtl_kernels as rk  # noqa: E402
from rtl_kernels import _extension  # noqa: E402

HAS_CPU_EXT = _extension.load("_C")[0] is not None
BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
# Triton runs here under its interpreter (tests/conftest.py sets TRITON_INTERPRET on machines without a GPU): fewer
# examples, as each call is interpreted.
HAS_TRITON = "triton" in rk.available_backends("cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable here")
_SCALE = int(os.environ.get("RTL_HYPOTHESIS_EXAMPLES", "100")) / 100


def _settings(examples):
    return settings(
        max_examples=max(1, int(examples * _SCALE)),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- drawn inputs ------------------------------------------------------------------------------------------------


@st.composite
def routes(draw, batch, tickets):
    kind = draw(st.sampled_from(["random", "skewed", "one", "empty_tickets"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "random" or batch == 0:
        return torch.randint(0, tickets, (batch,), generator=g)
    if kind == "one":
        return torch.full((batch,), draw(st.integers(0, tickets - 1)), dtype=torch.int64)
    if kind == "skewed":
        r = torch.zeros(batch, dtype=torch.int64)
        r[:: max(1, batch // 3)] = tickets - 1
        return r
    used = torch.arange(0, tickets, 2)
    return used[torch.randint(0, used.numel(), (batch,), generator=g)]


@st.composite
def masks_for(draw, tickets, shape):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    style = draw(st.sampled_from(["per_ticket", "shared", "extremes", "overlapping"]))
    if style == "per_ticket":
        density = torch.tensor([draw(st.sampled_from([0.0, 0.03, 0.1, 0.5, 0.9, 1.0])) for _ in range(tickets)])
        return torch.rand((tickets,) + shape, generator=g) < density.view(-1, *([1] * len(shape)))
    if style == "shared":
        return (torch.rand(shape, generator=g) < 0.4).expand((tickets,) + shape).clone()
    if style == "extremes":  # empty and full tickets side by side
        return (torch.arange(tickets) % 2 == 0).view(-1, *([1] * len(shape))).expand((tickets,) + shape).clone()
    base = torch.rand(shape, generator=g) < 0.2  # tickets that share most of their kept weights, as RTL's do
    return base | (torch.rand((tickets,) + shape, generator=g) < 0.05)


def _maybe_strided(t, strided):
    if not strided:
        return t
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _close(got, want, scale_of, tol):
    scale = float(scale_of.detach().abs().max()) if scale_of.numel() else 1.0
    assert got.shape == want.shape
    err = float((got.detach().double() - want.detach()).abs().max()) if got.numel() else 0.0
    assert err <= tol * max(scale, 1.0), (err, scale)


# -- linear ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(150)
@given(data=st.data())
def test_linear_forward_and_gradients_match_float64(backend, data):
    _linear_case(backend, data)


@needs_triton
@_settings(25)
@given(data=st.data())
def test_linear_on_triton_matches_float64(data):
    _linear_case("triton", data)


def _linear_case(backend, data):
    batch = data.draw(st.integers(0, 40), label="B")
    n, k = data.draw(st.integers(1, 24), label="N"), data.draw(st.integers(1, 24), label="K")
    tickets = data.draw(st.sampled_from([1, 2, 3, 7, 16, 64]), label="T")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64] if backend == "reference" else [torch.float32]))
    strided = data.draw(st.booleans(), label="strided")
    use_bias = data.draw(st.booleans(), label="bias")
    masks = data.draw(masks_for(tickets, (n, k)), label="masks")
    route = data.draw(routes(batch, tickets), label="route")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64) if use_bias else None
    gy = torch.randn(batch, n, generator=g, dtype=torch.float64)

    xs = _maybe_strided(x.to(dtype), strided).requires_grad_()
    ws = _maybe_strided(w.to(dtype), strided).requires_grad_()
    bs = None if b is None else _maybe_strided(b.to(dtype), strided).requires_grad_()
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(xs, ws, masks, route, bs)
        y.backward(gy.to(dtype))

    m = masks[route].double()  # (B, N, K): each row's own masked weight
    want_y = torch.einsum("bk,bnk->bn", x, w[None] * m) + (b if b is not None else 0)
    want_dx = torch.einsum("bn,bnk->bk", gy, w[None] * m)
    want_dw = torch.einsum("bn,bk,bnk->nk", gy, x, m)
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # of the sum of the terms' magnitudes
    _close(y, want_y, x.abs().sum(1).max() * w.abs().max() if batch else x, tol)
    _close(xs.grad, want_dx, gy.abs().sum(1).max() * w.abs().max() if batch else gy, tol)
    _close(ws.grad, want_dw, (gy.abs().T @ x.abs()) if batch else w, tol)
    present = masks[route.unique()].any(0) if batch else torch.zeros(n, k, dtype=torch.bool)
    assert bool((ws.grad[~present] == 0).all())  # nothing written outside the present tickets' masks
    if bs is not None:
        _close(bs.grad, gy.sum(0), gy.abs().sum(0), tol)


# -- conv2d and transposed conv ----------------------------------------------------------------------------------


@st.composite
def conv_geometry(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    c = groups * (1 if depthwise else draw(st.integers(1, 3)))
    o = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    return dict(c=c, o=o, k=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups, h=h, w=w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@_settings(100)
@given(data=st.data())
def test_conv_forward_and_gradients_match_float64(backend, transposed, data):
    _conv_case(backend, transposed, data)


@needs_triton
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@_settings(15)
@given(data=st.data())
def test_conv_on_triton_matches_float64(transposed, data):
    _conv_case("triton", transposed, data)


def _conv_case(backend, transposed, data):
    geo = data.draw(conv_geometry(), label="geometry")
    batch = data.draw(st.integers(0, 6), label="B")
    tickets = data.draw(st.sampled_from([1, 2, 3, 9]), label="T")
    channels_last = data.draw(st.booleans(), label="channels_last")
    c, o, groups = geo["c"], geo["o"], geo["groups"]
    if transposed:  # the output (H - 1) * s - 2 p + d (k - 1) + 1 must be at least 1 (the ops refuse it otherwise)
        for size, s_, p_, d_, k_ in zip((geo["h"], geo["w"]), geo["stride"], geo["padding"], geo["dilation"], geo["k"]):
            assume((size - 1) * s_ - 2 * p_ + d_ * (k_ - 1) + 1 >= 1)
    # conv weight (O, C/g, kh, kw); the transposed conv's weight is (C_in, C_out/g, kh, kw) with C_in = c here
    wshape = (c, o // groups) + geo["k"] if transposed else (o, c // groups) + geo["k"]
    masks = data.draw(masks_for(tickets, wshape), label="masks")
    route = data.draw(routes(batch, tickets), label="route")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, c, geo["h"], geo["w"], generator=g, dtype=torch.float64)
    w = torch.randn(wshape, generator=g, dtype=torch.float64)
    out_c = o
    b = torch.randn(out_c, generator=g, dtype=torch.float64)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=groups)

    def oracle(xx, ww):
        ys = []
        for i in range(batch):
            wm = ww * masks[route[i]].double()
            f = F.conv_transpose2d if transposed else F.conv2d
            ys.append(f(xx[i : i + 1], wm, b, **kw))
        return torch.cat(ys) if ys else None

    want = oracle(x, w)
    if batch and want.numel() == 0:
        return
    xs = x.float()
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    xs.requires_grad_()
    ws = w.float().requires_grad_()
    op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
    with rk.set_backend(backend):
        y = op(xs, ws, masks, route, b.float(), **kw)
        if batch == 0:
            assert y.shape[0] == 0
            return
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(gy.float())
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    oracle(xr, wr).backward(gy)
    taps = (c // groups if not transposed else o // groups) * geo["k"][0] * geo["k"][1]
    _close(y, want, x.abs().max() * w.abs().max() * taps + b.abs().max(), 1e-5)
    _close(xs.grad, xr.grad, gy.abs().max() * w.abs().max() * (o + c) * taps, 1e-5)
    _close(ws.grad, wr.grad, gy.abs().max() * x.abs().max() * batch * geo["h"] * geo["w"], 1e-5)
    present = masks[route.unique()].any(0)
    assert bool((ws.grad[~present] == 0).all())


# -- the method layer --------------------------------------------------------------------------------------------


def _small_model(tickets, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 6)
    )
    return rtl.convert_(model, tickets)


@_settings(25)
@given(
    tickets=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    optimizer=st.sampled_from(["sgd", "adam", "adamw"]),
    steps=st.integers(1, 3),
    density=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_weights_outside_the_active_masks_never_move(tickets, seed, optimizer, steps, density):
    model = _small_model(tickets, seed)
    g = torch.Generator().manual_seed(seed)
    for _, m in rtl.nn.routed_modules(model):
        m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < density)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.05),
    }
    opt = rtl.optim.TicketMaskedOptimizer(make[optimizer](model.parameters()), model)
    for _ in range(steps):
        route = torch.randint(0, tickets, (4,), generator=g)
        before = {n: m.weight.detach().clone() for n, m in rtl.nn.routed_modules(model)}
        with rtl.use_route(model, route):
            loss = model(torch.randn(4, 3, 5, 5, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for name, m in rtl.nn.routed_modules(model):
            active = m.weight_masks[route.unique()].any(0)
            assert torch.equal(m.weight.detach()[~active], before[name][~active]), name


@_settings(25)
@given(
    tickets=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    amount=st.sampled_from([0.1, 0.3, 0.7, 5, 40]),
    scope=st.sampled_from(["global", "layer"]),
    granularity=st.sampled_from(["unstructured", ("block", 2, 3), ("vector", 4), "channel"]),
)
def test_pruning_only_shrinks_masks(tickets, seed, amount, scope, granularity):
    model = _small_model(tickets, seed)
    for _ in range(2):
        before = {n: m.weight_masks.clone() for n, m in rtl.nn.routed_modules(model)}
        rtl.prune.magnitude_prune_(model, amount, scope=scope, granularity=granularity)
        for name, m in rtl.nn.routed_modules(model):
            assert not bool((m.weight_masks & ~before[name]).any()), name  # no pruned weight comes back


@_settings(15)
@given(tickets=st.integers(1, 6), seed=st.integers(0, 10_000), density=st.sampled_from([0.0, 0.2, 1.0]))
def test_masks_and_state_round_trip_through_files(tickets, seed, density, tmp_path_factory):
    model = _small_model(tickets, seed)
    g = torch.Generator().manual_seed(seed)
    for _, m in rtl.nn.routed_modules(model):
        m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < density)
    path = tmp_path_factory.mktemp("masks") / "masks.pt"
    rtl.save_masks(model, path)
    other = _small_model(tickets, seed + 1)
    rtl.load_masks_(other, path)
    for (name, a), (_, b) in zip(rtl.nn.routed_modules(model), rtl.nn.routed_modules(other)):
        assert torch.equal(a.weight_masks, b.weight_masks), name
    state = model.state_dict()
    fresh = _small_model(tickets, seed + 2)
    fresh.load_state_dict(state)
    x, route = torch.randn(3, 3, 5, 5, generator=g), torch.randint(0, tickets, (3,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(rtl.RoutedModel(fresh)(x, route), rtl.RoutedModel(model)(x, route), rtol=0, atol=0)
