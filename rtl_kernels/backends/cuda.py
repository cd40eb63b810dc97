"""The cuda backend: hand-written CUDA kernels (``rtl_kernels._C_cuda``) over a block-CSR layout of the masks.

The masks are compiled once per mask version (:mod:`rtl_kernels.layout_cache`) into a
:class:`~rtl_kernels.formats.block_csr.BlockCSR` of 64 x 64 blocks on the masks' device; the kernels read W and
the bool masks through it, skip blocks a ticket does not keep and apply the mask inside partially kept blocks, so
results are exact for any mask. Rows are grouped by ticket through ``perm``/``offsets`` on the device: no kernel
here syncs with the host, so a forward can be captured in a CUDA graph once the layout is compiled.

Why 64 x 64 blocks: the kernels' tile is 64 (rows) x 64 (outputs) x 64 (inputs), the largest whose two fp16 operand
tiles plus the fp32 result fit in static shared memory (36 KB) with several blocks resident per SM, and one layout
block = one tile step, so no index arithmetic inside the loop. PyTorch's block-sparse kernels (docs/benchmarks.md,
figures from elsewhere) beat dense from about 60 % sparsity at block 64 but only at 90 % for block 32, while 128
blocks would make block-granular pruning coarser and unstructured masks (which fill nearly every block anyway) no
faster.

Importing this module imports only torch; the extension is loaded on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import _extension
from ..layout_cache import get_layout
from .base import Backend

BLOCK_N = 64  # rows of W per layout block (= the kernels' output tile of the forward)
BLOCK_K = 64  # columns of W per layout block (= the kernels' output tile of grad_input)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Same key as the triton backend uses for 64x64 blocks: both backends share one compiled layout per mask version.
_LAYOUT_KIND = f"block_csr:{BLOCK_N}x{BLOCK_K}"


def _compile(masks: Tensor):
    """BlockCSR of masks (T, N, K) on the masks' device (compile_block_csr already places it there; moved if not)."""
    from ..formats.block_csr import compile_block_csr  # lazy: keeps this module's import to torch only

    layout = compile_block_csr(masks, BLOCK_N, BLOCK_K)
    fields = ("row_ptr", "col_idx", "full", "t_col_ptr", "t_row_idx", "t_full", "w_ptr", "w_tickets")
    if any(getattr(layout, f).device != masks.device for f in fields):
        layout = dataclasses.replace(layout, **{f: getattr(layout, f).to(masks.device) for f in fields})
    return layout


def _layout(masks: Tensor):
    return get_layout(_LAYOUT_KIND, masks, _compile)


def _ops():
    module, reason = _extension.load("_C_cuda")
    if module is None:
        raise RuntimeError(f"the cuda backend cannot run: {reason}")
    return torch.ops.rtl_kernels


def _conv_out_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation):
    """(Ho, Wo) of a conv2d as F.conv2d computes them; ValueError when the output would be empty."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"conv2d output would be empty ({ho} x {wo}) for input {h} x {w}, kernel {kh} x {kw}, stride {stride}, "
            f"padding {padding}, dilation {dilation}"
        )
    return ho, wo


class CudaBackend(Backend):
    """Routed masked linear and conv2d on CUDA tensors (linear: float32 exact SIMT, float16/bfloat16 on tensor
    cores; conv2d: fp32-accumulating SIMT implicit GEMM for all three dtypes)."""

    name = "cuda"

    def __init__(self) -> None:
        self._device_problems: Dict[int, Optional[str]] = {}

    def unavailable_reason(self, device, dtype):
        _, reason = _extension.load("_C_cuda")
        if reason is not None:
            return reason
        device = torch.device(device)
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if dtype not in _DTYPES:
            return f"the cuda backend supports float32, float16 and bfloat16, not {dtype}"
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._device_problems:
            # Compute capability and presence of a kernel image for it (TORCH_CUDA_ARCH_LIST at build time).
            problem = torch.ops.rtl_kernels._cuda_device_problem(index)
            self._device_problems[index] = problem or None
        return self._device_problems[index]

    # -- routed masked linear ------------------------------------------------------------------------------
    def linear_forward(self, x, weight, masks, bias, perm, offsets):
        n, k = weight.shape
        y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        if n == 0 or x.shape[0] == 0:
            return y
        if k == 0:  # no inputs: every row is the bias
            return y.copy_(bias.expand_as(y)) if bias is not None else y.zero_()
        layout = _layout(masks)
        _ops()._cuda_linear_forward(
            x,
            weight,
            masks,
            None if bias is None else bias.contiguous(),
            perm,
            offsets,
            layout.row_ptr,
            layout.col_idx,
            layout.full,
            BLOCK_N,
            BLOCK_K,
            y,
        )
        return y

    def linear_grad_input(self, grad_y, weight, masks, perm, offsets):
        n, k = weight.shape
        if n == 0 or k == 0 or grad_y.shape[0] == 0:
            return grad_y.new_zeros((grad_y.shape[0], k))
        dx = torch.empty((grad_y.shape[0], k), dtype=grad_y.dtype, device=grad_y.device)
        layout = _layout(masks)
        _ops()._cuda_linear_grad_input(
            grad_y,
            weight,
            masks,
            perm,
            offsets,
            layout.t_col_ptr,
            layout.t_row_idx,
            layout.t_full,
            BLOCK_N,
            BLOCK_K,
            dx,
        )
        return dx

    def linear_grad_weight(self, grad_y, x, masks, perm, offsets):
        n, k = grad_y.shape[1], x.shape[1]
        if n == 0 or k == 0 or grad_y.shape[0] == 0:
            return grad_y.new_zeros((n, k))
        dw = torch.empty((n, k), dtype=grad_y.dtype, device=grad_y.device)  # every element written by the kernel
        layout = _layout(masks)
        _ops()._cuda_linear_grad_weight(
            grad_y,
            x,
            masks,
            perm,
            offsets,
            layout.w_ptr,
            layout.w_tickets,
            BLOCK_N,
            BLOCK_K,
            dw,
        )
        return dw

    # -- routed masked conv2d (implicit GEMM, csrc/cuda/routed_conv2d_kernels.cu; masks read directly, no layout) --
    def conv2d_forward(self, x, weight, masks, bias, perm, offsets, stride, padding, dilation, groups):
        b, _, h, w = x.shape
        o, _, kh, kw = weight.shape
        ho, wo = _conv_out_hw(h, w, kh, kw, stride, padding, dilation)
        y = torch.empty((b, o, ho, wo), dtype=x.dtype, device=x.device)  # every element written by the kernel
        if y.numel() == 0:
            return y
        _ops()._cuda_conv2d_forward(
            x.contiguous(),
            weight.contiguous(),
            masks.contiguous(),
            None if bias is None else bias.contiguous(),
            perm,
            offsets,
            list(stride),
            list(padding),
            list(dilation),
            int(groups),
            y,
        )
        return y

    def conv2d_grad_input(self, grad_y, weight, masks, perm, offsets, input_shape, stride, padding, dilation, groups):
        dx = torch.empty(tuple(input_shape), dtype=grad_y.dtype, device=grad_y.device)
        if dx.numel() == 0:
            return dx
        if grad_y.numel() == 0:  # no output channels (or pixels): nothing flows back
            return dx.zero_()
        _ops()._cuda_conv2d_grad_input(
            grad_y.contiguous(),
            weight.contiguous(),
            masks.contiguous(),
            perm,
            offsets,
            list(stride),
            list(padding),
            list(dilation),
            int(groups),
            dx,
        )
        return dx

    def conv2d_grad_weight(self, grad_y, x, masks, perm, offsets, stride, padding, dilation, groups):
        dw = torch.empty(tuple(masks.shape[1:]), dtype=grad_y.dtype, device=grad_y.device)
        if dw.numel() == 0:
            return dw
        if grad_y.numel() == 0 or x.numel() == 0:  # no images (or pixels): the gradient is zero
            return dw.zero_()
        _ops()._cuda_conv2d_grad_weight(
            grad_y.contiguous(),
            x.contiguous(),
            masks.contiguous(),
            perm,
            offsets,
            list(stride),
            list(padding),
            list(dilation),
            int(groups),
            dw,
        )
        return dw


BACKEND = CudaBackend()
