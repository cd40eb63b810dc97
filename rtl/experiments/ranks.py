"""Several processes for one `rtl run` (``torchrun --nproc_per_node N -m rtl run ...``).

Who does what:
    - rank 0 owns the run directory: the lock, config.json, every stage file, the logs, progress and the report;
      the other ranks write nothing but their own tickets' IMP checkpoints;
    - Alg. 1 (each ticket's IMP, independent by construction) and the independent-models baseline are spread over
      the ranks, ticket t on rank t mod N, and gathered;
    - Alg. 2 (the joint retraining) runs data-parallel: every rank draws the same global batch and trains on its
      share of the rows (:class:`Ranks.shard`);
    - the other stages (the dense and single-mask baselines, evaluation, speed) run on rank 0 while the others wait.
A single process is the case N = 1 of the same code, so the two give the same masks.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "ranks_from_environment"]

T = TypeVar("T")

#: How long a rank waits for the others at a collective before giving up (a rank that died without its launcher
#: noticing would otherwise hold the rest forever).
WAIT = datetime.timedelta(minutes=int(os.environ.get("RTL_RANK_TIMEOUT_MINUTES", "60")))


@dataclass
class Ranks:
    """The processes of one run: this one's rank and their number."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owned(self, items: Sequence[T]) -> List[T]:
        """This rank's share of ``items``: item i goes to rank i mod world."""
        return list(items[self.rank :: self.world])

    def owner(self, index: int) -> int:
        return index % self.world

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 and its result handed to every rank; an exception on rank 0 is raised on every rank
        (as the same type when it can be rebuilt from its message), so no rank waits for a stage that failed."""
        if not self.distributed:
            return fn()
        payload: List[Any] = [None]
        if self.main:
            try:
                payload[0] = ("ok", fn())
            except Exception as exc:
                payload[0] = ("error", exc)
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            raise value
        return value

    def shard(self, rows: int) -> slice:
        """This rank's contiguous share of a batch of ``rows`` rows (the first ranks take one more when it does not
        divide evenly; a rank may get none)."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def ranks_from_environment(device: str) -> "tuple[Ranks, str]":
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR...).

    Args:
        device: the run's device, "cpu" or "cuda": gloo on CPU, nccl with one GPU per rank (cuda:LOCAL_RANK).

    Returns:
        (ranks, device of this rank). A process started without torchrun is Ranks(0, 1) on ``device``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank with LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPUs: start at most one "
                f"process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=WAIT)
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    _stop_cleanly_on_sigterm(ranks)
    return ranks, device


def _stop_cleanly_on_sigterm(ranks: Ranks) -> None:
    # torchrun stops the other ranks with SIGTERM when one fails: say so in one line instead of a traceback.
    def handler(signum, frame):
        print(
            f"rtl run: rank {ranks.rank} of {ranks.world} stopped: another rank failed or the launcher stopped the "
            f"job; the finished stages are kept (resume with --resume DIR, on any number of processes)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def leave(ranks: Optional[Ranks]) -> None:
    """Leave the process group (after the run, on every rank)."""
    if ranks is not None and ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
