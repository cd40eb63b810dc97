"""routed_masked_linear on the reference and cpu backends: values, gradients, op registration, bad input.

The oracle is an independent float64 formula (every row with its own masked weight), not the reference backend.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")


def oracle(x, weight, masks, route, bias):
    """float64 y (B, N) with y[i] = x[i] @ (W * M[route[i]]).T + b, one masked weight per row."""
    w = weight.double()[None] * masks[route.long()].double()
    y = torch.einsum("bk,bnk->bn", x.double(), w)
    return y + bias.double() if bias is not None else y


def oracle_grads(x, weight, masks, route, bias, grad_y):
    xd, wd, gd = x.double(), weight.double(), grad_y.double()
    m = masks[route.long()].double()  # (B, N, K)
    dx = torch.einsum("bn,bnk->bk", gd, wd[None] * m)
    present = torch.zeros_like(masks[0])
    for t in route.unique().tolist():
        present |= masks[t]
    dw = torch.einsum("bn,bk,bnk->nk", gd, xd, m)
    db = gd.sum(0) if bias is not None else None
    return dx, dw, db, present


def make_route(kind, batch, tickets, gen):
    if kind == "random":
        return torch.randint(0, tickets, (batch,), generator=gen)
    if kind == "one_ticket":
        return torch.full((batch,), tickets - 1, dtype=torch.int64)
    if kind == "skewed":  # most rows on ticket 0, a few elsewhere, some tickets empty
        r = torch.zeros(batch, dtype=torch.int64)
        r[::7] = tickets - 1
        return r
    if kind == "empty_tickets":  # only even tickets used
        return (torch.randint(0, (tickets + 1) // 2, (batch,), generator=gen) * 2).clamp(max=tickets - 1)
    raise ValueError(kind)


def make_case(batch, n, k, tickets, density, route_kind, seed=0, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=gen, dtype=dtype)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    b = torch.randn(n, generator=gen, dtype=dtype) if bias else None
    if isinstance(density, (list, tuple)):
        masks = torch.stack([torch.rand(n, k, generator=gen) < d for d in density])
    else:
        masks = torch.rand(tickets, n, k, generator=gen) < density
    route = make_route(route_kind, batch, tickets, gen)
    return x, w, masks, route, b


SHAPES = [  # (B, N, K, T): odd sizes, B = 1, K = 1, T = 1, rows spanning several 64-row tiles
    (37, 19, 23, 3),
    (1, 5, 7, 2),
    (50, 13, 1, 4),
    (131, 33, 70, 1),
    (203, 17, 45, 5),
]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
def test_forward_and_grads_match_float64(backend, shape, density):
    batch, n, k, tickets = shape
    for route_kind in ("random", "skewed", "empty_tickets", "one_ticket"):
        x, w, masks, route, b = make_case(batch, n, k, tickets, density, route_kind, seed=hash(shape) % 1000)
        x.requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
        with rk.set_backend(backend):
            y = rk.routed_masked_linear(x, w, masks, route, b)
            grad_y = torch.randn_like(y)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), grad_y)
        ref_dx, ref_dw, ref_db, present = oracle_grads(x, w, masks, route, b, grad_y)
        torch.testing.assert_close(y.double(), oracle(x, w, masks, route, b), **tol(torch.float32))
        torch.testing.assert_close(dx.double(), ref_dx, **tol(torch.float32))
        torch.testing.assert_close(dw.double(), ref_dw, **tol(torch.float32))
        torch.testing.assert_close(db.double(), ref_db, **tol(torch.float32))
        assert torch.equal(dw[~present], torch.zeros_like(dw[~present])), "dW must be exactly zero outside masks"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_sparse_and_dense_tickets_in_one_batch(backend):
    x, w, masks, route, b = make_case(300, 40, 57, 4, [0.05, 0.5, 0.95, 1.0], "random", seed=3)
    x.requires_grad_()
    w.requires_grad_()
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(x, w, masks, route, b)
        grad_y = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), grad_y)
    ref_dx, ref_dw, _, present = oracle_grads(x, w, masks, route, b, grad_y)
    torch.testing.assert_close(y.double(), oracle(x, w, masks, route, b), **tol(torch.float32))
    torch.testing.assert_close(dx.double(), ref_dx, **tol(torch.float32))
    torch.testing.assert_close(dw.double(), ref_dw, **tol(torch.float32))
    assert torch.equal(dw[~present], torch.zeros_like(dw[~present]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [0.3, 0.9])
def test_single_ticket_equals_dense_masked_linear(backend, density):
    x, w, masks, route, b = make_case(45, 21, 33, 1, density, "one_ticket", seed=5)
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    torch.testing.assert_close(y, F.linear(x, w * masks[0], b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dw_zero_outside_masks_even_for_nonfinite_grad(backend):
    x, w, masks, route, b = make_case(64, 12, 20, 3, 0.3, "random", seed=7)
    route[route == 2] = 0  # ticket 2 absent: its private weights must get exact zeros
    w.requires_grad_()
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(x, w, masks, route, b)
        grad_y = torch.randn_like(y)
        grad_y[0, 0] = float("inf")
        grad_y[1, 1] = float("nan")
        (dw,) = torch.autograd.grad(y, (w,), grad_y)
    present = masks[0] | masks[1]
    assert torch.equal(dw[~present], torch.zeros_like(dw[~present]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_are_deterministic(backend):
    x, w, masks, route, b = make_case(300, 30, 50, 5, 0.2, "random", seed=11)
    w.requires_grad_()
    x.requires_grad_()
    outs = []
    for _ in range(2):
        with rk.set_backend(backend):
            y = rk.routed_masked_linear(x, w, masks, route, b)
            outs.append(torch.autograd.grad(y, (x, w), torch.ones_like(y)))
    assert all(torch.equal(a, c) for a, c in zip(*outs))


def test_gradcheck_float64():
    x, w, masks, route, b = make_case(9, 5, 6, 3, 0.5, "random", seed=13, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    with rk.set_backend("reference"):
        assert torch.autograd.gradcheck(lambda x_, w_, b_: rk.routed_masked_linear(x_, w_, masks, route, b_), args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, w, masks, route, b = make_case(20, 7, 9, 3, 0.4, "random", seed=17)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    g = rk.group_by_ticket(route, 3)
    with rk.set_backend(backend):
        torch.library.opcheck(torch.ops.rtl_kernels.routed_masked_linear, (x, w, masks, route, b))
        torch.library.opcheck(torch.ops.rtl_kernels.routed_masked_linear, (x, w, masks, route, None))
        torch.library.opcheck(torch.ops.rtl_kernels.routed_masked_linear, (x, w, masks, route, b, g.perm, g.offsets))
        gy = torch.randn(20, 7)
        torch.library.opcheck(
            torch.ops.rtl_kernels.routed_masked_linear_grad_input, (gy, w.detach(), masks, route, g.perm, g.offsets)
        )
        torch.library.opcheck(
            torch.ops.rtl_kernels.routed_masked_linear_grad_weight, (gy, x.detach(), masks, route, g.perm, g.offsets)
        )
    torch.library.opcheck(torch.ops.rtl_kernels.group_by_ticket, (route, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w, masks, route, b = make_case(33, 11, 14, 3, 0.3, "random", seed=19)
    w.requires_grad_()

    def step(x_, w_, b_):
        y = rk.routed_masked_linear(torch.relu(x_), w_, masks, route, b_)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    with rk.set_backend(backend):
        loss = compiled(x, w, b)
        (dw,) = torch.autograd.grad(loss, (w,))
        loss_ref = step(x, w, b)
        (dw_ref,) = torch.autograd.grad(loss_ref, (w,))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_and_fully_pruned_ticket(backend):
    x, w, masks, route, b = make_case(0, 6, 4, 2, 0.5, "random")
    x.requires_grad_()
    w.requires_grad_()
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(x, w, masks, route, b)
        assert y.shape == (0, 6)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
        assert dx.shape == (0, 4) and torch.equal(dw, torch.zeros(6, 4))
        x, w, masks, route, b = make_case(10, 6, 4, 2, 0.5, "random")
        masks[1] = False
        y = rk.routed_masked_linear(x, w, masks, route, b)
        rows = route == 1
        torch.testing.assert_close(y[rows], b.expand(int(rows.sum()), 6))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_nonfinite_input_propagates_through_kept_weights(backend, density):
    """NaN/inf reach the outputs whose kept weights touch them, never other rows; no crash. Through a weight
    the ticket prunes, it depends on the path (a dense masked GEMM makes inf * 0 = NaN; sparse kernels never
    multiply pruned weights), as documented in routed_masked_linear."""
    x, w, masks, route, b = make_case(16, 5, 6, 2, density, "random", seed=29)
    masks[:, 0, 2] = True
    x[4, 2] = float("nan")
    x[5, 2] = float("inf")
    with rk.set_backend(backend):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    assert torch.isnan(y[4, 0]) and not torch.isfinite(y[5, 0])
    others = (torch.arange(16) != 4) & (torch.arange(16) != 5)
    assert torch.isfinite(y[others]).all()


@needs_cpu_ext
def test_cpu_kernels_write_every_routed_row():
    """Poison the output: every row of a sparse ticket must be overwritten (the op allocates with empty)."""
    from rtl_kernels.formats.cpu_csr import compile_cpu_layout

    x, w, masks, route, b = make_case(150, 70, 33, 3, 0.3, "random", seed=37)
    g = rk.group_by_ticket(route, 3)
    layout = compile_cpu_layout(masks, sparse_max_density=1.1)
    y = torch.full((150, 70), float("nan"))
    torch.ops.rtl_kernels._cpu_linear_forward(
        x,
        w,
        b,
        g.perm,
        g.offsets,
        torch.ones(3, dtype=torch.uint8),
        layout.csr_ptr,
        layout.csr_chunk_ptr,
        layout.csr_idx,
        y,
    )
    torch.testing.assert_close(y.double(), oracle(x, w, masks, route, b), **tol(torch.float32))
    dx = torch.full((150, 33), float("nan"))
    gy = torch.randn(150, 70)
    torch.ops.rtl_kernels._cpu_linear_grad_input(
        gy,
        w,
        g.perm,
        g.offsets,
        torch.ones(3, dtype=torch.uint8),
        layout.csc_ptr,
        layout.csc_chunk_ptr,
        layout.csc_idx,
        dx,
    )
    ref_dx = oracle_grads(x, w, masks, route, b, gy)[0]
    torch.testing.assert_close(dx.double(), ref_dx, **tol(torch.float32))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
_ISA_NEEDS = {"generic": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512vl"}}

# Run in a fresh process per ISA (the kernels pick theirs once per process). Every tile width (1 to 64 rows: the
# 512-bit build pairs 8-row vectors and keeps an 8-row tail for odd counts), both walks of a tile (whole rows at
# 10 %; input chunks at 40 % over 130 inputs), and the direct conv kernels in table mode over conv grids (every
# geometry family), each against float64.
_ISA_SCRIPT = """
import sys, torch, torch.nn.functional as F, rtl_kernels as rk
from rtl_kernels.backends.cpu import policy
torch.manual_seed(0)
rk.set_backend("cpu")
worst = 0.0
def check(got, ref, scale):
    global worst
    err = (got.double() - ref).abs().max().item() / scale
    worst = max(worst, err)
for rows in [1, 7, 8, 9, 16, 23, 33, 40, 57, 64, 71, 150]:
    for density in [0.1, 0.4]:
        x = torch.randn(rows, 130, requires_grad=True); w = torch.randn(45, 130, requires_grad=True)
        b = torch.randn(45)
        m = torch.rand(2, 45, 130) < density; r = torch.randint(0, 2, (rows,))
        y = rk.routed_masked_linear(x, w, m, r, b)
        gy = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), gy)
        wm = w.detach().double()[None] * m[r].double()
        check(y, torch.einsum("bk,bnk->bn", x.detach().double(), wm) + b.double(), 130 ** 0.5)
        check(dx, torch.einsum("bn,bnk->bk", gy.double(), wm), 45 ** 0.5)
        check(dw, torch.einsum("bn,bk,bnk->nk", gy.double(), x.detach().double(), m[r].double()), rows ** 0.5)
# The direct sparse conv on every ticket: plain, strided, grouped, depthwise, pointwise in place (4x4) and packed,
# on maps whose grids end in partial tiles of every width.
conv_cases = [(20, 16, (3, 3), 1, 1, 1), (20, 16, (3, 3), 2, 1, 1), (8, 12, (3, 3), 1, 1, 4),
              (12, 12, (5, 5), 2, 2, 12), (12, 12, (3, 3), 1, 1, 12), (20, 16, (1, 1), 1, 0, 1)]
with policy.use_policy(conv_path="mixed", conv_sparse_max_density=1.01):
    for c, o, k, s, p, g in conv_cases:
        for hw in [(3, 3), (5, 7), (9, 9), (4, 4)]:
            x = torch.randn(5, c, *hw, requires_grad=True); w = torch.randn(o, c // g, *k, requires_grad=True)
            m = torch.rand(2, o, c // g, *k) < 0.3; r = torch.tensor([0, 1, 1, 0, 1])
            y = rk.routed_masked_conv2d(x, w, m, r, stride=s, padding=p, groups=g)
            gy = torch.randn_like(y)
            dx, dw = torch.autograd.grad(y, (x, w), gy)
            xd, wd, gd = x.detach().double(), w.detach().double(), gy.double()
            ref_y = torch.cat([F.conv2d(xd[i:i + 1], wd * m[r[i]], None, s, p, 1, g) for i in range(5)])
            ref_dx = torch.cat([torch.nn.grad.conv2d_input(xd[i:i + 1].shape, wd * m[r[i]], gd[i:i + 1], s, p, 1, g)
                                for i in range(5)])
            ref_dw = sum(torch.nn.grad.conv2d_weight(xd[i:i + 1], wd.shape, gd[i:i + 1], s, p, 1, g) * m[r[i]]
                         for i in range(5))
            fan = c // g * k[0] * k[1]
            check(y, ref_y, fan ** 0.5); check(dx, ref_dx, o ** 0.5); check(dw, ref_dw, 5 ** 0.5)
    # An inf in x must make non-finite only the gradients of the weights that truly see it: positions of a grid that
    # are not outputs are never multiplied into a weight's gradient (0 * inf would be NaN there).
    for c, o, k, s, p, g in conv_cases:
        for hw, at in [((7, 9), (0, 8)), ((5, 6), (4, 0)), ((6, 6), (2, 5))]:
            x = torch.randn(3, c, *hw); x[:, 1, at[0], at[1]] = float("inf")
            w = torch.randn(o, c // g, *k, requires_grad=True)
            m = torch.rand(2, o, c // g, *k) < 0.5; r = torch.tensor([0, 1, 1])
            y = rk.routed_masked_conv2d(x, w, m, r, stride=s, padding=p, groups=g)
            gy = torch.randn_like(y)
            dw, = torch.autograd.grad(y, (w,), gy)
            ref_dw = sum(torch.where(m[r[i]], torch.nn.grad.conv2d_weight(x[i:i + 1].double(), w.shape,
                                                                         gy[i:i + 1].double(), s, p, 1, g),
                                     torch.zeros((), dtype=torch.float64)) for i in range(3))
            finite = torch.isfinite(ref_dw)
            assert not finite.all(), "the inf must reach some kept weight"
            assert torch.isfinite(dw[finite]).all(), "a position that is no output leaked an inf"
            check(dw[finite], ref_dw[finite], 3 ** 0.5)
print(torch.ops.rtl_kernels._cpu_kernel_isa(), worst)  # the extension loads on the first call
assert worst < 1e-5, worst
"""


@needs_cpu_ext
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_kernel_isa_matches_float64(isa, tmp_path):
    """Each build of the CPU kernels (RTL_CPU_ISA caps the choice) gives the float64 results on every tile width."""
    if not _ISA_NEEDS[isa] <= _FLAGS:
        pytest.skip(f"this CPU lacks {sorted(_ISA_NEEDS[isa] - _FLAGS)}")
    script = tmp_path / "isa.py"
    script.write_text(_ISA_SCRIPT)
    env = dict(os.environ, RTL_CPU_ISA=isa)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[0] == isa, out.stdout


@pytest.mark.parametrize("value", ["generic", "avx2", "avx512", ""])
def test_rtl_cpu_isa_accepts_the_known_caps(monkeypatch, value):
    from rtl_kernels.backends import cpu

    monkeypatch.setenv("RTL_CPU_ISA", value)
    assert cpu.isa_cap_from_env() == (value or None)


@needs_cpu_ext
def test_a_misspelt_rtl_cpu_isa_makes_the_cpu_backend_fail_clearly():
    script = (
        "import torch, rtl_kernels as rk\n"
        "x, w = torch.randn(4, 3), torch.randn(2, 3)\n"
        "m, r = torch.ones(1, 2, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.int64)\n"
        "with rk.set_backend('cpu'):\n"
        "    rk.routed_masked_linear(x, w, m, r)\n"
    )
    env = dict(os.environ, RTL_CPU_ISA="avx-2")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "RTL_CPU_ISA must be one of generic, avx2, avx512 (or unset), got 'avx-2'" in out.stderr, out.stderr


# -- bad input -------------------------------------------------------------------------------------------------


def _good():
    return make_case(6, 4, 5, 3, 0.5, "random", seed=41)


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
def test_bad_input_names_argument_and_value(mutate, error, match):
    x, w, masks, route, b = _good()
    args = dict(x=x, weight=w, masks=masks, route=route, bias=b)
    mutate(args)
    with pytest.raises(error, match=match):
        rk.routed_masked_linear(**args)


def test_sweep_is_not_vacuous():
    """The sweeps above cover every density on shapes that are not multiples of 16 (guards edits of the lists)."""
    assert {0.0, 1.0} <= set(DENSITIES)
    assert any(b == 1 for b, *_ in SHAPES) and any(t == 1 for *_, t in SHAPES) and any(k == 1 for _, _, k, _ in SHAPES)
    assert all(n % 16 for _, n, _, _ in SHAPES)


@needs_cpu_ext
@pytest.mark.parametrize("n_out, density", [(3, 0.1), (1, 0.3), (5, 0.05)])
def test_narrow_sparse_tickets_match_float64(n_out, density):
    """A ticket keeping fewer weights than half a row (the INR's 3 outputs over 128 inputs) takes the cpu kernel's
    row-by-row path; a wider ticket in the same call takes the tiles."""
    x, w, masks, route, b = make_case(300, n_out, 128, 4, density, "random", seed=41)
    masks[3] = torch.rand(n_out, 128) < 0.55  # wider: more kept weights than half a row, or a dense ticket
    with rk.set_backend("cpu"):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    torch.testing.assert_close(y.double(), oracle(x, w, masks, route, b), **tol(torch.float32))
