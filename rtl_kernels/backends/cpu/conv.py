"""The cpu backend's routed conv2d: the direct sparse convolution (csrc/cpu/routed_conv_kernels.cpp) for sparse
tickets, torch's convolution for the rest, chosen per call by :func:`policy.conv_path`:

- "dense": the tickets' masks fall into classes of identical masks; each class runs one torch convolution with
  its masked weight (the weight itself when the mask keeps everything) on its images, and a class holding the
  whole batch runs on the batch as it is. All-ones masks, or one ticket in the batch, cost one dense call.
- "image": small layers, and grouped or depthwise ones, run as ONE torch convolution grouped over the batch with a
  masked weight per image (pointwise convs: one batched matmul).
- "mixed": the sparse kernel for every ticket under the sparse density threshold, in one native call for the
  whole batch; the denser tickets by class as in "dense".

Shapes: x (B, C, H, W) in any memory format, weight (O, C / groups, kh, kw), masks (T, O, C / groups, kh, kw).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...conv_geometry import conv_output_size
from ...formats.conv_index import ConvIndex, compile_conv_index, input_gradient_index
from ...layout_cache import get_layout
from . import policy as _policy
from . import trace
from .classes import MaskClass, class_rows, present_classes
from .weights import apply_mask, masked_weight


def _depthwise(masks: Tensor) -> bool:
    """One input channel per group: masks (T, O, 1, kh, kw)."""
    return masks.shape[2] == 1


def index_of(masks: Tensor) -> ConvIndex:
    """The masks' compiled index (cached per mask version and indexing threshold). Depthwise layers index every
    ticket: their kernel runs at any density."""
    limit = 1.01 if _depthwise(masks) else _policy.current_policy().indexed_max_density
    return get_layout(f"cpu:conv2d:{limit}", masks, lambda m: compile_conv_index(m, limit))


class _Plan:
    """The path of a call: ``path``, the sparse tickets (uint8 (T,), mixed path) and the dense classes. It depends
    on the masks, the grouping's offsets and the policy only, so it is kept on the index for the next calls."""

    def __init__(self, index: ConvIndex, bounds: list, out_pixels: int, weight_numel: int, groups: int, pol):
        self.bounds = bounds
        density = index.density.tolist()
        twin = index.twin.tolist()
        classes = present_classes(twin, self.bounds)
        depthwise = index.masks_shape[2] == 1
        self.path = _policy.conv_path(
            self.bounds[-1], out_pixels, weight_numel, groups, depthwise, [density[c.ticket] for c in classes], pol
        )
        indexed = index.indexed.tolist()
        sparse = [False] * len(density)
        if self.path == "mixed":
            small = _policy.small_conv(self.bounds[-1], out_pixels, weight_numel, pol)
            sparse = [
                indexed[t] and _policy.conv_ticket_is_sparse(density[t], depthwise, small, pol)
                for t in range(len(density))
            ]
            classes = present_classes(twin, self.bounds, skip=sparse)
        self.sparse = torch.tensor(sparse, dtype=torch.uint8)
        self.any_sparse = any(sparse)
        self.classes: List[MaskClass] = classes
        self.all_ones = index.all_ones.tolist()
        self.sparse_tickets = sum(1 for t, s in enumerate(sparse) if s and self.bounds[t + 1] > self.bounds[t])

    def record(self, op: str, weight_shape) -> None:
        if trace.active():
            trace.record(
                op=op,
                weight_shape=tuple(weight_shape),
                path=self.path,
                sparse_tickets=self.sparse_tickets,
                dense_classes=len(self.classes) if self.path != "image" else 0,
            )

    def dense_classes(self, perm: Tensor):
        """(class, its images or None when it holds the batch) for the classes torch's convolution runs."""
        return [(c, class_rows(c, perm, self.bounds)) for c in self.classes]


_PLANS_KEPT = 16  # per layer: a model's batches share a few groupings (a last, smaller batch adds one)


def _plan(masks: Tensor, offsets: Tensor, out_pixels: int, weight_numel: int, groups: int) -> Tuple[ConvIndex, _Plan]:
    index = index_of(masks)
    bounds = offsets.tolist()
    pol = _policy.current_policy()
    key = (tuple(bounds), out_pixels, weight_numel, groups, pol)
    plan = index.plans.get(key)
    if plan is None:
        if len(index.plans) >= _PLANS_KEPT:
            index.plans.clear()
        plan = index.plans[key] = _Plan(index, bounds, out_pixels, weight_numel, groups, pol)
    return index, plan


def _empty_like_images(x: Tensor, shape) -> Tensor:
    """An output for x's images in x's memory format (channels_last stays channels_last, as F.conv2d does)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=x.dtype, memory_format=torch.channels_last)
    return x.new_empty(shape)


# -- forward --------------------------------------------------------------------------------------------------------
def forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
    ho, wo = (conv_output_size(*a) for a in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))
    index, plan = _plan(masks, offsets, ho * wo, weight.numel(), groups)
    plan.record("conv2d_forward", weight.shape)
    if plan.path == "image":
        return _image_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups)
    dense = plan.dense_classes(perm)
    if len(dense) == 1 and dense[0][1] is None:  # one class holds the batch: one torch convolution
        cls = dense[0][0]
        return F.conv2d(
            x,
            masked_weight(weight, masks, cls.ticket, plan.all_ones[cls.ticket]),
            bias,
            stride,
            padding,
            dilation,
            groups,
        )
    y = _empty_like_images(x, (x.shape[0], weight.shape[0], ho, wo))
    if plan.any_sparse:
        torch.ops.rtl_kernels._cpu_conv2d_forward(
            x,
            weight,
            bias,
            perm,
            offsets,
            plan.sparse,
            index.csr_ptr,
            index.csr_idx,
            stride,
            padding,
            dilation,
            groups,
            y,
        )
    for cls, rows in dense:
        w_t = masked_weight(weight, masks, cls.ticket, plan.all_ones[cls.ticket])
        y.index_copy_(0, rows, F.conv2d(x.index_select(0, rows), w_t, bias, stride, padding, dilation, groups))
    return y


# -- input gradient -------------------------------------------------------------------------------------------------
def grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
    index, plan = _plan(masks, offsets, grad_y.shape[2] * grad_y.shape[3], weight.numel(), groups)
    plan.record("conv2d_grad_input", weight.shape)
    if plan.path == "image":
        return _image_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups)
    dense = plan.dense_classes(perm)
    if len(dense) == 1 and dense[0][1] is None:
        cls = dense[0][0]
        return torch.nn.grad.conv2d_input(
            tuple(input_shape),
            masked_weight(weight, masks, cls.ticket, plan.all_ones[cls.ticket]),
            grad_y,
            stride,
            padding,
            dilation,
            groups,
        )
    dx = grad_y.new_empty(tuple(input_shape))
    if plan.any_sparse:
        if _depthwise(masks):
            ptr, entries = index.csr_ptr, index.csr_idx
        else:
            ptr, entries = input_gradient_index(index, masks, groups, stride, dilation)
        torch.ops.rtl_kernels._cpu_conv2d_grad_input(
            grad_y, weight, perm, offsets, plan.sparse, ptr, entries, stride, padding, dilation, groups, dx
        )
    for cls, rows in dense:
        w_t = masked_weight(weight, masks, cls.ticket, plan.all_ones[cls.ticket])
        dx.index_copy_(
            0,
            rows,
            torch.nn.grad.conv2d_input(
                (rows.shape[0],) + tuple(input_shape[1:]),
                w_t,
                grad_y.index_select(0, rows),
                stride,
                padding,
                dilation,
                groups,
            ),
        )
    return dx


# -- weight gradient ------------------------------------------------------------------------------------------------
def grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
    index, plan = _plan(masks, offsets, grad_y.shape[2] * grad_y.shape[3], masks[0].numel(), groups)
    plan.record("conv2d_grad_weight", masks.shape[1:])
    if plan.path == "image":
        return _image_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups)
    shape = tuple(masks.shape[1:])
    dw = grad_y.new_zeros(shape)
    if plan.any_sparse:
        torch.ops.rtl_kernels._cpu_conv2d_grad_weight(
            grad_y, x, perm, offsets, plan.sparse, index.csr_ptr, index.csr_idx, stride, padding, dilation, groups, dw
        )
    for cls, rows in plan.dense_classes(perm):
        x_t = x if rows is None else x.index_select(0, rows)
        dy_t = grad_y if rows is None else grad_y.index_select(0, rows)
        g = torch.nn.grad.conv2d_weight(x_t, shape, dy_t, stride, padding, dilation, groups)
        # each class's gradient masked by its own mask (exact zeros outside, inf/NaN included), classes in order
        dw += g if plan.all_ones[cls.ticket] else apply_mask(g, masks, cls.ticket, out=g)
    return dw


# -- the image path: a masked weight per image ---------------------------------------------------------------------
def _image_routes(perm: Tensor, offsets: Tensor) -> Tensor:
    """route (B,) int64 recovered from the grouping."""
    counts = offsets[1:] - offsets[:-1]
    route = torch.empty_like(perm)
    route[perm] = torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.int64), counts)
    return route


def _per_image_weights(weight: Tensor, masks: Tensor, route: Tensor) -> Tensor:
    """(B * O, C / g, kh, kw): image i's masked weight in rows [i * O, (i + 1) * O)."""
    fmasks = get_layout("cpu:conv2d:float_masks_all", masks, lambda m: m.to(torch.float32))
    w = weight.unsqueeze(0) * fmasks.index_select(0, route)
    if not bool(torch.isfinite(w.sum())):  # keep inf * 0 = NaN out of pruned positions
        w = torch.where(masks.index_select(0, route), weight.unsqueeze(0), torch.zeros((), dtype=weight.dtype))
    return w.reshape(-1, *weight.shape[1:])


def _pointwise(weight_shape, stride, padding, groups) -> bool:
    """A 1x1, stride 1, unpadded, ungrouped conv: a matrix product per image."""
    return tuple(weight_shape[2:]) == (1, 1) and groups == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _image_forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
    b = x.shape[0]
    w = _per_image_weights(weight, masks, _image_routes(perm, offsets))
    if _pointwise(weight.shape, stride, padding, groups):
        o, c = weight.shape[:2]
        y = torch.bmm(w.view(b, o, c), x.reshape(b, c, -1))
        if bias is not None:
            y += bias.view(1, -1, 1)
        return y.view(b, o, *x.shape[2:])
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, None, stride, padding, dilation, groups * b)
    y = y.view(b, weight.shape[0], *y.shape[2:])
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


def _image_grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
    b = grad_y.shape[0]
    w = _per_image_weights(weight, masks, _image_routes(perm, offsets))
    if _pointwise(weight.shape, stride, padding, groups):
        o, c = weight.shape[:2]
        return torch.bmm(w.view(b, o, c).transpose(1, 2), grad_y.reshape(b, o, -1)).view(input_shape)
    dx = torch.nn.grad.conv2d_input(
        (1, b * input_shape[1], *input_shape[2:]),
        w,
        grad_y.reshape(1, -1, *grad_y.shape[2:]),
        stride,
        padding,
        dilation,
        groups * b,
    )
    return dx.view(input_shape)


def _image_grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
    b = x.shape[0]
    route = _image_routes(perm, offsets)
    shape = tuple(masks.shape[1:])
    if _pointwise(shape, stride, padding, groups):
        o, c = shape[:2]
        per_image = torch.bmm(grad_y.reshape(b, o, -1), x.reshape(b, c, -1).transpose(1, 2))
        # summed per ticket in batch order (deterministic), then each ticket's sum masked by its own mask
        per_ticket = per_image.new_zeros((masks.shape[0], o, c)).index_add_(0, route, per_image)
        m2d = masks.reshape(masks.shape[0], o, c)
        return torch.where(m2d, per_ticket, torch.zeros((), dtype=per_ticket.dtype)).sum(0).view(shape)
    per_image = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]),
        (b * shape[0], *shape[1:]),
        grad_y.reshape(1, -1, *grad_y.shape[2:]),
        stride,
        padding,
        dilation,
        groups * b,
    ).view(b, *shape)
    # each image's gradient masked by its own ticket (where: exact zeros even for inf/NaN), summed in batch order
    return torch.where(masks.index_select(0, route), per_image, torch.zeros((), dtype=per_image.dtype)).sum(0)
