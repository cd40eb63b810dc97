"""The cpu backend's own interfaces: the path policy (pure functions and the per-thread override), mask classes,
the trace, the masked-weight cache, and the direct sparse conv ops given malformed indices."""

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
