"""The routed masked linear op: ``y[i] = x[i] @ (weight * masks[route[i]]).T + bias``.

Registered with torch.library as ``torch.ops.rtl_kernels.routed_masked_linear`` with a fake kernel and autograd,
so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work. The two gradient ops are custom ops too.
The backend is chosen at run time by :mod:`rtl_kernels.backends`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .autocast import autocast_inputs
from .backends import register_autograd_on_forward_backend, select_backend
from .grouping import TicketGrouping, checked_call_grouping, group_by_ticket_tensors


def _grouping(route: Tensor, num_tickets: int, perm: Optional[Tensor], offsets: Optional[Tensor]):
    if perm is None:
        perm, _, offsets = group_by_ticket_tensors(route, num_tickets)
    return perm, offsets


def _linear_impl(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    ticket_perm: Optional[Tensor] = None,
    ticket_offsets: Optional[Tensor] = None,
) -> Tensor:
    num_tickets = _checks.check_linear_args(x, weight, masks, route, bias)
    ticket_perm, ticket_offsets = checked_call_grouping(route, ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    bias = None if bias is None else bias.contiguous()
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0]))
    perm, offsets = _grouping(route, num_tickets, ticket_perm, ticket_offsets)
    backend = select_backend(x.device, x.dtype)
    return backend.linear_forward(x.contiguous(), weight.contiguous(), masks.contiguous(), bias, perm, offsets)


_routed_masked_linear = torch.library.custom_op("rtl_kernels::routed_masked_linear", mutates_args=())(_linear_impl)


@_routed_masked_linear.register_fake
def _(x, weight, masks, route, bias=None, ticket_perm=None, ticket_offsets=None):
    num_tickets = _checks.check_linear_args(x, weight, masks, route, bias)
    _checks.check_grouping(ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rtl_kernels::routed_masked_linear_grad_input", mutates_args=())
def _grad_input(
    grad_y: Tensor, weight: Tensor, masks: Tensor, route: Tensor, ticket_perm: Tensor, ticket_offsets: Tensor
) -> Tensor:
    if grad_y.shape[0] == 0:
        return grad_y.new_zeros((0, weight.shape[1]))
    backend = select_backend(grad_y.device, grad_y.dtype)
    return backend.linear_grad_input(
        grad_y.contiguous(), weight.contiguous(), masks.contiguous(), ticket_perm, ticket_offsets
    )


@_grad_input.register_fake
def _(grad_y, weight, masks, route, ticket_perm, ticket_offsets):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


@torch.library.custom_op("rtl_kernels::routed_masked_linear_grad_weight", mutates_args=())
def _grad_weight(
    grad_y: Tensor, x: Tensor, masks: Tensor, route: Tensor, ticket_perm: Tensor, ticket_offsets: Tensor
) -> Tensor:
    if grad_y.shape[0] == 0:
        return grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
    backend = select_backend(grad_y.device, grad_y.dtype)
    return backend.linear_grad_weight(
        grad_y.contiguous(), x.contiguous(), masks.contiguous(), ticket_perm, ticket_offsets
    )


@_grad_weight.register_fake
def _(grad_y, x, masks, route, ticket_perm, ticket_offsets):
    return grad_y.new_empty((grad_y.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, masks, route, bias, perm, offsets = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, masks, route, perm, offsets)


def _backward(ctx, grad_y):
    x, weight, masks, route, perm, offsets = ctx.saved_tensors
    # needs_input_grad lists only the inputs the caller passed (bias and the grouping have defaults)
    needs = tuple(ctx.needs_input_grad)
    needs_x, needs_w, _, _, needs_b = (needs + (False,) * 5)[:5]
    grad_y = grad_y.contiguous()
    perm, offsets = _grouping(route, masks.shape[0], perm, offsets)
    dx = dw = db = None
    if needs_x:
        dx = torch.ops.rtl_kernels.routed_masked_linear_grad_input(grad_y, weight, masks, route, perm, offsets)
    if needs_w:
        dw = torch.ops.rtl_kernels.routed_masked_linear_grad_weight(grad_y, x, masks, route, perm, offsets)
    if needs_b and ctx.has_bias:
        db = grad_y.sum(0)
    return (dx, dw, None, None, db, None, None)[: len(needs)]


register_autograd_on_forward_backend(_routed_masked_linear, _backward, _setup_context)


def routed_masked_linear(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    grouping: Optional[TicketGrouping] = None,
) -> Tensor:
    """Linear layer whose weight is masked per row by the ticket that row is routed to.

    ``y[i] = x[i] @ (weight * masks[route[i]]).T + bias``, computed without materialising T masked weights.
    Gradients: ``dx[i] = dy[i] @ (weight * masks[route[i]])``; ``dweight = sum_t masks[t] * dy_t.T @ x_t``, exactly
    zero outside the union of the masks of the tickets present; ``dbias = dy.sum(0)``. masks and route get none.

    Args:
        x (B, K): input rows, float32 (every backend) or float16/bfloat16 (GPU backends); float64 runs on the
            reference backend.
        weight (N, K): the one shared weight.
        masks (T, N, K) bool: one mask per ticket.
        route (B,) int32/int64: the ticket of each row, in [0, T).
        bias (N,) or None.
        grouping: optional :class:`TicketGrouping` from ``group_by_ticket(route, T)``, to group a batch once for
            every layer that shares its route. One made by group_by_ticket is trusted; any other is checked
            (a permutation of the rows grouping route, offsets from 0 to B) once per version of its tensors.

    Returns:
        y (B, N), x's dtype and device.

    NaN/inf in a row of x reach every output whose kept weights touch them and never another row. Through a
    weight the row's ticket prunes they may or may not (a dense masked GEMM computes inf * 0 = NaN, a sparse
    kernel never touches a pruned weight), so do not rely on either.

    Example:
        >>> W = torch.randn(5, 3); M = torch.rand(2, 5, 3) > 0.5
        >>> y = routed_masked_linear(torch.randn(4, 3), W, M, torch.tensor([0, 1, 1, 0]))
        >>> y.shape
        torch.Size([4, 5])
    """
    for name, value in (("x", x), ("weight", weight), ("masks", masks), ("route", route)):
        _checks.check_tensor(name, value)
    if bias is not None:
        _checks.check_tensor("bias", bias)
    perm = offsets = None
    if grouping is not None:
        perm, offsets = grouping.perm, grouping.offsets
    x, weight, bias = autocast_inputs(x, weight, bias)
    if _checks.eager_call_ok(x, weight, masks, route, bias, perm, offsets):
        return _linear_impl(x, weight, masks, route, bias, perm, offsets)
    return torch.ops.rtl_kernels.routed_masked_linear(x, weight, masks, route, bias, perm, offsets)
