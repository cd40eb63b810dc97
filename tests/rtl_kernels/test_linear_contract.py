"""The contract of routed_masked_linear, checked once per backend target of the registry.

Targets (tests/rtl_kernels/conftest.py): the reference and cpu backends on CPU tensors, triton under its interpreter
on CPU and compiled on a GPU, cuda on a GPU (``gpu``). Results are compared with an independent float64 oracle on
fresh random inputs: float32 close to float64, float16/bfloat16 within twice the error of torch's own computation in
that dtype. Backend-specific details live in test_cpu_backend.py, test_triton_backend.py and test_cuda_backend.py.
"""

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels as rk
from rtl_kernels.backends import get_backend_module

# (B, N, K, T): odd sizes (not multiples of 16), B = 1, K = 1, T = 1, several 64-row tiles and 64-blocks with partial
# edges, rows of 16-byte multiples (the vector-load paths), T > 32 (several rounds of a tile search).
SHAPES = [
    (37, 19, 23, 3),
    (1, 5, 7, 2),
    (1, 19, 23, 3),
    (50, 13, 1, 4),
    (131, 33, 70, 1),
    (37, 19, 23, 1),
    (203, 17, 45, 5),
    (29, 21, 17, 5),
    (33, 19, 23, 4),
    (150, 70, 90, 2),
    (130, 70, 150, 4),
    (300, 129, 257, 5),
    (200, 72, 128, 3),
    (75, 40, 24, 40),
]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]
# (routing, bias) of each run of a case: random, skewed and partly empty tickets, every row on one ticket.
RUNS = (("random", True), ("random", False), ("skewed", True), ("empty_tickets", True), ("one_ticket", True))


def _case_id(shape, density):
    return "B{}_N{}_K{}_T{}".format(*shape) + f"-d{density}"


SWEEP = {_case_id(s, d): (*s, d, RUNS) for s in SHAPES for d in DENSITIES}
SWEEP[_case_id((61, 130, 150, 3), "blocks")] = (61, 130, 150, 3, "blocks", RUNS)
# The interpreter runs each case once: every density on odd shapes, one row, empty tickets, one ticket, several
# blocks, block-structured masks.
INTERPRETED_SWEEP = {_case_id((37, 19, 23, 3), d): (37, 19, 23, 3, d, (("random", True),)) for d in DENSITIES}
INTERPRETED_SWEEP.update(
    {
        "single_row": (1, 19, 23, 3, 0.5, (("random", True),)),
        "tickets_without_rows": (29, 21, 17, 5, 0.5, (("empty_tickets", True),)),
        "all_rows_one_ticket": (33, 19, 23, 4, 0.5, (("one_ticket", False),)),
        "multi_block": (150, 70, 90, 2, 0.5, (("random", True),)),
        "block_structured": (61, 130, 150, 3, "blocks", (("random", True),)),
    }
)

# The low-precision sweep: the GPU kernels' tile edges (B = 1, T = 1, partial 64-blocks, aligned rows, T > 32).
LOW_SHAPES = [
    (37, 19, 23, 3),
    (1, 19, 23, 3),
    (37, 19, 23, 1),
    (130, 70, 150, 4),
    (300, 129, 257, 5),
    (200, 72, 128, 3),
]
LOW_SHAPES += [(75, 40, 24, 40), (150, 70, 90, 2)]
LOW_SWEEP = {
    _case_id(s, d): (*s, d, (("random", True), ("empty_tickets", True))) for s in LOW_SHAPES for d in DENSITIES
}
LOW_SWEEP["block_structured"] = (61, 130, 150, 3, "blocks", (("random", True),))
LOW_INTERPRETED = {
    "odd_shapes": (37, 19, 23, 3, 0.5, (("random", True),)),
    "multi_block": (150, 70, 90, 2, 0.5, (("random", True),)),
    "block_structured": (61, 130, 150, 3, "blocks", (("random", True),)),
}


def run_op(target, x, weight, masks, route, bias, grad_y, dtype=torch.float32):
    """(y, dx, dweight, dbias) of the op on ``target`` in ``dtype``, gradients of (y * grad_y).sum() by autograd."""
    x, weight, bias, masks, route, grad_y = target.put(x, weight, bias, masks, route, grad_y, dtype=dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    with target.selected():
        y = rk.routed_masked_linear(leaves[0], leaves[1], masks, route, leaves[2])
        y.backward(grad_y)
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def _grad_y(batch, n, seed):
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


NAMES = ("y", "dx", "dweight", "dbias")


# -- values and gradients -------------------------------------------------------------------------------------------


@pytest.mark.contract(cases=SWEEP, interpreted_cases=INTERPRETED_SWEEP)
def test_forward_and_gradients_match_float64(
    target, case, seed, linear_case, linear_oracle, check_float64, zero_outside
):
    batch, n, k, tickets, density, runs = case
    for i, (routing, bias) in enumerate(runs):
        x, w, masks, route, b = linear_case(batch, n, k, tickets, density, seed + i, routing=routing, bias=bias)
        grad_y = _grad_y(batch, n, seed + i)
        got = run_op(target, x, w, masks, route, b, grad_y)
        exact = linear_oracle(x, w, masks, route, b, grad_y)
        for name, g, e in zip(NAMES, got, exact):
            assert g is None or (g.dtype == torch.float32 and g.device.type == target.device), name
            check_float64(g, e, f"{routing}, bias={bias}: {name}")
        dw, outside = got[2].cpu(), zero_outside(masks, route)
        assert torch.equal(dw[outside], torch.zeros_like(dw[outside])), "dW must be exactly zero outside the masks"


@pytest.mark.contract()
def test_mixed_sparse_and_dense_tickets_in_one_batch(target, seed, linear_case, linear_oracle, check_float64):
    x, w, masks, route, b = linear_case(300, 40, 57, 4, [0.05, 0.5, 0.95, 1.0], seed)
    grad_y = _grad_y(300, 40, seed)
    got = run_op(target, x, w, masks, route, b, grad_y)
    for name, g, e in zip(NAMES, got, linear_oracle(x, w, masks, route, b, grad_y)):
        check_float64(g, e, name)


@pytest.mark.contract(dtypes="all")
def test_single_ticket_equals_masked_dense_linear(target, dtype, seed, linear_case, check_float64):
    """With one ticket the op is F.linear with the masked weight: compared with it in float64 (and in dtype)."""
    for density in (0.3, 0.9):
        for bias in (True, False):
            x, w, masks, route, b = linear_case(45, 27, 31, 1, density, seed, routing="one_ticket", bias=bias)
            x, w, masks, route, b = target.put(x, w, masks, route, b, dtype=dtype)
            with target.selected():
                y = rk.routed_masked_linear(x, w, masks, route, b)
            wm = torch.where(masks[0], w, torch.zeros((), dtype=dtype, device=w.device))
            exact = F.linear(x.double(), wm.double(), None if b is None else b.double()).cpu()
            check_float64(y, exact, f"density {density}, bias={bias}", torch_low=F.linear(x, wm, b))


DETERMINISM = {"B300_N30_K50_T5": (300, 30, 50, 5, 0.2), "split": (9000, 70, 66, 3, 0.5)}


@pytest.mark.contract(
    dtypes="all", cases=DETERMINISM, interpreted_cases={"B300_N30_K50_T5": DETERMINISM["B300_N30_K50_T5"]}
)
def test_gradients_are_bitwise_deterministic(
    target, dtype, case, seed, linear_case, linear_oracle, check_float64, zero_outside
):
    """Two runs give the same bits (no atomics); "split" has rows enough for a kernel to split dW over blocks."""
    batch, n, k, tickets, density = case
    x, w, masks, route, b = linear_case(batch, n, k, tickets, density, seed)
    grad_y = _grad_y(batch, n, seed)
    first = run_op(target, x, w, masks, route, b, grad_y, dtype)
    second = run_op(target, x, w, masks, route, b, grad_y, dtype)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"
    exact = linear_oracle(x, w, masks, route, b, grad_y)
    theirs = run_op(target.as_reference(), x, w, masks, route, b, grad_y, dtype)
    check_float64(first[2], exact.dweight, "dweight", torch_low=theirs[2])
    outside = zero_outside(masks, route)
    assert bool((first[2].cpu()[outside] == 0).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
@pytest.mark.contract(dtypes="all")
def test_weight_gradient_is_exactly_zero_outside_present_masks_even_for_nonfinite_gradients(
    target, dtype, seed, linear_case, zero_outside
):
    """Tickets 0 and 2 get no rows but keep every weight: their masks must open no weight, even when the gradient
    holds NaN and inf; NaNs land in the same places on a second run."""
    x, w, masks, _, b = linear_case(40, 70, 90, 4, 0.3, seed)
    route = torch.tensor([1, 3])[torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(seed))]
    masks[0] = True
    masks[2] = True
    grad_y = _grad_y(40, 70, seed)
    grad_y[0, :5] = float("nan")
    grad_y[1, 5:9] = float("inf")
    dw = run_op(target, x, w, masks, route, b, grad_y, dtype)[2].cpu()
    outside = zero_outside(masks, route)
    assert outside.any()
    assert torch.equal(dw[outside], torch.zeros_like(dw[outside]))
    again = run_op(target, x, w, masks, route, b, grad_y, dtype)[2].cpu()
    assert torch.equal(dw.nan_to_num(), again.nan_to_num()) and torch.equal(dw.isnan(), again.isnan())


@pytest.mark.contract(dtypes="low", cases=LOW_SWEEP, interpreted_cases=LOW_INTERPRETED)
def test_low_precision_error_at_most_twice_torchs(
    target, dtype, case, seed, linear_case, linear_oracle, check_float64, zero_outside
):
    batch, n, k, tickets, density, runs = case
    for i, (routing, bias) in enumerate(runs):
        x, w, masks, route, b = linear_case(batch, n, k, tickets, density, seed + i, routing=routing, bias=bias)
        grad_y = _grad_y(batch, n, seed + i)
        exact = linear_oracle(x, w, masks, route, b, grad_y)
        ours = run_op(target, x, w, masks, route, b, grad_y, dtype)
        # The same computation done by torch in that dtype: the reference backend on the rounded inputs.
        theirs = run_op(target.as_reference(), x, w, masks, route, b, grad_y, dtype)
        for name, o, t, e in zip(NAMES, ours, theirs, exact):
            assert o is None or o.dtype == dtype, name
            check_float64(o, e, f"{routing}: {name}", torch_low=t)
        assert bool((ours[2].cpu()[zero_outside(masks, route)] == 0).all())


@pytest.mark.contract()
def test_gradcheck_in_float64(target, seed, linear_case):
    reason = get_backend_module(target.backend).unavailable_reason(torch.device(target.device), torch.float64)
    if reason is not None:
        pytest.skip(f"{target.backend} does not compute in float64: {reason}")
    x, w, masks, route, b = linear_case(9, 5, 6, 3, 0.5, seed, dtype=torch.float64)
    x, w, masks, route, b = target.put(x, w, masks, route, b)
    args = [t.requires_grad_() for t in (x, w, b)]
    with target.selected():
        assert torch.autograd.gradcheck(lambda x_, w_, b_: rk.routed_masked_linear(x_, w_, masks, route, b_), args)


# -- edge cases -----------------------------------------------------------------------------------------------------


@pytest.mark.contract()
def test_empty_batch_gives_empty_output_and_zero_weight_gradient(target, linear_case):
    x, w, masks, route, b = target.put(*linear_case(0, 6, 4, 2, 0.5))
    x.requires_grad_()
    w.requires_grad_()
    with target.selected():
        y = rk.routed_masked_linear(x, w, masks, route, b)
        assert y.shape == (0, 6)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 4) and torch.equal(dw.cpu(), torch.zeros(6, 4))


@pytest.mark.contract()
def test_fully_pruned_ticket_outputs_the_bias_and_passes_no_gradient(
    target, seed, linear_case, linear_oracle, check_float64
):
    x, w, masks, route, b = linear_case(30, 19, 23, 3, 0.5, seed)
    route[:3] = 1
    masks[1] = False
    grad_y = _grad_y(30, 19, seed)
    y, dx, dw, db = run_op(target, x, w, masks, route, b, grad_y)
    rows = route == 1
    assert torch.equal(y.cpu()[rows], b.expand(int(rows.sum()), 19)), "a ticket that keeps nothing outputs the bias"
    assert torch.equal(dx.cpu()[rows], torch.zeros(int(rows.sum()), 23))
    for name, g, e in zip(NAMES, (y, dx, dw, db), linear_oracle(x, w, masks, route, b, grad_y)):
        check_float64(g, e, name)


@pytest.mark.contract()
def test_nonfinite_input_reaches_only_its_own_row(target, seed, linear_case):
    """NaN/inf reach the outputs whose kept weights touch them and never another row. Through a weight the ticket
    prunes it depends on the path (a dense masked GEMM makes inf * 0 = NaN; sparse kernels never multiply pruned
    weights), as documented in routed_masked_linear, so only kept weights are asserted."""
    for density in (0.3, 1.0):
        x, w, masks, route, b = linear_case(16, 5, 6, 2, density, seed)
        masks[:, 0, 2] = True
        x[4, 2] = float("nan")
        x[5, 2] = float("inf")
        x, w, masks, route, b = target.put(x, w, masks, route, b)
        with target.selected():
            y = rk.routed_masked_linear(x, w, masks, route, b).cpu()
        assert torch.isnan(y[4, 0]) and not torch.isfinite(y[5, 0])
        others = (torch.arange(16) != 4) & (torch.arange(16) != 5)
        assert torch.isfinite(y[others]).all()


@pytest.mark.contract()
def test_in_place_mask_and_weight_edits_are_seen(target, seed, linear_case, linear_oracle, check_float64):
    """A mask edited in place compiles its layouts again (as many as the first call did; none twice for an unchanged
    mask); a weight edited in place is read at once (layouts index the weight, never copy it)."""
    x, w, masks, route, b = target.put(*linear_case(40, 10, 12, 2, 0.3, seed))

    def compiles():
        return rk.layout_cache_stats()["compiles"]

    with target.selected():
        before = compiles()
        y1 = rk.routed_masked_linear(x, w, masks, route, b)
        first = compiles() - before
        assert target.backend == "reference" or first > 0, "the backend compiled no layout"
        rk.routed_masked_linear(x, w, masks, route, b)
        assert compiles() == before + first, "an unchanged mask must hit the cache"
        masks[0, 3, :] = ~masks[0, 3, :]
        masks[1].logical_not_()
        y2 = rk.routed_masked_linear(x, w, masks, route, b)
        assert compiles() == before + 2 * first
        with torch.no_grad():
            w.mul_(2)
        y3 = rk.routed_masked_linear(x, w, masks, route, b)
    check_float64(y2, linear_oracle(x, w / 2, masks, route, b).y, "y after the mask edit")
    check_float64(y3, linear_oracle(x, w, masks, route, b).y, "y after the weight edit")
    assert not torch.allclose(y1, y2)


# -- registration with torch ----------------------------------------------------------------------------------------


@pytest.mark.contract()
def test_opcheck(target, seed, linear_case):
    x, w, masks, route, b = target.put(*linear_case(20, 7, 9, 3, 0.4, seed))
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    g = rk.group_by_ticket(route, 3)
    ops = torch.ops.rtl_kernels
    with target.selected():
        torch.library.opcheck(ops.routed_masked_linear, (x, w, masks, route, b))
        torch.library.opcheck(ops.routed_masked_linear, (x, w, masks, route, None))
        torch.library.opcheck(ops.routed_masked_linear, (x, w, masks, route, b, g.perm, g.offsets))
        gy = torch.randn(20, 7, device=x.device)
        torch.library.opcheck(ops.routed_masked_linear_grad_input, (gy, w.detach(), masks, route, g.perm, g.offsets))
        torch.library.opcheck(ops.routed_masked_linear_grad_weight, (gy, x.detach(), masks, route, g.perm, g.offsets))
    torch.library.opcheck(ops.group_by_ticket, (route, 3))


@pytest.mark.contract()
def test_torch_compile_fullgraph_matches_eager(target, seed, linear_case):
    x, w, masks, route, b = target.put(*linear_case(33, 11, 14, 3, 0.3, seed))
    w.requires_grad_()

    def step(x_, w_, b_):
        y = rk.routed_masked_linear(torch.relu(x_), w_, masks, route, b_)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if target.backend == "reference" else "inductor")
    with target.selected():
        loss = compiled(x, w, b)
        (dw,) = torch.autograd.grad(loss, (w,))
        loss_ref = step(x, w, b)
        (dw_ref,) = torch.autograd.grad(loss_ref, (w,))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


# -- GPU: no host synchronisation -----------------------------------------------------------------------------------

# The backend methods each GPU backend promises to run without a host sync, so that they capture in a CUDA graph.
GRAPH_CAPTURED = {"triton": ("forward", "grad_input", "grad_weight"), "cuda": ("forward",)}


@pytest.mark.contract(dtypes=(torch.float32, torch.bfloat16), targets=lambda t: t.device == "cuda")
def test_kernels_capture_in_a_cuda_graph_and_replay_a_new_routing(
    target, dtype, seed, linear_case, linear_oracle, check_float64
):
    """Captured once, replayed with new inputs and a new routing written into perm/offsets: this only works when
    the kernels find tickets and row ranges on the device."""
    batch, n, k, tickets = 300, 200, 150, 5
    x0, w0, masks0, route0, b0 = linear_case(batch, n, k, tickets, 0.5, seed)
    x, w, masks, b, grad_y = target.put(x0, w0, masks0, b0, _grad_y(batch, n, seed), dtype=dtype)
    grouping = rk.group_by_ticket(route0.cuda(), tickets)
    perm, offsets = grouping.perm.clone(), grouping.offsets.clone()
    backend = get_backend_module(target.backend)
    methods = {
        "forward": lambda: backend.linear_forward(x, w, masks, b, perm, offsets),
        "grad_input": lambda: backend.linear_grad_input(grad_y, w, masks, perm, offsets),
        "grad_weight": lambda: backend.linear_grad_weight(grad_y, x, masks, perm, offsets),
    }
    captured = GRAPH_CAPTURED[target.backend]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels and layouts outside the capture
        for name in captured:
            methods[name]()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # any host synchronisation inside would make the capture fail
        outputs = {name: methods[name]() for name in captured}
    for replay in (1, 2):
        x1, _, _, route1, _ = linear_case(batch, n, k, tickets, 0.5, seed + replay)
        route1 = (route1**2 + replay) % tickets  # a different count per ticket, one ticket without rows
        gy1 = _grad_y(batch, n, seed + replay)
        new = rk.group_by_ticket(route1.cuda(), tickets)
        x.copy_(x1)
        grad_y.copy_(gy1)
        perm.copy_(new.perm)
        offsets.copy_(new.offsets)
        graph.replay()
        torch.cuda.synchronize()
        exact = linear_oracle(x1, w0, masks0, route1, b0, gy1)
        theirs = run_op(target.as_reference(), x1, w0, masks0, route1, b0, gy1, dtype)
        index = {"forward": 0, "grad_input": 1, "grad_weight": 2}
        for name in captured:
            i = index[name]
            check_float64(outputs[name], exact[i], f"replay {replay}: {name}", torch_low=theirs[i])


# -- argument checks (before any backend runs) ----------------------------------------------------------------------


def _good(linear_case):
    x, w, masks, route, b = linear_case(6, 4, 5, 3, 0.5, 41)
    return dict(x=x, weight=w, masks=masks, route=route, bias=b)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(route=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, r"ticket id 3, outside \[0, 3\)"),
        (lambda a: a.update(route=torch.tensor([0, -1, 2, 1, 0, 1])), ValueError, r"ticket id -1"),
        (lambda a: a.update(route=torch.zeros(6)), TypeError, r"route must be an integer tensor"),
        (lambda a: a.update(route=torch.zeros(5, dtype=torch.int64)), ValueError, r"route has 5 entries but x has 6"),
        (lambda a: a.update(masks=a["masks"].float()), TypeError, r"masks must be a bool tensor"),
        (lambda a: a.update(masks=a["masks"][:, :3]), ValueError, r"masks must have shape \(T, 4, 5\)"),
        (lambda a: a.update(masks=a["masks"][0]), ValueError, r"masks must have shape"),
        (lambda a: a.update(x=torch.randn(6, 7)), ValueError, r"x has 7 features but weight expects in_features = 5"),
        (lambda a: a.update(x=torch.randn(6, 5, 1)), ValueError, r"x must be 2-D"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, r"bias must have shape \(4,\)"),
        (lambda a: a.update(x=a["x"].double()), TypeError, r"weight dtype torch.float32 differs from x dtype"),
        (lambda a: a.update(x=a["x"].to(torch.int64)), TypeError, r"x must be a floating-point tensor"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, r"one device"),
        (lambda a: a.update(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_input_names_argument_and_value(linear_case, mutate, error, match):
    args = _good(linear_case)
    mutate(args)
    with pytest.raises(error, match=match):
        rk.routed_masked_linear(**args)


def test_sweeps_are_not_vacuous():
    """The sweeps cover every density, B = 1, K = 1, T = 1, T > 32 and sizes not multiples of 16 on every target
    (guards edits of the lists)."""
    for sweep in (SWEEP, INTERPRETED_SWEEP):
        densities = {case[4] for case in sweep.values()}
        assert set(DENSITIES) <= densities and "blocks" in densities
    assert any(s[0] == 1 for s in SHAPES) and any(s[2] == 1 for s in SHAPES) and any(s[3] == 1 for s in SHAPES)
    assert any(s[3] > 32 for s in SHAPES) and all(s[1] % 16 for s in SHAPES)
    assert {r for r, _ in RUNS} == {"random", "skewed", "empty_tickets", "one_ticket"}
