"""Autocast for the routed ops: inside ``torch.autocast(device_type, dtype)`` their floating inputs are cast to the
autocast dtype, as torch casts the inputs of its own linear and convolution, so the ops run their kernels in that
dtype (bf16 or fp16 on a GPU). float64 inputs are left as they are, as torch leaves them. The cast is on the
autograd graph: gradients reach the float32 parameters in float32."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["autocast_inputs"]


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(x, weight, bias) in the autocast dtype of x's device type when autocast is on there, else unchanged.

    Args:
        x (B, ...): the op's input; its device type decides which autocast state applies.
        weight: the shared weight.
        bias: the bias or None.

    Returns:
        The three, each cast when it is a floating tensor other than float64 and not yet in the autocast dtype.
    """
    device_type = x.device.type
    # devices without autocast (meta, ...) have no state to ask; the op's own checks then speak about them
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)
