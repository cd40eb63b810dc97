"""Times the cpu backend's routed linear weight gradient alone (min of 41 calls, ms) on four shapes.

Run once per build, each build's ``rtl_kernels`` (with its compiled _C) under its own directory:

    PYTHONPATH=/path/to/build_dir [RTL_CPU_ISA=avx2] python dw_ab.py

It prints the build directory's name, the kernel ISA in use and one time per case. Builds were run in turn,
several rounds, because this VM's speed drifts by up to 2x over minutes.
"""

import os
import time

import torch

from rtl_kernels.backends import cpu as C
from rtl_kernels.grouping import group_by_ticket


def fastest_ms(fn, calls=41):
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main():
    assert C.BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is None  # loads the extension
    torch.manual_seed(0)
    build = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(C.__file__)))))
    out = [build, torch.ops.rtl_kernels._cpu_kernel_isa()]
    for name, rows, n, k, tickets in [("inr", 65536, 128, 128, 10), ("b1024", 2048, 1024, 1024, 8)]:
        for sparsity in (0.5, 0.9):
            x, dy = torch.randn(rows, k), torch.randn(rows, n)
            masks = torch.rand(tickets, n, k) > sparsity
            grouping = group_by_ticket(torch.randint(0, tickets, (rows,)), tickets)
            layout = C._layout(masks)
            ms = fastest_ms(lambda: C._linear_grad_weight(dy, x, masks, layout, grouping.perm, grouping.offsets))
            out.append(f"{name}_u{int(sparsity * 100)} {ms:.2f}")
    print(" | ".join(out))


if __name__ == "__main__":
    main()
