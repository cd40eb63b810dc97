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
