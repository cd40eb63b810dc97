"""Triton kernels of the routed masked ops, one kernel a module, each with its launcher.

This package module itself imports no Triton (only torch): it holds the dot precision, which the backend reads too.
The row-tile tables and the tile set-up the kernels share live in :mod:`.tiles`. The kernel modules import Triton and
are imported lazily by :mod:`rtl_kernels.backends.triton`.
"""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for operands of this dtype.

    fp32 operands get "ieee" (exact fp32 products on the FMA units) so fp32 results match an fp32 reference, unless
    torch allows TF32 for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul precision
    other than "highest"): then "tf32", the tensor-core path, as torch's own fp32 matmuls take. 16-bit operands are
    unaffected by the setting, so they keep Triton's default ("tf32") rather than rely on how "ieee" is lowered for
    them.
    """
    if dtype != torch.float32:
        return "tf32"
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"
