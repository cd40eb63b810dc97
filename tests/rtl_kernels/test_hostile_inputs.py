"""Input a hostile or careless caller can give: groupings that point outside the batch, strided and expanded
tensors, backend choices from several threads. Nothing may crash the process or corrupt memory; every case gets a
clear error or the right result."""

import subprocess
import sys

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])


def _linear_case(batch=12, n=7, k=9, tickets=3, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    masks = torch.rand(tickets, n, k, generator=g) < density
    route = torch.randint(0, tickets, (batch,), generator=g)
    return x, w, masks, route, b


def _conv_case(batch=5, c=4, o=6, tickets=3, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, 7, 6, generator=g)
    w = torch.randn(o, c, 3, 3, generator=g)
    b = torch.randn(o, generator=g)
    masks = torch.rand(tickets, o, c, 3, 3, generator=g) < density
    route = torch.randint(0, tickets, (batch,), generator=g)
    return x, w, masks, route, b


def _bad_groupings(route, tickets):
    """(name, TicketGrouping, error match) for groupings that must be refused before any backend runs."""
    good = rk.group_by_ticket(route, tickets)
    batch = route.shape[0]
    perm, counts, offsets = good.perm.clone(), good.counts.clone(), good.offsets.clone()
    past = perm.clone()
    past[0] = batch + 1000
    negative = perm.clone()
    negative[-1] = -3
    twice = perm.clone()
    twice[1] = twice[0]
    long_offsets = offsets.clone()
    long_offsets[-1] = batch + 64
    falling = offsets.clone()
    falling[1], falling[2] = batch, 0
    swapped = perm.flip(0)
    return [
        ("perm past the batch", rk.TicketGrouping(past, counts, offsets), "outside the batch"),
        ("negative perm", rk.TicketGrouping(negative, counts, offsets), "outside the batch"),
        ("repeated row", rk.TicketGrouping(twice, counts, offsets), "permutation"),
        ("offsets past the batch", rk.TicketGrouping(perm, counts, long_offsets), "rise from 0 to the batch"),
        ("falling offsets", rk.TicketGrouping(perm, counts, falling), "rise from 0 to the batch"),
        ("grouping of another route", rk.TicketGrouping(swapped, counts, offsets), "does not match route"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["linear", "conv2d", "conv_transpose2d"])
def test_bad_grouping_is_refused_on_every_backend(backend, op):
    if op == "linear":
        x, w, masks, route, b = _linear_case()
        call = lambda grouping: rk.routed_masked_linear(x, w, masks, route, b, grouping=grouping)
    elif op == "conv2d":
        x, w, masks, route, b = _conv_case()
        call = lambda grouping: rk.routed_masked_conv2d(x, w, masks, route, b, padding=1, grouping=grouping)
    else:
        x, w, masks, route, b = _conv_case()
        w = w.transpose(0, 1).contiguous()  # (C_in, C_out, kh, kw) for the transposed conv
        masks = masks.transpose(1, 2).contiguous()
        x = torch.randn(x.shape[0], w.shape[0], 5, 4)
        call = lambda grouping: rk.routed_masked_conv_transpose2d(x, w, masks, route, b, stride=2, grouping=grouping)
    if route.unique().numel() < 2:
        pytest.skip("the case needs two tickets present")
    with rk.set_backend(backend):
        expected = call(None)
        for name, grouping, match in _bad_groupings(route, masks.shape[0]):
            with pytest.raises(ValueError, match=match):
                call(grouping)
        # a hand-made grouping that is right is accepted (checked once) and gives the same result
        g = rk.group_by_ticket(route, masks.shape[0])
        own = rk.TicketGrouping(g.perm.clone(), g.counts.clone(), g.offsets.clone())
        torch.testing.assert_close(call(own), expected, rtol=0, atol=0)
        torch.testing.assert_close(call(own), expected, rtol=0, atol=0)


def test_a_grouping_edited_in_place_is_checked_again():
    x, w, masks, route, b = _linear_case()
    g = rk.group_by_ticket(route, masks.shape[0])
    rk.routed_masked_linear(x, w, masks, route, b, grouping=g)
    g.perm[0] = 10_000
    with pytest.raises(ValueError, match="outside the batch"):
        rk.routed_masked_linear(x, w, masks, route, b, grouping=g)


# The kernels' own entry points are reachable from Python too: they must refuse bad rows and indices themselves.
# Each runs in a child process, so that a crash fails this test instead of killing the run.
_NATIVE_SCRIPT = """
import torch, rtl_kernels as rk
from rtl_kernels import _extension
from rtl_kernels.backends.cpu import linear
assert _extension.load("_C")[0] is not None  # registers the native ops
torch.manual_seed(0)
b, n, k, t = 12, 7, 9, 3
x, w = torch.randn(b, k), torch.randn(n, k)
masks = torch.rand(t, n, k) < 0.3
route = torch.arange(b) % t  # every ticket present: the checks cover the tickets the kernels will read
g = rk.group_by_ticket(route, t)
lay = linear.layout_of(masks)
sparse = torch.ones(t, dtype=torch.uint8)
out = torch.empty(b, n)
ops = torch.ops.rtl_kernels
def fwd(perm=g.perm, offsets=g.offsets, idx=lay.csr_idx, ptr=lay.csr_ptr, xx=x):
    ops._cpu_linear_forward(xx, w, None, perm, offsets, sparse, ptr, lay.csr_chunk_ptr, idx, out)
def gin(perm=g.perm, offsets=g.offsets):
    ops._cpu_linear_grad_input(out, w, perm, offsets, sparse, lay.csc_ptr, lay.csc_chunk_ptr, lay.csc_idx,
                               torch.empty(b, k))
def gw(perm=g.perm, offsets=g.offsets):
    ops._cpu_linear_grad_weight(out, x, perm, offsets, sparse, lay.csr_ptr, lay.csr_idx, torch.zeros(n, k))
far = g.perm.clone(); far[0] = 1 << 40
offs = g.offsets.clone(); offs[-1] = 1 << 30
bad_idx = lay.csr_idx.clone(); bad_idx[0] = 1 << 20
bad_ptr = lay.csr_ptr.clone(); bad_ptr[1] = 1 << 40
cases = {"perm": lambda: fwd(perm=far), "offsets": lambda: fwd(offsets=offs), "index": lambda: fwd(idx=bad_idx),
         "row pointer": lambda: fwd(ptr=bad_ptr), "short x": lambda: fwd(xx=x[:4]),
         "grad_input perm": lambda: gin(perm=far), "grad_weight offsets": lambda: gw(offsets=offs)}
for name, call in cases.items():
    try:
        call()
    except RuntimeError as exc:
        print("refused", name)
    else:
        print("ACCEPTED", name)
"""


@pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")
def test_native_linear_entry_points_refuse_bad_rows_and_indices():
    out = subprocess.run([sys.executable, "-c", _NATIVE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"the child died (rc {out.returncode}): {out.stderr[-2000:]}"
    lines = out.stdout.split("\n")
    assert sum(line.startswith("refused") for line in lines) == 7, out.stdout


# -- strided and expanded tensors --------------------------------------------------------------------------------


def _strided(t):
    """The same values in a non-contiguous view (every other element of a tensor twice as wide)."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arg", ["x", "weight", "masks", "route", "bias", "all", "expanded"])
def test_linear_takes_any_strides(backend, arg):
    x, w, masks, route, b = _linear_case(density=0.5)
    masks[1] = masks[0]  # lets the expanded case use a stride-0 mask of two identical tickets
    args = dict(x=x, weight=w, masks=masks, route=route, bias=b)
    if arg == "all":
        args = {k: _strided(v) for k, v in args.items()}
    elif arg == "expanded":
        args["masks"] = masks[:1].expand(3, -1, -1)
        args["bias"] = b[:1].expand(b.shape[0])
        args["x"] = x[:1].expand(x.shape[0], -1)
        ref_args = dict(
            args, masks=args["masks"].contiguous(), bias=args["bias"].contiguous(), x=args["x"].contiguous()
        )
    else:
        args[arg] = _strided(args[arg])
    assert arg == "expanded" or not all(v.is_contiguous() for v in args.values())
    ref_args = ref_args if arg == "expanded" else dict(x=x, weight=w, masks=masks, route=route, bias=b)
    with rk.set_backend(backend):
        got = rk.routed_masked_linear(**args)
        want = rk.routed_masked_linear(**ref_args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [0.05, 0.6, 1.0])  # the sparse kernel, the dense classes, all-ones masks
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_conv_takes_a_strided_bias_and_expanded_tensors(backend, density, transposed):
    x, w, masks, route, b = _conv_case(density=density)
    if transposed:
        w, masks = w.transpose(0, 1).contiguous(), masks.transpose(1, 2).contiguous()
        x = torch.randn(x.shape[0], w.shape[0], 5, 4)
        b = torch.randn(w.shape[1])
        op = lambda **a: rk.routed_masked_conv_transpose2d(**a, stride=2, padding=1)
    else:
        op = lambda **a: rk.routed_masked_conv2d(**a, padding=1)
    masks[:] = masks[0]
    with rk.set_backend(backend):
        want = op(x=x, weight=w, masks=masks, route=route, bias=b)
        got = op(x=x, weight=w, masks=masks[:1].expand_as(masks), route=_strided(route), bias=_strided(b))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        wide = x[:1].expand_as(x)
        torch.testing.assert_close(
            op(x=wide, weight=w, masks=masks, route=route, bias=b),
            op(x=wide.contiguous(), weight=w, masks=masks, route=route, bias=b),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_with_strided_inputs(backend):
    x, w, masks, route, b = _linear_case(density=0.4)
    xs, ws, bs = (_strided(t).requires_grad_() for t in (x, w, b))
    xc, wc, bc = (t.clone().requires_grad_() for t in (x, w, b))
    gy = torch.randn(x.shape[0], w.shape[0])
    with rk.set_backend(backend):
        rk.routed_masked_linear(xs, ws, masks, route, bs).backward(gy)
        rk.routed_masked_linear(xc, wc, masks, route, bc).backward(gy)
    for got, want in ((xs.grad, xc.grad), (ws.grad, wc.grad), (bs.grad, bc.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- sizes past 32 bits -------------------------------------------------------------------------------------------
# Offsets into buffers are int64 in the native code (a ticket's packed images pass 2^31 floats at 64 channels of
# 226x226 and 657 images); the index arrays hold positions within one weight row as int32, which their builders
# check. A real case past 2^31 needs more than 17 GB, so only the helper is tested here.


def test_index_builders_refuse_rows_past_int32():
    from rtl_kernels.formats import INT32_MAX, check_int32_columns

    check_int32_columns("a linear mask", INT32_MAX)
    with pytest.raises(ValueError, match="int32 index"):
        check_int32_columns("a linear mask", INT32_MAX + 1)
