"""Mask classes: tickets whose masks are identical in a layer (all-ones masks before pruning, a layer no ticket
pruned, tickets IMP left equal) compute the same function there, so the dense paths run each class once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskClass:
    """The present tickets sharing one mask.

    Attributes:
        ticket: the class's first ticket (whose mask and index entries stand for all of them).
        tickets: every present ticket of the class.
        rows: how many rows (images) of the batch the class holds.
    """

    ticket: int
    tickets: tuple
    rows: int


def present_classes(
    twin: Sequence[int], bounds: Sequence[int], skip: Optional[Sequence[bool]] = None
) -> List[MaskClass]:
    """The classes of the tickets with rows in the batch, in order of their first ticket.

    Args:
        twin: (T,) the first ticket with an identical mask, per ticket.
        bounds: (T + 1,) the grouping's offsets, as a list.
        skip: (T,) tickets to leave out (those another path computes), or None.

    Example:
        >>> [(c.ticket, c.tickets, c.rows) for c in present_classes([0, 1, 0], [0, 2, 2, 5])]
        [(0, (0, 2), 5)]
    """
    members = {}
    for t in range(len(bounds) - 1):
        rows = bounds[t + 1] - bounds[t]
        if rows and not (skip is not None and skip[t]):
            members.setdefault(twin[t], []).append((t, rows))
    return [MaskClass(rep, tuple(t for t, _ in ts), sum(r for _, r in ts)) for rep, ts in sorted(members.items())]


def class_rows(cls: MaskClass, perm: Tensor, bounds: Sequence[int]) -> Optional[Tensor]:
    """The batch rows of a class (int64), or None when it holds the whole batch (then the dense path runs on the
    batch as it is, with no gather and no scatter)."""
    if cls.rows == bounds[-1]:
        return None
    parts = [perm[bounds[t] : bounds[t + 1]] for t in cls.tickets]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
