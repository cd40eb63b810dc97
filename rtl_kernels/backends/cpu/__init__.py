"""The cpu backend: C++ sparse kernels (csrc/cpu) for sparse tickets, torch's dense kernels for the others.

- :mod:`.policy`: every threshold and the path choice, as small pure functions (and a per-thread override);
- :mod:`.linear`: the routed linear;
- :mod:`.conv`: the routed conv2d (the transposed conv is composed from it by the op);
- :mod:`.classes`: tickets with identical masks run once;
- :mod:`.weights`: scratch buffers and masked weights of the dense paths.

The mask layouts the kernels read are built in :mod:`rtl_kernels.formats` (``cpu_csr``, ``conv_index``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ... import _extension
from ..base import Backend
from . import conv, linear, policy  # noqa: F401 (policy: the path thresholds, rtl_kernels.backends.cpu.policy)

# RTL_CPU_ISA caps the instruction set the C++ kernels choose (the extension reads it once, when it first runs, and
# would take a value it does not know as no cap): checked here, so that a misspelt cap fails instead.
CPU_ISA_CAPS = ("generic", "avx2", "avx512")


def isa_cap_from_env() -> Optional[str]:
    """RTL_CPU_ISA if set and not empty (one of CPU_ISA_CAPS, else ValueError), or None."""
    cap = os.environ.get("RTL_CPU_ISA") or None
    if cap is not None and cap not in CPU_ISA_CAPS:
        raise ValueError(f"RTL_CPU_ISA must be one of {', '.join(CPU_ISA_CAPS)} (or unset), got {cap!r}")
    return cap


isa_cap_from_env()  # a misspelt cap fails this package's import: the backend is unavailable, with this reason


class CpuBackend(Backend):
    name = "cpu"
    accepts_strided_images = True

    def unavailable_reason(self, device, dtype):
        module, reason = _extension.load("_C")
        if module is None:
            return reason
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only, got device {device}"
        if dtype != torch.float32:
            return f"the cpu backend computes in float32 only, got {dtype}"
        return None

    def linear_forward(self, x, weight, masks, bias, perm, offsets):
        return linear.forward(x, weight, masks, linear.layout_of(masks), bias, perm, offsets)

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        return linear.grad_input(grad_y, weight, masks, linear.layout_of(masks), perm, offsets)

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        return linear.grad_weight(grad_y, x, masks, linear.layout_of(masks), perm, offsets)

    def conv2d_forward(self, x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
        return conv.forward(x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups)

    def conv2d_grad_input(self, grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
        return conv.grad_input(grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups)

    def conv2d_grad_weight(self, grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
        return conv.grad_weight(grad_y, x, masks, perm, offsets, stride, padding, dilation, groups)


BACKEND = CpuBackend()
