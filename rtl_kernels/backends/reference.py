"""The reference backend: pure torch, any device and dtype. Ground truth for tests and the naive baseline (B1).

It loops over the tickets present, selects their rows (images for convs), runs F.linear / F.conv2d with
weight * masks[t] and writes the rows back. It syncs with the device to read the ticket counts, so it is not
capturable in a CUDA graph.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend


def _masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _present_tickets(perm: Tensor, offsets: Tensor):
    bounds = offsets.tolist()
    for t in range(len(bounds) - 1):
        lo, hi = bounds[t], bounds[t + 1]
        if hi > lo:
            yield t, perm[lo:hi]


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device, dtype):
        return None

    def linear_forward(self, x, weight, masks, bias, perm, offsets):
        y = x.new_empty((x.shape[0], weight.shape[0]))
        for t, rows in _present_tickets(perm, offsets):
            y[rows] = F.linear(x[rows], _masked_weight(weight, masks[t]), bias)
        return y

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        dx = grad_y.new_zeros((grad_y.shape[0], weight.shape[1]))
        for t, rows in _present_tickets(perm, offsets):
            dx[rows] = grad_y[rows] @ _masked_weight(weight, masks[t])
        return dx

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        dw = grad_y.new_zeros((grad_y.shape[1], x.shape[1]))
        zero = torch.zeros((), dtype=dw.dtype, device=dw.device)
        for t, rows in _present_tickets(perm, offsets):
            # where(), not a multiply: a NaN/inf gradient must still leave exact zeros outside the mask.
            dw += torch.where(masks[t], grad_y[rows].t() @ x[rows], zero)
        return dw

    def conv2d_forward(self, x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
        y = None
        for t, rows in _present_tickets(perm, offsets):
            y_t = F.conv2d(x[rows], _masked_weight(weight, masks[t]), bias, stride, padding, dilation, groups)
            if y is None:
                y = x.new_empty((x.shape[0],) + tuple(y_t.shape[1:]))
            y[rows] = y_t
        return y

    def conv2d_grad_input(self, grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
        dx = grad_y.new_zeros(input_shape)
        for t, rows in _present_tickets(perm, offsets):
            dx[rows] = torch.nn.grad.conv2d_input(
                (rows.shape[0],) + tuple(input_shape[1:]),
                _masked_weight(weight, masks[t]),
                grad_y[rows],
                stride,
                padding,
                dilation,
                groups,
            )
        return dx

    def conv2d_grad_weight(self, grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
        dw = grad_y.new_zeros(masks.shape[1:])
        zero = torch.zeros((), dtype=dw.dtype, device=dw.device)
        for t, rows in _present_tickets(perm, offsets):
            g = torch.nn.grad.conv2d_weight(x[rows], dw.shape, grad_y[rows], stride, padding, dilation, groups)
            dw += torch.where(masks[t], g, zero)
        return dw


BACKEND = ReferenceBackend()
