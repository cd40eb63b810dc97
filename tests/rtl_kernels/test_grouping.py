"""group_by_ticket: the stable counting sort every routed op groups its batch with, and groupings reused by layers."""

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")


def test_precomputed_grouping_matches(linear_case):
    x, w, masks, route, b = linear_case(77, 9, 12, 4, 0.5, seed=23)
    g = rk.group_by_ticket(route, 4)
    for backend in CPU_BACKENDS:
        with rk.set_backend(backend):
            torch.testing.assert_close(
                rk.routed_masked_linear(x, w, masks, route, b, grouping=g),
                rk.routed_masked_linear(x, w, masks, route, b),
            )


def test_group_by_ticket_is_a_stable_counting_sort():
    route = torch.tensor([2, 0, 2, 1, 0, 2, 4], dtype=torch.int32)
    g = rk.group_by_ticket(route, 5)
    assert g.perm.tolist() == [1, 4, 3, 0, 2, 5, 6]
    assert g.counts.tolist() == [2, 1, 3, 0, 1]
    assert g.offsets.tolist() == [0, 2, 3, 6, 6, 7]
    big = torch.randint(0, 7, (5000,))
    g1, g2 = rk.group_by_ticket(big, 7), rk.group_by_ticket(big, 7)
    assert torch.equal(g1.perm, g2.perm)
    assert torch.equal(big[g1.perm], big.sort(stable=True).values)
    for t in range(7):  # rows of one ticket keep their batch order
        seg = g1.perm[g1.offsets[t] : g1.offsets[t + 1]]
        assert torch.all(seg[1:] > seg[:-1])
    empty = rk.group_by_ticket(torch.zeros(0, dtype=torch.int64), 3)
    assert empty.perm.numel() == 0 and empty.offsets.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "route, tickets, error, match",
    [
        (torch.tensor([0, 3]), 3, ValueError, r"ticket id 3, outside \[0, 3\)"),
        (torch.tensor([0.0, 1.0]), 3, TypeError, "integer tensor"),
        (torch.tensor([[0, 1]]), 3, ValueError, "route must be 1-D"),
        (torch.tensor([0, 1]), 0, ValueError, "num_tickets must be a positive int"),
    ],
)
def test_group_by_ticket_bad_input(route, tickets, error, match):
    with pytest.raises(error, match=match):
        rk.group_by_ticket(route, tickets)
