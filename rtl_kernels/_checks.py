"""Argument checks shared by every op: clear errors that name the argument and the value.

Static checks (types, shapes, dtypes, devices) run in both the real and the fake kernels, so they also fire
under ``torch.compile``. Value checks (route ids in range) need the data and run only in the real kernels.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

_INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value, *, ndim: Optional[int] = None) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def check_route_dtype(route: Tensor) -> None:
    if route.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"route must be an integer tensor (torch.int32 or torch.int64) of ticket ids, got dtype {route.dtype}"
        )


def sync_checks() -> bool:
    """Whether GPU value checks read the values back (a clear ValueError, one host sync per call) instead of
    asserting on the device (no sync; a bad id stops the CUDA context with a device-side assert). Set
    RTL_KERNELS_SYNC_CHECKS=1 to debug a GPU run with the clear errors."""
    return os.environ.get("RTL_KERNELS_SYNC_CHECKS", "0") not in ("", "0")


def check_route_values(route: Tensor, num_tickets: int) -> None:
    """Value check: every route id in [0, num_tickets). On CPU (and on a GPU with :func:`sync_checks`) a bad id
    raises ValueError; on a GPU the check is a device-side assert that needs no host sync (skipped during graph
    capture)."""
    if route.numel() == 0:
        return
    if route.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if route.is_cuda and not sync_checks():
        inside = ((route >= 0) & (route < num_tickets)).all()
        torch._assert_async(inside, f"route holds a ticket id outside [0, {num_tickets})")
        return
    lo = int(route.min())
    hi = int(route.max())
    if lo < 0 or hi >= num_tickets:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"route holds ticket id {bad}, outside [0, {num_tickets}) (num_tickets = masks.shape[0] = {num_tickets})"
        )


def eager_call_ok(*tensors: Optional[Tensor]) -> bool:
    """True when an op may run its implementation directly, without the dispatcher: eager mode (no compile, no
    dispatch mode such as a fake-tensor or flop-counting one), plain tensors, and no autograd to record. The
    dispatcher's round trip costs about as much as a small layer's dense convolution on a CPU (see
    docs/cpu_backend.md)."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)


def check_same_device(**tensors: Optional[Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_grouping(perm: Optional[Tensor], offsets: Optional[Tensor], batch: int, num_tickets: int) -> None:
    if (perm is None) != (offsets is None):
        raise ValueError("ticket_perm and ticket_offsets must be given together (from rtl_kernels.group_by_ticket)")
    if perm is None:
        return
    check_tensor("ticket_perm", perm, ndim=1)
    check_tensor("ticket_offsets", offsets, ndim=1)
    if perm.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise TypeError(f"ticket_perm and ticket_offsets must be torch.int64, got {perm.dtype} and {offsets.dtype}")
    if perm.shape[0] != batch:
        raise ValueError(f"ticket_perm must have {batch} entries (the batch size), got {perm.shape[0]}")
    if offsets.shape[0] != num_tickets + 1:
        raise ValueError(
            f"ticket_offsets must have num_tickets + 1 = {num_tickets + 1} entries, got {offsets.shape[0]}"
        )


def check_grouping_values(route: Tensor, perm: Tensor, offsets: Tensor, num_tickets: int) -> None:
    """Value check of a grouping handed in by the caller: offsets rise from 0 to B, perm is a permutation of
    0..B-1 and it groups route by ticket. Every backend indexes rows through perm and offsets without bounds
    checks, so this runs before any of them; groupings made by group_by_ticket skip it (see grouping.py).
    Syncs with the device (skipped during graph capture)."""
    if perm.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    batch = perm.shape[0]
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != batch or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"ticket_offsets must rise from 0 to the batch size {batch} (from group_by_ticket), got {bounds}"
        )
    if batch == 0:
        return
    lo, hi = int(perm.min()), int(perm.max())
    if lo < 0 or hi >= batch:
        raise ValueError(f"ticket_perm holds row {lo if lo < 0 else hi}, outside the batch [0, {batch})")
    if not bool(torch.bincount(perm, minlength=batch).eq(1).all()):
        raise ValueError("ticket_perm must be a permutation of the rows (each row once), as group_by_ticket makes it")
    counts = offsets[1:] - offsets[:-1]
    tickets = torch.repeat_interleave(torch.arange(num_tickets, device=perm.device), counts)
    if not torch.equal(route.index_select(0, perm).to(torch.int64), tickets):
        raise ValueError("the grouping does not match route: make it with group_by_ticket(route, num_tickets)")


def check_masks(masks: Tensor, weight_shape: tuple) -> int:
    """Check masks is bool (T, *weight_shape); return T."""
    check_tensor("masks", masks)
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor (T, *weight.shape), got dtype {masks.dtype}")
    if masks.dim() != len(weight_shape) + 1 or tuple(masks.shape[1:]) != tuple(weight_shape):
        raise ValueError(
            f"masks must have shape (T, {', '.join(str(s) for s in weight_shape)}) to match weight, "
            f"got {tuple(masks.shape)}"
        )
    if masks.shape[0] < 1:
        raise ValueError("masks must hold at least one ticket (T >= 1), got T = 0")
    return masks.shape[0]


def check_linear_args(x: Tensor, weight: Tensor, masks: Tensor, route: Tensor, bias: Optional[Tensor]) -> int:
    """Static checks of routed_masked_linear's arguments; return the number of tickets T."""
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_tensor("route", route, ndim=1)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    num_tickets = check_masks(masks, tuple(weight.shape))
    check_route_dtype(route)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} features but weight expects in_features = {weight.shape[1]} "
            f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    if route.shape[0] != x.shape[0]:
        raise ValueError(f"route has {route.shape[0]} entries but x has {x.shape[0]} rows")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    check_same_device(x=x, weight=weight, masks=masks, route=route, bias=bias)
    return num_tickets
