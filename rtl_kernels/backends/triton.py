"""The Triton backend: block-sparse routed kernels on CUDA (and on CPU under TRITON_INTERPRET=1, for tests).

The masks are compiled once (per mask version, through :mod:`rtl_kernels.layout_cache`) into a
:class:`~rtl_kernels.formats.block_csr.BlockCSR`; the kernels skip blocks a ticket does not keep and read the bool
mask inside the blocks it keeps partially, so results are exact for any mask. Every launch grid is computed from
shapes alone and the per-tile tables with torch ops on the device, so the routed path never synchronises with
the host and can be captured in a CUDA graph (the layout compile syncs, but happens once, before capture).

Triton is imported only when a kernel runs or availability is asked for: ``import rtl_kernels`` never imports it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..formats.block_csr import BlockCSR, compile_block_csr
from ..layout_cache import get_layout
from .base import Backend

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# numpy, which runs the interpreter, has no bfloat16.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _layout_blocks(n: int, k: int) -> Tuple[int, int]:
    """(block_n, block_k) of the layout, which are also the kernels' N and K tiles.

    64 matches the block granularity the pruning layer produces for GPU speed (block-sparse kernels beat dense from
    about 60 % sparsity at block 64, only at 90 % at block 32: docs/benchmarks.md), and a 64-wide tile keeps the
    tensor cores busy. Layers narrower than 64 get the next power of two, but at least 16, the smallest tile tl.dot
    accepts. The blocks depend on (N, K) only, not on the dtype or the batch, so forward and both backward passes, in
    any precision, share one compiled layout per mask version.
    """
    return min(64, max(16, _next_power_of_2(n))), min(64, max(16, _next_power_of_2(k)))


def _block_m(num_rows: int, num_tickets: int, dtype: torch.dtype) -> int:
    """Rows per tile, from the mean rows per ticket (a shape-only figure, so no sync).

    Each ticket's last tile is partly empty, so tiles no taller than the typical ticket waste less; 16 is the
    smallest tile tl.dot accepts. 16-bit inputs may take 128-row tiles (a 128x64 fp32 accumulator fits in the
    registers of 4 warps); fp32 runs exact-fp32 dots on FMA units, where 64 rows keep register pressure in check.
    These caps are the usual Triton matmul starting points, not yet tuned on this project's GPUs.
    """
    cap = 64 if dtype == torch.float32 else 128
    mean_rows = -(-num_rows // num_tickets)
    return min(cap, max(16, _next_power_of_2(mean_rows)))


# Warps of the conv kernels: their patch gathers keep per-row offsets, bounds and masks for every row a thread
# touches, which at 4 warps overflowed the 255 registers of sm_90 (docs/gpu_kernels.md); 8 warps halve that.
_CONV_WARPS = 8


def _conv_block_m(num_rows: int, num_tickets: int, dtype: torch.dtype, grad_weight: bool = False) -> int:
    """Pixel rows per tile of the conv kernels: as :func:`_block_m`, capped at 64 rows in every dtype.

    A 128-row gather tile spilled even at 8 warps. grad_weight's exact-fp32 dot (FMA units, no TF32) holds its
    operands in registers and takes 32 rows, the largest tile that compiles for sm_90 without spilling.
    """
    from ..triton_kernels import dot_precision

    cap = 32 if grad_weight and dot_precision(dtype) == "ieee" else 64
    return min(cap, _block_m(num_rows, num_tickets, dtype))


def _layout(masks: Tensor) -> BlockCSR:
    block_n, block_k = _layout_blocks(masks.shape[1], masks.shape[2])
    return get_layout(f"block_csr:{block_n}x{block_k}", masks, lambda m: compile_block_csr(m, block_n, block_k))


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pair(v) -> Tuple[int, int]:
    """(int, int) from an int or a pair (the conv kernels take each spatial axis apart)."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class TritonBackend(Backend):
    """Routed masked ops as Triton block-sparse kernels (fp32, fp16, bf16 on CUDA; fp32, fp16 interpreted on CPU)."""

    name = "triton"

    def __init__(self) -> None:
        self._import_error: Optional[str] = None
        self._import_checked = False

    def _triton_import_error(self) -> Optional[str]:
        if not self._import_checked:
            try:
                import triton  # noqa: F401
            except Exception as exc:  # a broken install is a reason, not a crash
                self._import_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
            self._import_checked = True
        return self._import_error

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self._triton_import_error()
        if reason is not None:
            return reason
        if device.type == "cuda":
            if dtype not in _CUDA_DTYPES:
                return f"dtype {dtype} is not supported on CUDA (float32, float16 or bfloat16)"
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return (
                    "Triton runs on CPU only under its interpreter (for tests): set TRITON_INTERPRET=1 "
                    "before triton is imported"
                )
            if dtype not in _INTERPRETER_DTYPES:
                return f"dtype {dtype} is not supported by the Triton interpreter on CPU (float32 or float16)"
            return None
        return f"Triton runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"

    def linear_forward(self, x, weight, masks, bias, perm, offsets):
        from ..triton_kernels.linear_forward import linear_forward

        block_m = _block_m(x.shape[0], masks.shape[0], x.dtype)
        with _on_device(x.device):
            return linear_forward(x, weight, masks, bias, perm, offsets, _layout(masks), block_m)

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        from ..triton_kernels.linear_grad_input import linear_grad_input

        block_m = _block_m(grad_y.shape[0], masks.shape[0], grad_y.dtype)
        with _on_device(grad_y.device):
            return linear_grad_input(grad_y, weight, masks, perm, offsets, _layout(masks), block_m)

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        from ..triton_kernels.linear_grad_weight import linear_grad_weight

        block_m = _block_m(grad_y.shape[0], masks.shape[0], grad_y.dtype)
        with _on_device(grad_y.device):
            return linear_grad_weight(grad_y, x, masks, perm, offsets, _layout(masks), block_m)

    # -- routed masked conv2d ----------------------------------------------------------------------------------
    # Implicit GEMMs over the ticket-sorted pixel rows, one kernel per pass (rtl_kernels/triton_kernels/conv2d_*).
    # First version: a dense loop over the (output channel, K) tiles of the (O, C/g*kh*kw) view with the bool mask
    # applied per tile through tl.where; a tile the ticket prunes entirely is skipped after its mask load (no
    # gather, no dot). No BlockCSR layout is compiled for conv yet, so nothing is cached per mask version.

    def conv2d_forward(self, x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
        """y (B, O, Ho, Wo) = routed masked conv2d; dense tile loop over W's (O, K) view, pruned tiles skipped."""
        from ..conv_geometry import conv_output_size
        from ..triton_kernels.conv2d_forward import conv2d_forward

        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        B = x.shape[0]
        O, Cg, kh, kw = weight.shape
        pixels = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0]) * conv_output_size(
            x.shape[3], kw, stride[1], padding[1], dilation[1]
        )
        block_n, block_k = _layout_blocks(O // groups, Cg * kh * kw)
        block_m = _conv_block_m(B * max(1, pixels), masks.shape[0], x.dtype)
        with _on_device(x.device):
            return conv2d_forward(
                x.contiguous(),
                weight.contiguous(),
                masks.contiguous(),
                bias,
                perm,
                offsets,
                stride,
                padding,
                dilation,
                groups,
                block_m,
                block_n,
                block_k,
                num_warps=_CONV_WARPS,
            )

    def conv2d_grad_input(self, grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
        """dx (B, C, H, W), scatter-free (each input pixel gathers the taps that read it); dense tile loop."""
        from ..triton_kernels.conv2d_grad_input import conv2d_grad_input

        B, C, H, W = (int(d) for d in input_shape)
        O, Cg, kh, kw = weight.shape
        block_c, block_j = _layout_blocks(Cg, (O // groups) * kh * kw)
        block_m = _conv_block_m(B * max(1, H * W), masks.shape[0], grad_y.dtype)
        with _on_device(grad_y.device):
            return conv2d_grad_input(
                grad_y.contiguous(),
                weight.contiguous(),
                masks.contiguous(),
                perm,
                offsets,
                (B, C, H, W),
                _pair(stride),
                _pair(padding),
                _pair(dilation),
                groups,
                block_m,
                block_c,
                block_j,
                num_warps=_CONV_WARPS,
            )

    def conv2d_grad_weight(self, grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
        """dW (O, C // groups, kh, kw), mask applied per ticket tile, written once; deterministic, no atomics."""
        from ..triton_kernels.conv2d_grad_weight import conv2d_grad_weight

        B, O, Ho, Wo = grad_y.shape
        _, _, Cg, kh, kw = masks.shape
        block_n, block_k = _layout_blocks(O // groups, Cg * kh * kw)
        block_m = _conv_block_m(B * max(1, Ho * Wo), masks.shape[0], grad_y.dtype, grad_weight=True)
        with _on_device(grad_y.device):
            return conv2d_grad_weight(
                grad_y.contiguous(),
                x.contiguous(),
                masks.contiguous(),
                perm,
                offsets,
                _pair(stride),
                _pair(padding),
                _pair(dilation),
                groups,
                block_m,
                block_n,
                block_k,
                num_warps=_CONV_WARPS,
            )


BACKEND = TritonBackend()
