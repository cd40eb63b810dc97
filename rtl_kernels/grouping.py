"""Routing primitive: group the rows of a batch by ticket (histogram + exclusive prefix sum + stable permutation).

Every routed op groups its batch this way; a model whose layers share one route can group once with
:func:`group_by_ticket` and pass the result to every layer.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_grouping,
    check_grouping_values,
    check_route_dtype,
    check_route_values,
    check_tensor,
    eager_call_ok,
)


class TicketGrouping(NamedTuple):
    """Rows of a batch grouped by ticket.

    Attributes:
        perm (B,) int64: row indices sorted by ticket, stable (rows of one ticket keep their batch order).
        counts (T,) int64: rows routed to each ticket.
        offsets (T + 1,) int64: exclusive prefix sum of counts; ticket t owns perm[offsets[t]:offsets[t + 1]].
    """

    perm: Tensor
    counts: Tensor
    offsets: Tensor


def _group_by_ticket_impl(route: Tensor, num_tickets: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_static(route, num_tickets)
    check_route_values(route, num_tickets)
    route64 = route.to(torch.int64)
    counts = torch.zeros(num_tickets, dtype=torch.int64, device=route.device)
    counts.index_add_(0, route64, torch.ones_like(route64))
    # Stable sort on the ticket id = the stable permutation of a counting sort; deterministic on every device.
    perm = torch.sort(route64, stable=True).indices
    offsets = torch.zeros(num_tickets + 1, dtype=torch.int64, device=route.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return perm, counts, offsets


_group_by_ticket_op = torch.library.custom_op("rtl_kernels::group_by_ticket", mutates_args=())(_group_by_ticket_impl)


@_group_by_ticket_op.register_fake
def _(route: Tensor, num_tickets: int):
    _check_static(route, num_tickets)
    b = route.shape[0]
    return (
        route.new_empty((b,), dtype=torch.int64),
        route.new_empty((num_tickets,), dtype=torch.int64),
        route.new_empty((num_tickets + 1,), dtype=torch.int64),
    )


def _check_static(route: Tensor, num_tickets: int) -> None:
    check_tensor("route", route, ndim=1)
    check_route_dtype(route)
    if isinstance(num_tickets, torch.SymInt):  # traced with dynamic shapes: masks.shape[0] of a fake tensor
        return
    if isinstance(num_tickets, bool) or not isinstance(num_tickets, int) or num_tickets < 1:
        raise ValueError(f"num_tickets must be a positive int, got {num_tickets!r}")


def group_by_ticket(route: Tensor, num_tickets: int) -> TicketGrouping:
    """Group a batch by ticket with a stable counting sort.

    Args:
        route (B,) int32/int64: ticket id of each row, in [0, num_tickets).
        num_tickets: T, the number of tickets.

    Returns:
        TicketGrouping(perm (B,), counts (T,), offsets (T + 1,)), all int64 on route's device.

    Example:
        >>> g = group_by_ticket(torch.tensor([2, 0, 2, 1]), 3)
        >>> g.perm.tolist(), g.counts.tolist(), g.offsets.tolist()
        ([1, 3, 0, 2], [1, 1, 2], [0, 1, 2, 4])
    """
    perm, counts, offsets = group_by_ticket_tensors(route, num_tickets)
    # A traced call holds no real tensors to mark: the first op that receives the grouping checks and marks it.
    if not torch.compiler.is_compiling():
        _mark_checked(perm, offsets)
    return TicketGrouping(perm, counts, offsets)


# A grouping that group_by_ticket made, or that passed check_grouping_values once, carries this mark on its perm
# tensor: (its offsets, both tensors' version counters). An in-place edit of either bumps a version and the next
# call checks again, so a model's layers share one check per forward.
_MARK = "_rtl_checked_grouping"


def _mark_checked(perm: Tensor, offsets: Tensor) -> None:
    try:
        setattr(perm, _MARK, (weakref.ref(offsets), perm._version, offsets._version))
    except (AttributeError, RuntimeError, TypeError):  # a tensor subclass without attributes: it is checked each call
        pass


def checked_grouping(route: Tensor, perm: Tensor, offsets: Tensor, num_tickets: int) -> tuple[Tensor, Tensor]:
    """(perm, offsets) of a caller's grouping once it is known safe for native code: made by group_by_ticket, or
    checked here (row indices inside the batch, a permutation, offsets from 0 to B, grouping route)."""
    mark = getattr(perm, _MARK, None)
    if not (mark is not None and mark[0]() is offsets and mark[1] == perm._version and mark[2] == offsets._version):
        perm, offsets = perm.contiguous(), offsets.contiguous()
        check_grouping_values(route, perm, offsets, num_tickets)
        _mark_checked(perm, offsets)
    return perm, offsets


def group_by_ticket_tensors(route: Tensor, num_tickets: int) -> tuple[Tensor, Tensor, Tensor]:
    """(perm, counts, offsets) of :func:`group_by_ticket`; eager calls skip the dispatcher (whose first custom-op
    call imports torch's compiler stack: 150 MB and a second of start-up that plain inference never needs)."""
    if eager_call_ok(route):
        return _group_by_ticket_impl(route, num_tickets)
    return torch.ops.rtl_kernels.group_by_ticket(route, num_tickets)


def checked_call_grouping(
    route: Tensor, perm: Optional[Tensor], offsets: Optional[Tensor], batch: int, num_tickets: int
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """An op's route and optional grouping checked before any backend runs: without a grouping the route's ids are
    checked (the op groups it itself); a caller's grouping goes through :func:`checked_grouping`."""
    check_grouping(perm, offsets, batch, num_tickets)
    if perm is None:
        check_route_values(route, num_tickets)
        return None, None
    return checked_grouping(route, perm, offsets, num_tickets)
