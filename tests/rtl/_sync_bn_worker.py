"""One process of the synchronised-BatchNorm test (run by tests/rtl/test_sync_batch_norm.py, two at a time).

``python _sync_bn_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a gloo group through ``file://INIT_FILE``,
runs a BatchNorm2d in training mode on its rows of one global batch (uneven shares) inside
``synchronized_batch_norm``, backpropagates a fixed weighting of the outputs, and saves the outputs, the input
gradient, the affine gradients and the running statistics to OUT_DIR/rank{RANK}.pt. ``inputs()`` gives the global
batch, its weighting and each rank's rows, for the one-process reference.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rtl.sync_batch_norm import synchronized_batch_norm  # noqa: E402

ROWS = (3, 2)  # rank 0 holds three rows of the global batch, rank 1 two


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(ROWS), 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    weighting = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, weighting


def make_norm() -> nn.BatchNorm2d:
    torch.manual_seed(1)
    norm = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def rows_of(rank: int) -> slice:
    return slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, weighting = inputs()
    x = x[rows_of(rank)].clone().requires_grad_(True)
    norm = make_norm()
    with synchronized_batch_norm(norm):
        for _ in range(2):  # twice, so the running statistics' update is checked across calls
            out = norm(x)
    (out * weighting[rows_of(rank)]).sum().backward()
    torch.save(
        {
            "out": out.detach(),
            "grad_x": x.grad,
            "grad_weight": norm.weight.grad,
            "grad_bias": norm.bias.grad,
            "running_mean": norm.running_mean,
            "running_var": norm.running_var,
            "patched": "forward" in vars(norm),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
