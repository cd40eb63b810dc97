"""The cpu backend's own interfaces: the path policy (pure functions and the per-thread override), mask classes,
the trace, the masked-weight cache, each ISA build of the kernels, the native ops called directly (every routed row
written, malformed indices refused), the row-by-row linear path and the conv paths forced one by one. The contract
shared with the other backends is in test_*_contract.py (where the cpu backend also runs with each conv path forced).
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension
from rtl_kernels.backends.cpu import classes, policy, trace, weights
from rtl_kernels.formats.conv_index import compile_conv_index, input_gradient_index, tap_phases, ticket_twins

HAS_CPU_EXT = _extension.load("_C")[0] is not None
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="the cpu extension is not built")


# -- policy ---------------------------------------------------------------------------------------------------------
def test_linear_ticket_choice_follows_density_and_rows():
    p = policy.CpuPolicy()
    assert policy.linear_ticket_is_sparse(0.1, 2048, p)
    assert not policy.linear_ticket_is_sparse(0.7, 2048, p)
    assert policy.linear_ticket_is_sparse(0.1, p.small_group_rows - 1, p)
    assert not policy.linear_ticket_is_sparse(0.3, p.small_group_rows - 1, p)  # few rows: sparse only when sparser
    assert policy.linear_ticket_is_sparse(0.99, 4, policy.CpuPolicy(linear_path="sparse"))
    assert not policy.linear_ticket_is_sparse(0.01, 4096, policy.CpuPolicy(linear_path="dense"))


def test_conv_path_choice():
    p = policy.CpuPolicy()
    resnet = 256 * 256 * 9  # a ResNet-18 3x3 conv at batch 64 on 4x4 maps: 600 M multiply-adds
    assert policy.conv_path(64, 16, resnet, 1, False, [1.0], p) == "dense"  # one class of all-ones masks
    assert policy.conv_path(64, 16, resnet, 1, False, [0.6], p) == "dense"  # one dense class
    assert policy.conv_path(64, 16, resnet, 1, False, [0.1] * 8, p) == "mixed"
    assert policy.conv_path(64, 16, resnet, 1, False, [0.1, 0.6], p) == "mixed"  # big layer: per class
    small = 8 * 16  # GhostNet's first 1x1 conv at batch 320 on 16x16 maps: 10 M multiply-adds
    assert policy.conv_path(320, 256, small, 1, False, [0.1, 0.7], p) == "image"  # small layer, a dense class
    assert policy.conv_path(320, 256, small, 1, False, [0.1, 0.1], p) == "mixed"
    assert policy.conv_path(320, 256, small, 1, False, [0.5, 0.5], p) == "mixed"  # small: sparse up to 60 %
    assert policy.conv_path(320, 4, 120 * 40, 1, False, [0.5, 0.5], p) == "mixed"  # small work, big weight
    assert policy.conv_path(320, 64, 36 * 9, 36, True, [0.5, 0.5], p) == "mixed"  # depthwise: its own kernel
    assert policy.conv_path(320, 64, 36 * 9, 36, True, [1.0], p) == "dense"
    assert policy.conv_path(320, 64, 8 * 4 * 9, 2, False, [0.1, 0.1], p) == "image"  # grouped, small
    assert policy.conv_path(64, 16, resnet, 1, False, [1.0], policy.CpuPolicy(conv_path="mixed")) == "mixed"
    assert policy.conv_ticket_is_sparse(0.9, True, False, p) and not policy.conv_ticket_is_sparse(0.9, False, False, p)
    assert policy.conv_ticket_is_sparse(0.5, False, True, p) and not policy.conv_ticket_is_sparse(0.5, False, False, p)


def test_policy_rejects_unknown_paths():
    with pytest.raises(ValueError, match="conv_path must be None or one of"):
        policy.CpuPolicy(conv_path="fast")
    with pytest.raises(ValueError, match="linear_path must be None or one of"):
        policy.use_policy(linear_path="sparsest")


def test_use_policy_is_per_thread_and_nests():
    default = policy.current_policy()
    seen = {}

    def other():
        seen["other"] = policy.current_policy()

    with policy.use_policy(conv_path="image") as outer:
        assert policy.current_policy() is outer
        with policy.use_policy(conv_sparse_max_density=0.2) as inner:
            assert inner.conv_path == "image" and inner.conv_sparse_max_density == 0.2
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
        assert policy.current_policy() is outer
    assert policy.current_policy() is default
    assert seen["other"] is default


# -- mask classes and indices ---------------------------------------------------------------------------------------
def test_ticket_twins_and_classes():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(5, 4, 3, generator=gen) < 0.5
    m[2] = m[0]
    m[4] = m[0]
    m[3] = torch.ones(4, 3, dtype=torch.bool)
    twin = ticket_twins(m).tolist()
    assert twin == [0, 1, 0, 3, 0]
    bounds = [0, 2, 2, 5, 5, 9]  # ticket 1 and 3 have no rows
    found = classes.present_classes(twin, bounds)
    assert [(c.ticket, c.tickets, c.rows) for c in found] == [(0, (0, 2, 4), 9)]
    perm = torch.arange(9).flip(0)
    assert classes.class_rows(found[0], perm, bounds) is None  # the class holds the batch
    skipped = classes.present_classes(twin, bounds, skip=[False, False, True, False, False])
    assert classes.class_rows(skipped[0], perm, bounds).tolist() == [8, 7, 3, 2, 1, 0]


def test_conv_index_entries_match_the_masks():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 6, 2, 3, 3, generator=gen) < 0.4
    masks[1] = True  # dense: not indexed
    index = compile_conv_index(masks, max_density=0.6)
    assert index.indexed.tolist() == [True, False, True]
    assert index.all_ones.tolist() == [False, True, False]
    for t in (0, 2):
        for o in range(6):
            row = t * 6 + o
            kept = index.csr_idx[index.csr_ptr[row] : index.csr_ptr[row + 1]].tolist()
            assert kept == masks[t, o].reshape(-1).nonzero().flatten().tolist()
    assert index.csr_ptr[6] == index.csr_ptr[12]  # ticket 1 has no entries
    # the input-gradient index: every kept weight once, under its input channel and stride phase
    groups, stride = 3, (2, 2)
    ptr, entries = input_gradient_index(index, masks, groups, stride, (1, 1))
    phase = tap_phases((3, 3), stride, (1, 1))
    og_n, cg, c = 2, 2, 6
    seen = set()
    for t in (0, 2):
        for p in range(4):
            for ch in range(c):
                row = (t * 4 + p) * c + ch
                for v in entries[ptr[row] : ptr[row + 1]].tolist():
                    og, tap = divmod(v, 9)
                    o = (ch // cg) * og_n + og
                    assert phase[tap] == p and masks[t, o, ch % cg].reshape(-1)[tap]
                    seen.add((t, o, ch % cg, tap))
    expected = {
        (t, o, cl, tap)
        for t in (0, 2)
        for o in range(6)
        for cl in range(cg)
        for tap in range(9)
        if masks[t, o, cl].reshape(-1)[tap]
    }
    assert seen == expected


# -- trace ----------------------------------------------------------------------------------------------------------
@needs_cpu_ext
def test_trace_records_each_call_in_its_block_only():
    x, w = torch.randn(8, 4, 6, 6), torch.randn(5, 4, 3, 3)
    masks = torch.rand(2, 5, 4, 3, 3) < 0.2
    route = torch.tensor([0, 1] * 4)
    with rk.set_backend("cpu"):
        rk.routed_masked_conv2d(x, w, masks, route, padding=1)
        assert not trace.active()
        with trace.record_calls() as calls:
            with policy.use_policy(conv_path="mixed"):
                rk.routed_masked_conv2d(x, w, masks, route, padding=1)
            rk.routed_masked_linear(torch.randn(8, 7), torch.randn(3, 7), torch.ones(2, 3, 7, dtype=torch.bool), route)
    assert [c["op"] for c in calls] == ["conv2d_forward", "linear_forward"]
    assert calls[0]["path"] == "mixed" and calls[0]["sparse_tickets"] == 2 and calls[0]["weight_shape"] == (5, 4, 3, 3)
    assert calls[1]["dense_classes"] == 1 and calls[1]["sparse_tickets"] == 0  # two all-ones tickets: one class


# -- identical tickets run once -------------------------------------------------------------------------------------
@needs_cpu_ext
def test_all_ones_tickets_cost_one_dense_call(monkeypatch):
    import torch.nn.functional as F

    calls = []
    real_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a[0].shape[0]) or real_conv(*a, **k))
    x, w = torch.randn(9, 4, 6, 6), torch.randn(5, 4, 3, 3)
    masks = torch.ones(3, 5, 4, 3, 3, dtype=torch.bool)
    route = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    with rk.set_backend("cpu"):
        y = rk.routed_masked_conv2d(x, w, masks, route, padding=1)
    assert calls == [9], "every ticket keeps every weight: one convolution of the whole batch"
    torch.testing.assert_close(y, real_conv(x, w, padding=1))


# -- the masked-weight cache ----------------------------------------------------------------------------------------
def test_masked_weight_cache_follows_versions_and_stays_bounded(monkeypatch):
    w = torch.randn(64, 64)
    masks = torch.rand(3, 64, 64) < 0.5
    weights.masked_weight_cache.clear()
    with torch.no_grad():
        a = weights.masked_weight(w, masks, 1, all_ones=False)
        assert weights.masked_weight(w, masks, 1, all_ones=False) is a  # cached
        torch.testing.assert_close(a, w * masks[1])
        w.mul_(2)  # a new weight version: recomputed
        b = weights.masked_weight(w, masks, 1, all_ones=False)
        torch.testing.assert_close(b, w * masks[1])
        masks[1, 0, 0] = ~masks[1, 0, 0]
        torch.testing.assert_close(weights.masked_weight(w, masks, 1, all_ones=False), w * masks[1])
        monkeypatch.setattr(weights, "CACHE_BYTES", 2 * 64 * 64 * 4)
        for t in range(3):
            weights.masked_weight(w, masks, t, all_ones=False)
        assert weights.masked_weight_cache.stats()["bytes"] <= 2 * 64 * 64 * 4
    assert weights.masked_weight(w, masks, 0, all_ones=True) is w
    weights.masked_weight_cache.clear()


# -- the direct sparse conv ops refuse malformed input cleanly --------------------------------------------------------
def _conv_op_args():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 3, 6, 6, generator=gen), torch.randn(5, 3, 3, 3, generator=gen)
    masks = torch.rand(2, 5, 3, 3, 3, generator=gen) < 0.5
    g = rk.group_by_ticket(torch.tensor([0, 1, 1, 0]), 2)
    index = compile_conv_index(masks, 1.01)
    y = torch.empty(4, 5, 6, 6)
    return x, w, g, index, y


@needs_cpu_ext
@pytest.mark.parametrize(
    "damage, match",
    [
        ("idx_high", "outside the kernel"),
        ("idx_negative", "outside the kernel"),
        ("ptr_decreasing", "row pointer"),
        ("ptr_end", "row pointer"),
        ("perm_outside", "outside the batch"),
        ("offsets", "ticket offsets"),
    ],
)
def test_conv_op_refuses_a_malformed_index(damage, match):
    x, w, g, index, y = _conv_op_args()
    ptr, idx, perm, offsets = index.csr_ptr.clone(), index.csr_idx.clone(), g.perm.clone(), g.offsets.clone()
    if damage == "idx_high":
        idx[3] = 10_000_000
    elif damage == "idx_negative":
        idx[-1] = -5
    elif damage == "ptr_decreasing":
        ptr[3] = ptr[5] + 1
    elif damage == "ptr_end":
        ptr[-1] += 1
    elif damage == "perm_outside":
        perm[2] = 4
    else:
        offsets[1] = 7
    computed = torch.ones(2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rtl_kernels._cpu_conv2d_forward(
            x, w, None, perm, offsets, computed, ptr, idx, [1, 1], [1, 1], [1, 1], 1, y
        )
    dw = torch.zeros_like(w)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rtl_kernels._cpu_conv2d_grad_weight(
            y, x, perm, offsets, computed, ptr, idx, [1, 1], [1, 1], [1, 1], 1, dw
        )


@needs_cpu_ext
def test_conv_op_refuses_wrong_shapes():
    x, w, g, index, y = _conv_op_args()
    computed = torch.ones(2, dtype=torch.uint8)
    args = (g.perm, g.offsets, computed, index.csr_ptr, index.csr_idx, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="output size"):
        torch.ops.rtl_kernels._cpu_conv2d_forward(x, w, None, *args, torch.empty(4, 5, 5, 6))
    with pytest.raises(RuntimeError, match="overlapping"):
        torch.ops.rtl_kernels._cpu_conv2d_forward(x, w, None, *args, torch.empty(1, 5, 6, 6).expand(4, 5, 6, 6))
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.rtl_kernels._cpu_conv2d_forward(x, w, torch.randn(4), *args, y)
    with pytest.raises(RuntimeError, match="row pointer"):
        torch.ops.rtl_kernels._cpu_conv2d_forward(
            x, w, None, g.perm, g.offsets, computed, index.csr_ptr[:-1], index.csr_idx, [1, 1], [1, 1], [1, 1], 1, y
        )


@needs_cpu_ext
def test_conv_op_leaves_images_of_other_tickets_alone():
    x, w, g, index, _ = _conv_op_args()
    y = torch.full((4, 5, 6, 6), 7.0)
    computed = torch.tensor([1, 0], dtype=torch.uint8)  # ticket 1 (images 1, 2) is someone else's
    torch.ops.rtl_kernels._cpu_conv2d_forward(
        x, w, None, g.perm, g.offsets, computed, index.csr_ptr, index.csr_idx, [1, 1], [1, 1], [1, 1], 1, y
    )
    assert torch.equal(y[1:3], torch.full((2, 5, 6, 6), 7.0))
    assert not torch.equal(y[0], torch.full((5, 6, 6), 7.0))


# -- the linear kernels called directly, each ISA build, the row-by-row path ------------------------------------------
@needs_cpu_ext
def test_cpu_kernels_write_every_routed_row(linear_case, linear_oracle, check_float64):
    """Poison the output: every row of a sparse ticket must be overwritten (the op allocates with empty)."""
    from rtl_kernels.formats.cpu_csr import compile_cpu_layout

    x, w, masks, route, b = linear_case(150, 70, 33, 3, 0.3, 37)
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
    gy = torch.randn(150, 70)
    exact = linear_oracle(x, w, masks, route, b, gy)
    check_float64(y, exact.y, "y")
    dx = torch.full((150, 33), float("nan"))
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
    check_float64(dx, exact.dx, "dx")


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


@needs_cpu_ext
@pytest.mark.parametrize("n_out, density", [(3, 0.1), (1, 0.3), (5, 0.05)])
def test_narrow_sparse_tickets_match_float64(n_out, density, linear_case, linear_oracle, check_float64):
    """A ticket keeping fewer weights than half a row (the INR's 3 outputs over 128 inputs) takes the cpu kernel's
    row-by-row path; a wider ticket in the same call takes the tiles."""
    x, w, masks, route, b = linear_case(300, n_out, 128, 4, density, 41)
    masks[3] = torch.rand(n_out, 128) < 0.55  # wider: more kept weights than half a row, or a dense ticket
    with rk.set_backend("cpu"):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    check_float64(y, linear_oracle(x, w, masks, route, b).y, "y")


# -- the conv paths forced one by one -------------------------------------------------------------------------------


def _conv_run(x, w, masks, route, b, grad_y, transposed=False, **geometry):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
    with rk.set_backend("cpu"):
        y = op(x, w, masks, route, b, **geometry)
        y.backward(grad_y)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@needs_cpu_ext
def test_conv2d_mixes_dense_and_sparse_tickets_in_one_call(conv_case, conv_oracle, check_float64):
    """Sparse tickets take the direct kernel and dense ones torch's convolution, in the same call."""
    densities = [0.05, 0.95, 0.3, 1.0, 0.0, 0.5]
    with policy.use_policy(conv_path="mixed", conv_sparse_max_density=0.5), trace.record_calls() as calls:
        for seed in range(3):
            x, w, masks, route, b = conv_case(11, 4, 6, (9, 8), (3, 3), len(densities), densities, seed)
            grad_y = torch.randn(11, 6, 9, 8, generator=torch.Generator().manual_seed(seed))
            got = _conv_run(x, w, masks, route, b, grad_y, padding=1)
            for name, g, e in zip("y dx dw db".split(), got, conv_oracle(x, w, masks, route, b, grad_y, padding=1)):
                check_float64(g, e, name)
    assert calls and all(c["path"] == "mixed" for c in calls)
    assert any(c["sparse_tickets"] and c["dense_classes"] for c in calls), "no call took both paths"


_POINTWISE_PATHS = {
    "image": dict(conv_path="image"),
    "sparse": dict(conv_path="mixed", conv_sparse_max_density=1.01),
    "dense": dict(conv_path="dense"),
}


@needs_cpu_ext
@pytest.mark.parametrize("path", list(_POINTWISE_PATHS))
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_pointwise_paths_match_float64(path, transposed, conv_case, conv_oracle, check_float64):
    """1x1 convs: one batched matrix product per image ("image"), the direct kernel, reading the images in place
    when their planes are whole vectors (4x4) and packed otherwise ("sparse"), torch's convolution per class
    ("dense"); on mixed-density tickets (dense, sparse, empty), with plain and channels_last inputs."""
    densities = [0.05, 0.95, 0.3, 1.0, 0.0]
    with policy.use_policy(**_POINTWISE_PATHS[path]):
        for seed, hw in enumerate([(5, 4), (1, 1), (6, 7), (4, 4)]):
            x, w, masks, route, b = conv_case(9, 6, 7, hw, (1, 1), 5, densities, seed, transposed=transposed)
            grad_y = torch.randn(9, 7, *hw, generator=torch.Generator().manual_seed(seed))
            got = _conv_run(x, w, masks, route, b, grad_y, transposed=transposed)
            exact = conv_oracle(x, w, masks, route, b, grad_y, transposed=transposed)
            for name, g, e in zip("y dx dw db".split(), got, exact):
                check_float64(g, e, f"{hw}: {name}")
        x, w, masks, _, _ = conv_case(5, 6, 6, (4, 4), (1, 1), 3, 0.4, 7, transposed=transposed)
        x = x.to(memory_format=torch.channels_last)
        route = torch.tensor([2, 0, 2, 1, 0])
        op = rk.routed_masked_conv_transpose2d if transposed else rk.routed_masked_conv2d
        with rk.set_backend("cpu"):
            y = op(x, w, masks, route)
    check_float64(y, conv_oracle(x, w, masks, route, None, transposed=transposed).y, "channels_last")


def _conv_args(seed=9):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(3, 4, 6, 6, generator=gen),
        weight=torch.randn(6, 4, 3, 3, generator=gen),
        masks=torch.rand(2, 6, 4, 3, 3, generator=gen) < 0.5,
        route=torch.tensor([0, 1, 1]),
    )


@needs_cpu_ext
def test_conv_layout_is_cached_and_follows_mask_edits(conv_oracle, check_float64):
    args = _conv_args()
    with rk.set_backend("cpu"), policy.use_policy(conv_path="mixed", conv_sparse_max_density=1.01):
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
    check_float64(y2, conv_oracle(args["x"], args["weight"], args["masks"], args["route"], None, padding=1).y, "y")
    assert not torch.allclose(y1, y2)


@needs_cpu_ext
def test_per_image_weight_path_follows_mask_and_weight_edits(conv_oracle, check_float64):
    """Masked weights are cached (the "image" path, and whatever "auto" picks): an in-place edit of the masks or of
    the weight must reach them."""
    for path in (None, "image"):
        args = _conv_args()
        with rk.set_backend("cpu"), policy.use_policy(conv_path=path):
            rk.routed_masked_conv2d(**args, padding=1)
            args["masks"][0, :2].logical_not_()
            with torch.no_grad():
                args["weight"].mul_(3)
            y = rk.routed_masked_conv2d(**args, padding=1)
        exact = conv_oracle(args["x"], args["weight"], args["masks"], args["route"], None, padding=1)
        check_float64(y, exact.y, f"path {path}")
