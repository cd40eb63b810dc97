"""What a backend provides. Every backend receives already-validated tensors and a grouping of the batch.

Shapes used throughout:
    x (B, K), weight (N, K), masks bool (T, N, K), bias (N,) or None,
    perm (B,) int64 rows sorted by ticket, offsets (T + 1,) int64 (ticket t owns perm[offsets[t]:offsets[t + 1]]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class Backend:
    """Base class of the routed-op backends (reference, cpu, triton, cuda)."""

    name: str = "?"
    # True when the conv methods take images (x, grad_y) in any memory format; else the ops pass contiguous ones.
    accepts_strided_images: bool = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend can run on (device, dtype); else a one-line reason."""
        raise NotImplementedError

    # -- routed masked linear ------------------------------------------------------------------------------
    def linear_forward(
        self, x: Tensor, weight: Tensor, masks: Tensor, bias: Optional[Tensor], perm: Tensor, offsets: Tensor
    ) -> Tensor:
        """y (B, N) with y[i] = x[i] @ (weight * masks[route[i]]).T + bias."""
        raise NotImplementedError

    def linear_grad_input(self, grad_y: Tensor, weight: Tensor, masks: Tensor, perm: Tensor, offsets: Tensor) -> Tensor:
        """dx (B, K) with dx[i] = grad_y[i] @ (weight * masks[route[i]])."""
        raise NotImplementedError

    def linear_grad_weight(self, grad_y: Tensor, x: Tensor, masks: Tensor, perm: Tensor, offsets: Tensor) -> Tensor:
        """dW (N, K) = sum_t masks[t] * (grad_y[rows of t].T @ x[rows of t]); exactly zero outside the masks
        of the tickets present in the batch."""
        raise NotImplementedError

    # -- routed masked conv2d --------------------------------------------------------------------------------
    # Shapes: x (B, C, H, W), weight (O, C // groups, kh, kw), masks bool (T, O, C // groups, kh, kw), one route
    # per image; stride, padding, dilation are (int, int) with symmetric padding (the op resolves 'same'/'valid'
    # and asymmetric padding before calling). The transposed conv is composed from these three by the op.
    def conv2d_forward(
        self,
        x: Tensor,
        weight: Tensor,
        masks: Tensor,
        bias: Optional[Tensor],
        perm: Tensor,
        offsets: Tensor,
        stride: tuple,
        padding: tuple,
        dilation: tuple,
        groups: int,
    ) -> Tensor:
        """y (B, O, Ho, Wo) with y[i] = conv2d(x[i], weight * masks[route[i]], bias, ...)."""
        raise NotImplementedError

    def conv2d_grad_input(
        self,
        grad_y: Tensor,
        weight: Tensor,
        masks: Tensor,
        perm: Tensor,
        offsets: Tensor,
        input_shape: tuple,
        stride: tuple,
        padding: tuple,
        dilation: tuple,
        groups: int,
    ) -> Tensor:
        """dx (B, C, H, W) = conv2d's input gradient through weight * masks[route[i]] per image."""
        raise NotImplementedError

    def conv2d_grad_weight(
        self,
        grad_y: Tensor,
        x: Tensor,
        masks: Tensor,
        perm: Tensor,
        offsets: Tensor,
        stride: tuple,
        padding: tuple,
        dilation: tuple,
        groups: int,
    ) -> Tensor:
        """dW (O, C // groups, kh, kw) = sum_t masks[t] * conv2d weight gradient over the images of t; exactly zero
        outside the union of the masks of the tickets present."""
        raise NotImplementedError
