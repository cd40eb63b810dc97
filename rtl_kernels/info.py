"""``python -m rtl_kernels.info``: versions, and which backends can run here and why not."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__
from ._extension import load
from .backends import get_backend, unavailable_reasons


def report() -> str:
    """The text printed by ``python -m rtl_kernels.info``."""
    lines = [
        f"rtl_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda})",
    ]
    try:
        import importlib.metadata as md

        lines.append(f"triton {md.version('triton')}")
    except Exception:
        lines.append("triton: not installed")
    cpu_ext, why = load("_C")
    if cpu_ext is not None:
        lines.append(f"rtl_kernels._C: loaded, kernels use {torch.ops.rtl_kernels._cpu_kernel_isa()}")
    else:
        lines.append(f"rtl_kernels._C: {why}")
    cuda_ext, why = load("_C_cuda")
    lines.append("rtl_kernels._C_cuda: loaded" if cuda_ext is not None else f"rtl_kernels._C_cuda: {why}")
    lines.append(f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    lines.append(f"threads: {torch.get_num_threads()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    lines.append(f"backend choice: {get_backend()} (RTL_BACKEND={os.environ.get('RTL_BACKEND', '')!r})")
    devices = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devices += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    for device, dtype in devices:
        lines.append(f"backends for {device}/{str(dtype).replace('torch.', '')}:")
        for name, reason in unavailable_reasons(torch.device(device), dtype).items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
