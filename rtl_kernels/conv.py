"""Routed masked convolutions: ``out[i] = conv(x[i], weight * masks[route[i]], bias, ...)``, one route per image.

``routed_masked_conv2d`` and ``routed_masked_conv_transpose2d`` are torch.library custom ops with fake kernels and
autograd. Backends implement three conv2d primitives (forward, input gradient, weight gradient, see
:class:`rtl_kernels.backends.base.Backend`); the transposed conv is their adjoint: its forward is the conv2d input
gradient, its input gradient the conv2d forward and its weight gradient the conv2d weight gradient with the roles
of input and output swapped, as U-Net decoders need.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .autocast import autocast_inputs
from .backends import register_autograd_on_forward_backend, select_backend
from .conv_geometry import conv_output_size, transposed_output_size
from .grouping import TicketGrouping, checked_call_grouping, group_by_ticket_tensors

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value: IntPair, minimum: int) -> List[int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    value = list(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return value


def _check_conv_args(x, weight, masks, route, bias, groups, *, transposed: bool) -> int:
    """Static checks shared by both convs; returns T. For transposed convs weight is (C_in, C_out/groups, kh, kw)."""
    _checks.check_tensor("x", x, ndim=4)
    _checks.check_tensor("weight", weight, ndim=4)
    _checks.check_tensor("route", route, ndim=1)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    num_tickets = _checks.check_masks(masks, tuple(weight.shape))
    _checks.check_route_dtype(route)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    channels = x.shape[1]
    if channels % groups:
        raise ValueError(f"x has {channels} channels, not divisible by groups = {groups}")
    if transposed:
        if weight.shape[0] != channels:
            raise ValueError(
                f"x has {channels} channels but the transposed weight {tuple(weight.shape)} expects "
                f"in_channels = {weight.shape[0]}"
            )
    else:
        if weight.shape[0] % groups:
            raise ValueError(f"weight has {weight.shape[0]} output channels, not divisible by groups = {groups}")
        if weight.shape[1] * groups != channels:
            raise ValueError(
                f"x has {channels} channels but weight {tuple(weight.shape)} with groups = {groups} expects "
                f"{weight.shape[1] * groups}"
            )
    if route.shape[0] != x.shape[0]:
        raise ValueError(f"route has {route.shape[0]} entries but x has {x.shape[0]} images")
    if bias is not None:
        out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
        _checks.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    _checks.check_same_device(x=x, weight=weight, masks=masks, route=route, bias=bias)
    return num_tickets


def _check_geometry(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    kh, kw = weight.shape[2], weight.shape[3]
    h, w = x.shape[2], x.shape[3]
    eff_h, eff_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if h + 2 * padding[0] < eff_h or w + 2 * padding[1] < eff_w:
        raise ValueError(
            f"input of spatial size ({h}, {w}) with padding {tuple(padding)} is smaller than the dilated kernel "
            f"({eff_h}, {eff_w})"
        )
    return (
        conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    )


def _grouping(route, num_tickets, perm, offsets):
    if perm is None:
        perm, _, offsets = group_by_ticket_tensors(route, num_tickets)
    return perm, offsets


def _t(v) -> tuple:
    return (int(v[0]), int(v[1]))


def _images(backend, t: Tensor) -> Tensor:
    """Images as the backend takes them: in their own memory format where it reads any, else contiguous."""
    return t if backend.accepts_strided_images else t.contiguous()


# -- conv2d ----------------------------------------------------------------------------------------------------


def _conv2d_impl(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    stride: List[int] = (1, 1),
    padding: List[int] = (0, 0),
    dilation: List[int] = (1, 1),
    groups: int = 1,
    ticket_perm: Optional[Tensor] = None,
    ticket_offsets: Optional[Tensor] = None,
) -> Tensor:
    num_tickets = _check_conv_args(x, weight, masks, route, bias, groups, transposed=False)
    ho, wo = _check_geometry(x, weight, stride, padding, dilation)
    ticket_perm, ticket_offsets = checked_call_grouping(route, ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    bias = None if bias is None else bias.contiguous()
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[0], ho, wo))
    perm, offsets = _grouping(route, num_tickets, ticket_perm, ticket_offsets)
    backend = select_backend(x.device, x.dtype)
    return backend.conv2d_forward(
        _images(backend, x),
        weight.contiguous(),
        masks.contiguous(),
        bias,
        perm,
        offsets,
        _t(stride),
        _t(padding),
        _t(dilation),
        groups,
    )


_routed_masked_conv2d = torch.library.custom_op(
    "rtl_kernels::routed_masked_conv2d",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor masks, Tensor route, Tensor? bias=None, int[2] stride=[1, 1], "
    "int[2] padding=[0, 0], int[2] dilation=[1, 1], int groups=1, Tensor? ticket_perm=None, "
    "Tensor? ticket_offsets=None) -> Tensor",
)(_conv2d_impl)


@_routed_masked_conv2d.register_fake
def _(
    x,
    weight,
    masks,
    route,
    bias=None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups=1,
    ticket_perm=None,
    ticket_offsets=None,
):
    num_tickets = _check_conv_args(x, weight, masks, route, bias, groups, transposed=False)
    _checks.check_grouping(ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    ho, wo = _check_geometry(x, weight, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo))


@torch.library.custom_op("rtl_kernels::routed_masked_conv2d_grad_input", mutates_args=())
def _conv2d_grad_input(
    grad_y: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    ticket_perm: Tensor,
    ticket_offsets: Tensor,
    input_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    if grad_y.shape[0] == 0:
        return grad_y.new_zeros(tuple(input_shape))
    backend = select_backend(grad_y.device, grad_y.dtype)
    return backend.conv2d_grad_input(
        _images(backend, grad_y),
        weight.contiguous(),
        masks.contiguous(),
        ticket_perm,
        ticket_offsets,
        tuple(int(s) for s in input_shape),
        _t(stride),
        _t(padding),
        _t(dilation),
        groups,
    )


@_conv2d_grad_input.register_fake
def _(grad_y, weight, masks, route, ticket_perm, ticket_offsets, input_shape, stride, padding, dilation, groups):
    return grad_y.new_empty(tuple(input_shape))


@torch.library.custom_op("rtl_kernels::routed_masked_conv2d_grad_weight", mutates_args=())
def _conv2d_grad_weight(
    grad_y: Tensor,
    x: Tensor,
    masks: Tensor,
    route: Tensor,
    ticket_perm: Tensor,
    ticket_offsets: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    if grad_y.shape[0] == 0:
        return grad_y.new_zeros(tuple(masks.shape[1:]))
    backend = select_backend(grad_y.device, grad_y.dtype)
    return backend.conv2d_grad_weight(
        _images(backend, grad_y),
        _images(backend, x),
        masks.contiguous(),
        ticket_perm,
        ticket_offsets,
        _t(stride),
        _t(padding),
        _t(dilation),
        groups,
    )


@_conv2d_grad_weight.register_fake
def _(grad_y, x, masks, route, ticket_perm, ticket_offsets, stride, padding, dilation, groups):
    return grad_y.new_empty(tuple(masks.shape[1:]))


def _needs(ctx, count):
    return (tuple(ctx.needs_input_grad) + (False,) * count)[:count]


def _conv2d_setup(ctx, inputs, output):
    x, weight, masks, route, bias, stride, padding, dilation, groups, perm, offsets = list(inputs) + [None] * (
        11 - len(inputs)
    )
    ctx.geometry = (list(stride or (1, 1)), list(padding or (0, 0)), list(dilation or (1, 1)), groups or 1)
    ctx.has_bias = bias is not None
    ctx.input_shape = list(x.shape)
    ctx.save_for_backward(x, weight, masks, route, perm, offsets)


def _conv2d_backward(ctx, grad_y):
    x, weight, masks, route, perm, offsets = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    needs_x, needs_w, _, _, needs_b = _needs(ctx, 5)
    perm, offsets = _grouping(route, masks.shape[0], perm, offsets)
    dx = dw = db = None
    if needs_x:
        dx = torch.ops.rtl_kernels.routed_masked_conv2d_grad_input(
            grad_y, weight, masks, route, perm, offsets, ctx.input_shape, stride, padding, dilation, groups
        )
    if needs_w:
        dw = torch.ops.rtl_kernels.routed_masked_conv2d_grad_weight(
            grad_y, x, masks, route, perm, offsets, stride, padding, dilation, groups
        )
    if needs_b and ctx.has_bias:
        db = grad_y.sum((0, 2, 3))
    return (dx, dw, None, None, db, None, None, None, None, None, None)[: len(ctx.needs_input_grad)]


register_autograd_on_forward_backend(_routed_masked_conv2d, _conv2d_backward, _conv2d_setup)


def _resolve_padding(x: Tensor, weight: Tensor, padding, stride, dilation):
    """Integer padding for the op; 'same' with an even dilated kernel pads x itself (asymmetric), as F.conv2d."""
    if isinstance(padding, str):
        if padding == "valid":
            return x, [0, 0]
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if stride != [1, 1]:
            raise ValueError(f"padding='same' needs stride 1 (as F.conv2d), got stride {tuple(stride)}")
        pads, extra = [], []
        for k, d in zip(weight.shape[2:], dilation):
            total = d * (k - 1)
            pads.append(total // 2)
            extra.append(total - 2 * (total // 2))
        if any(extra):  # the odd pixel goes after, as F.conv2d does
            x = F.pad(x, (0, extra[1], 0, extra[0]))
        return x, pads
    return x, _pair("padding", padding, 0)


def routed_masked_conv2d(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    grouping: Optional[TicketGrouping] = None,
) -> Tensor:
    """2-D convolution whose weight is masked per image by the ticket the image is routed to.

    ``out[i] = F.conv2d(x[i], weight * masks[route[i]], bias, stride, padding, dilation, groups)``, computed without
    materialising T masked weights. Gradients as for :func:`rtl_kernels.routed_masked_linear`: dweight is exactly
    zero outside the union of the masks of the tickets present.

    Args:
        x (B, C, H, W): images (any memory format; channels_last is accepted).
        weight (O, C // groups, kh, kw): the one shared weight.
        masks (T, O, C // groups, kh, kw) bool: one mask per ticket.
        route (B,) int32/int64: the ticket of each image, in [0, T).
        bias (O,) or None.
        stride, padding, dilation, groups: as F.conv2d (padding also 'same' or 'valid').
        grouping: optional :class:`TicketGrouping` of route, to group a batch once for every layer.

    Returns:
        (B, O, Ho, Wo).

    Example:
        >>> W = torch.randn(4, 3, 3, 3); M = torch.rand(2, 4, 3, 3, 3) > 0.5
        >>> routed_masked_conv2d(torch.randn(5, 3, 8, 8), W, M, torch.tensor([0, 1, 1, 0, 1]), padding=1).shape
        torch.Size([5, 4, 8, 8])
    """
    for name, value in (("x", x), ("weight", weight), ("masks", masks), ("route", route)):
        _checks.check_tensor(name, value)
    if bias is not None:
        _checks.check_tensor("bias", bias)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (O, C // groups, kh, kw), got shape {tuple(weight.shape)}")
    x, padding = _resolve_padding(x, weight, padding, stride, dilation)
    perm = offsets = None
    if grouping is not None:
        perm, offsets = grouping.perm, grouping.offsets
    x, weight, bias = autocast_inputs(x, weight, bias)
    if _checks.eager_call_ok(x, weight, masks, route, bias, perm, offsets):
        return _conv2d_impl(x, weight, masks, route, bias, stride, padding, dilation, groups, perm, offsets)
    return torch.ops.rtl_kernels.routed_masked_conv2d(
        x, weight, masks, route, bias, stride, padding, dilation, groups, perm, offsets
    )


# -- conv_transpose2d ------------------------------------------------------------------------------------------


def _transposed_shape(x, weight, stride, padding, output_padding, dilation, groups):
    for i in range(2):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(
                f"output_padding {tuple(output_padding)} must be smaller than stride or dilation "
                f"(stride {tuple(stride)}, dilation {tuple(dilation)})"
            )
    ho = transposed_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0], output_padding[0])
    wo = transposed_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1], output_padding[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"the transposed conv's output would be {ho}x{wo}: padding {tuple(padding)} is too large")
    return [x.shape[0], weight.shape[1] * groups, ho, wo]


def _conv_transpose2d_impl(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    stride: List[int] = (1, 1),
    padding: List[int] = (0, 0),
    output_padding: List[int] = (0, 0),
    groups: int = 1,
    dilation: List[int] = (1, 1),
    ticket_perm: Optional[Tensor] = None,
    ticket_offsets: Optional[Tensor] = None,
) -> Tensor:
    num_tickets = _check_conv_args(x, weight, masks, route, bias, groups, transposed=True)
    out_shape = _transposed_shape(x, weight, stride, padding, output_padding, dilation, groups)
    ticket_perm, ticket_offsets = checked_call_grouping(route, ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    bias = None if bias is None else bias.contiguous()
    if x.shape[0] == 0:
        return x.new_empty(out_shape)
    perm, offsets = _grouping(route, num_tickets, ticket_perm, ticket_offsets)
    backend = select_backend(x.device, x.dtype)
    # The transposed conv is the input gradient of the conv2d whose weight (C_in, C_out/g, kh, kw) maps the
    # output's C_out channels to x's C_in channels.
    y = backend.conv2d_grad_input(
        _images(backend, x),
        weight.contiguous(),
        masks.contiguous(),
        perm,
        offsets,
        tuple(out_shape),
        _t(stride),
        _t(padding),
        _t(dilation),
        groups,
    )
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


_routed_masked_conv_transpose2d = torch.library.custom_op(
    "rtl_kernels::routed_masked_conv_transpose2d",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor masks, Tensor route, Tensor? bias=None, int[2] stride=[1, 1], "
    "int[2] padding=[0, 0], int[2] output_padding=[0, 0], int groups=1, int[2] dilation=[1, 1], "
    "Tensor? ticket_perm=None, Tensor? ticket_offsets=None) -> Tensor",
)(_conv_transpose2d_impl)


@_routed_masked_conv_transpose2d.register_fake
def _(
    x,
    weight,
    masks,
    route,
    bias=None,
    stride=(1, 1),
    padding=(0, 0),
    output_padding=(0, 0),
    groups=1,
    dilation=(1, 1),
    ticket_perm=None,
    ticket_offsets=None,
):
    num_tickets = _check_conv_args(x, weight, masks, route, bias, groups, transposed=True)
    _checks.check_grouping(ticket_perm, ticket_offsets, x.shape[0], num_tickets)
    return x.new_empty(_transposed_shape(x, weight, stride, padding, output_padding, dilation, groups))


def _transpose_setup(ctx, inputs, output):
    x, weight, masks, route, bias, stride, padding, output_padding, groups, dilation, perm, offsets = list(inputs) + [
        None
    ] * (12 - len(inputs))
    ctx.geometry = (list(stride or (1, 1)), list(padding or (0, 0)), list(dilation or (1, 1)), groups or 1)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, masks, route, perm, offsets)


def _transpose_backward(ctx, grad_y):
    x, weight, masks, route, perm, offsets = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    needs_x, needs_w, _, _, needs_b = _needs(ctx, 5)
    perm, offsets = _grouping(route, masks.shape[0], perm, offsets)
    dx = dw = db = None
    if needs_x:  # adjoint of the conv2d input gradient: the conv2d itself
        dx = torch.ops.rtl_kernels.routed_masked_conv2d(
            grad_y, weight, masks, route, None, stride, padding, dilation, groups, perm, offsets
        )
    if needs_w:  # conv2d weight gradient with x as the "output gradient" and grad_y as the "input"
        dw = torch.ops.rtl_kernels.routed_masked_conv2d_grad_weight(
            x, grad_y, masks, route, perm, offsets, stride, padding, dilation, groups
        )
    if needs_b and ctx.has_bias:
        db = grad_y.sum((0, 2, 3))
    return (dx, dw, None, None, db, None, None, None, None, None, None, None)[: len(ctx.needs_input_grad)]


register_autograd_on_forward_backend(_routed_masked_conv_transpose2d, _transpose_backward, _transpose_setup)


def routed_masked_conv_transpose2d(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    route: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    grouping: Optional[TicketGrouping] = None,
) -> Tensor:
    """Transposed 2-D convolution with the weight masked per image by its ticket (F.conv_transpose2d semantics).

    Args:
        x (B, C_in, H, W).
        weight (C_in, C_out // groups, kh, kw): the one shared weight.
        masks (T, C_in, C_out // groups, kh, kw) bool.
        route (B,) int32/int64 in [0, T).
        bias (C_out,) or None.
        stride, padding, output_padding, groups, dilation: as F.conv_transpose2d.
        grouping: optional :class:`TicketGrouping` of route.

    Returns:
        (B, C_out, Ho, Wo), Ho = (H - 1) * stride - 2 * padding + dilation * (kh - 1) + output_padding + 1.

    Example:
        >>> W = torch.randn(4, 2, 3, 5); M = torch.rand(3, 4, 2, 3, 5) > 0.5
        >>> routed_masked_conv_transpose2d(torch.randn(2, 4, 6, 6), W, M, torch.tensor([2, 0]),
        ...                                stride=(1, 2), padding=(1, 2), output_padding=(0, 1)).shape
        torch.Size([2, 2, 6, 12])
    """
    for name, value in (("x", x), ("weight", weight), ("masks", masks), ("route", route)):
        _checks.check_tensor(name, value)
    if bias is not None:
        _checks.check_tensor("bias", bias)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_in, C_out // groups, kh, kw), got shape {tuple(weight.shape)}")
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    output_padding = _pair("output_padding", output_padding, 0)
    dilation = _pair("dilation", dilation, 1)
    perm = offsets = None
    if grouping is not None:
        perm, offsets = grouping.perm, grouping.offsets
    x, weight, bias = autocast_inputs(x, weight, bias)
    if _checks.eager_call_ok(x, weight, masks, route, bias, perm, offsets):
        return _conv_transpose2d_impl(
            x, weight, masks, route, bias, stride, padding, output_padding, groups, dilation, perm, offsets
        )
    return torch.ops.rtl_kernels.routed_masked_conv_transpose2d(
        x, weight, masks, route, bias, stride, padding, output_padding, groups, dilation, perm, offsets
    )
