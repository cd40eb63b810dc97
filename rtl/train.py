"""Joint retraining of the tickets (Alg. 2 of the paper): sequential per-ticket steps or mixed-ticket batches.

Two loops over one shared weight:
    - :func:`train_sequential` is Alg. 2 as written: the K subsets' batches are balanced by cycling the shorter
      ones (:func:`balanced_cyclic_batches`), and every (batch index m, ticket k) gets its own optimizer step with
      the whole batch routed to ticket k;
    - :func:`train_mixed` takes one step per batch holding many tickets, each sample routed to its own (the
      kernels group the rows by ticket inside each layer call).
Both wrap the optimizer in :class:`rtl.optim.TicketMaskedOptimizer` and set each step's active tickets, so no
weight outside those tickets' masks moves, with Adam too (docs/paper_notes.md, choice 7).

Choices where the paper is silent, each with its reason:
    - BatchNorm (docs/paper_notes.md, choice 8): shared by all tickets, one set of running statistics over every
      subset, as the paper keeps BN dense and counts no per-ticket parameters. ``freeze_bn=True`` puts every BatchNorm
      / InstanceNorm layer in eval mode for the run instead (running statistics frozen and used; their affine weights
      still train).
    - The loss: ``loss_fn(output, target)``; a loss that needs the tickets (the paper's one-vs-rest detectors,
      docs/paper_notes.md choice 9) declares a parameter named ``route``, which gets the (B,) int64 ticket of every
      sample (all equal in :func:`train_sequential`), or ``ticket``, which gets the step's int ticket
      (:func:`train_sequential` only). The parameter is found by name, not by position, so losses such as
      ``F.cross_entropy`` (whose third positional parameter is ``weight``) are called correctly. A loss may return a
      scalar or per-sample values (B,) or (B, ...): the step minimises their mean, and per-sample values give
      per-ticket means in :func:`train_mixed` too.
    - Epochs: every epoch starts a fresh pass over every loader (a shuffling DataLoader reshuffles); in
      :func:`train_sequential` a loader that runs out before the longest one is re-iterated (cycled).
    - A ticket whose loader has no batch gets no step (an empty ticket is legal); train_sequential wants one
      loader per ticket, so pass an empty list for a ticket not to train.
    - Checkpoints (``checkpoint=path``) hold the model, the optimizer, the position, the loss history and every
      RNG state, written atomically after every epoch (and every ``checkpoint_every`` steps). A run started with
      an existing checkpoint continues from it and ends with the weights an uninterrupted run would have: a
      mid-epoch resume replays the epoch's data order (fetching and dropping the batches already used, with the
      RNG states each loader's iterator was made with) and then restores the RNG states of the interruption.
      This covers randomness drawn from the global torch, CUDA, numpy and Python RNGs (shuffling, workers'
      seeds, augmentations, dropout); a DataLoader given its own ``generator``, learning-rate schedulers and
      other state of your own are not in the checkpoint.
    - DistributedDataParallel: pass the wrapped model; the route reaches the routed layers of ``model.module``,
      the optimizer merges the active tickets of all processes before each step, only process 0 writes the
      checkpoint and shows progress, and reported losses are averaged over the processes. Every process must
      take the same number of steps (e.g. DistributedSampler, with drop_last for uneven data).
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .nn import check_route, routed_modules
from .optim import TicketMaskedOptimizer
from .routed_model import RoutedModel, model_num_tickets, use_route
from .state_io import atomic_save, rng_state, set_rng_state

__all__ = ["StepInfo", "TrainResult", "balanced_cyclic_batches", "train_mixed", "train_sequential"]

_FORMAT = "rtl.train"
_VERSION = 1


@dataclass
class StepInfo:
    """What a callback receives after every optimizer step.

    Attributes:
        epoch: the epoch, from 0.
        step: the step within the epoch, from 0.
        global_step: steps taken since the start of training (across resumes), from 0.
        batch_index: m, the batch index of Alg. 2 (train_sequential) or the batch number (train_mixed).
        ticket: the step's ticket (train_sequential), None in train_mixed.
        route (B,) int64: the ticket of every sample of the batch.
        loss (): the step's mean loss, detached (call ``.item()`` for a float; it syncs a GPU).
        last_in_epoch: True on the epoch's last step (always False in train_mixed over a loader without len()).
    """

    epoch: int
    step: int
    global_step: int
    batch_index: int
    ticket: Optional[int]
    route: Tensor
    loss: Tensor
    last_in_epoch: bool


@dataclass
class TrainResult:
    """Per-epoch mean losses of a training run (including epochs run before a resume).

    Attributes:
        epoch_losses: one float per epoch, the mean of its steps' losses.
        ticket_losses: one list of T floats per epoch, each ticket's mean loss (NaN for a ticket without a step,
            and in train_mixed when the loss returns a scalar rather than per-sample values).
        steps: the number of optimizer steps taken in all.
    """

    epoch_losses: List[float] = field(default_factory=list)
    ticket_losses: List[List[float]] = field(default_factory=list)
    steps: int = 0


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel / DataParallel wrapper holds, or the model itself."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# -- balanced cyclic batches -----------------------------------------------------------------------------------
def _loader_lengths(loaders) -> List[int]:
    if isinstance(loaders, (str, bytes)) or not isinstance(loaders, Sequence):
        raise TypeError(f"loaders must be a sequence of iterables (one per ticket), got {type(loaders).__name__}")
    lengths = []
    for k, loader in enumerate(loaders):
        if not isinstance(loader, Iterable):
            raise TypeError(f"loaders[{k}] must be an iterable of batches, got {type(loader).__name__}")
        try:
            lengths.append(len(loader))
        except TypeError:
            raise TypeError(
                f"loaders[{k}] ({type(loader).__name__}) has no len(): the balanced schedule needs "
                f"every subset's number of batches; pass a list or a DataLoader over a map-style "
                f"dataset"
            ) from None
    return lengths


class _Batches:
    """Draws batches from several loaders, re-iterating exhausted ones, and records the RNG state each iterator
    was made with so that a resumed run can make the same iterators again (``replay``)."""

    def __init__(
        self,
        loaders: Sequence[Iterable],
        cycle: bool,
        epoch: int = 0,
        replay: Optional[List[Tuple[int, Dict[str, Any]]]] = None,
    ) -> None:
        self.loaders = loaders
        self.cycle = cycle
        self.epoch = epoch
        self.iterators: List[Optional[Iterator]] = [None] * len(loaders)
        self.records: List[Tuple[int, Dict[str, Any]]] = []
        self._replay = list(replay or [])

    def _fresh(self, k: int) -> Iterator:
        if self._replay:
            recorded_k, state = self._replay.pop(0)
            if recorded_k != k:
                raise ValueError("the checkpoint's data order does not match these loaders (were they changed?)")
            set_rng_state(state)
        self.records.append((k, rng_state(cuda=False)))
        sampler = getattr(self.loaders[k], "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)  # DistributedSampler reshuffles per epoch only when told the epoch
        return iter(self.loaders[k])

    def next(self, k: int):
        """The next batch of loader k; StopIteration at its end unless cycling."""
        if self.iterators[k] is None:
            self.iterators[k] = self._fresh(k)
        try:
            return next(self.iterators[k])
        except StopIteration:
            if not self.cycle:
                self.iterators[k] = None
                raise
        self.iterators[k] = self._fresh(k)
        try:
            return next(self.iterators[k])
        except StopIteration:
            raise ValueError(
                f"loaders[{k}] yielded no batch when iterated again, although len() said it has some"
            ) from None


def _balanced_plan(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """Alg. 2's order: for m in range(M): for k in range(K) (tickets without batches skipped)."""
    num_batches = max(lengths, default=0)
    return [(m, k) for m in range(num_batches) for k, n in enumerate(lengths) if n > 0]


def balanced_cyclic_batches(loaders: Sequence[Iterable]) -> Iterator[Tuple[int, int, Any]]:
    """Alg. 2's balanced batch order over K subsets: M = max_k |B^k| batch indices, the shorter subsets cycled.

    Yields ``for m in range(M): for k in range(K): (m, k, next batch of subset k)``. A subset that runs out
    before index M is iterated again (a shuffling DataLoader gives a new order); a subset with no batch is
    skipped.

    Args:
        loaders: K iterables with ``len()`` (lists, DataLoaders over map-style datasets), one per ticket.

    Returns:
        An iterator of (batch_index m, ticket k, batch).

    Example:
        >>> [(m, k, b) for m, k, b in balanced_cyclic_batches([["a0", "a1", "a2"], ["b0"], ["c0", "c1"]])]
        [(0, 0, 'a0'), (0, 1, 'b0'), (0, 2, 'c0'), (1, 0, 'a1'), (1, 1, 'b0'), (1, 2, 'c1'),
         (2, 0, 'a2'), (2, 1, 'b0'), (2, 2, 'c0')]
    """
    lengths = _loader_lengths(loaders)
    return _balanced_iter(loaders, lengths)


def _balanced_iter(loaders, lengths) -> Iterator[Tuple[int, int, Any]]:
    source = _Batches(loaders, cycle=True)
    for m, k in _balanced_plan(lengths):
        yield m, k, source.next(k)


# -- RNG states and checkpoints ---------------------------------------------------------------------------------
def _distributed(model: nn.Module) -> bool:
    return (
        isinstance(model, nn.parallel.DistributedDataParallel)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


# -- batches and losses ------------------------------------------------------------------------------------------
def _to_device(value, device):
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _batch_size(x) -> int:
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the batch's input is a 0-d tensor: it needs a leading batch dimension")
        return x.shape[0]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    for item in items:
        try:
            return _batch_size(item)
        except (TypeError, ValueError):
            continue
    raise TypeError(f"cannot tell the batch size of an input of type {type(x).__name__}: give tensors (B, ...)")


def _loss_keyword(loss_fn: Callable) -> Optional[str]:
    """'route' or 'ticket' when the loss declares a parameter of that name, else None."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature take (output, target)
        return None
    for name in ("route", "ticket"):
        param = params.get(name)
        if param is not None and param.kind != inspect.Parameter.POSITIONAL_ONLY:
            return name
    return None


class _Trainer:
    """The state of one training run: model, optimizer wrapper, loss, accumulators, checkpointing."""

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        optimizer,
        loss_fn: Callable,
        epochs: int,
        device,
        progress: bool,
        callbacks,
        checkpoint,
        checkpoint_every,
        freeze_bn: bool,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1
        ):
            raise ValueError(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}")
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path or None, got {type(checkpoint).__name__}")
        if checkpoint is None and checkpoint_every is not None:
            raise ValueError("checkpoint_every needs a checkpoint path")
        callbacks = list(callbacks)
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise TypeError(f"callbacks[{i}] must be callable, got {type(cb).__name__}")
        self.kind = kind
        self.model = model
        self.base = _unwrap(model)
        self.num_tickets = model_num_tickets(self.base)
        self.loss_keyword = _loss_keyword(loss_fn)
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.device = torch.device(device) if device is not None else None
        self.callbacks = callbacks
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = checkpoint_every
        self.freeze_bn = bool(freeze_bn)
        self.distributed = _distributed(model)
        self.rank = dist.get_rank() if self.distributed else 0
        self.progress = bool(progress) and self.rank == 0
        self.weight_device = next(m for _, m in routed_modules(self.base)).weight.device
        if isinstance(optimizer, TicketMaskedOptimizer):
            own = {id(m.weight) for _, m in routed_modules(self.base)}
            if not own <= set(optimizer._layers_of_param):
                raise ValueError("optimizer is a TicketMaskedOptimizer built on another model: build it on this one")
            self.opt, self.own_opt = optimizer, False
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.opt, self.own_opt = TicketMaskedOptimizer(optimizer, model), True
        else:
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.result = TrainResult()
        self._reset_epoch_sums()

    # -- accumulators -------------------------------------------------------------------------------------------
    def _reset_epoch_sums(self) -> None:
        # Kept on the device as tensors so that a step never waits for the GPU; read once per epoch.
        dev = self.weight_device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.step_count = 0
        self.ticket_sum = torch.zeros(self.num_tickets, dtype=torch.float64, device=dev)
        self.ticket_count = torch.zeros(self.num_tickets, dtype=torch.float64, device=dev)

    def _close_epoch(self) -> None:
        sums = torch.cat(
            [
                self.loss_sum.view(1),
                torch.tensor([float(self.step_count)], dtype=torch.float64, device=self.loss_sum.device),
                self.ticket_sum,
                self.ticket_count,
            ]
        )
        if self.distributed:
            backend_device = self.weight_device if dist.get_backend() == "nccl" else torch.device("cpu")
            sums = sums.to(backend_device)
            dist.all_reduce(sums)
        sums = sums.cpu().tolist()
        total, count = sums[0], sums[1]
        ticket_sum, ticket_count = sums[2 : 2 + self.num_tickets], sums[2 + self.num_tickets :]
        self.result.epoch_losses.append(total / count if count else math.nan)
        self.result.ticket_losses.append([s / c if c else math.nan for s, c in zip(ticket_sum, ticket_count)])
        self._reset_epoch_sums()

    # -- one step ------------------------------------------------------------------------------------------------
    def forward(self, x, route: Tensor):
        if isinstance(self.base, RoutedModel):
            return self.model(x, route)
        with use_route(self.base, route):
            return self.model(x)

    def step(self, x, y, route: Tensor, ticket: Optional[int]) -> Tensor:
        """One optimizer step on a batch; returns its mean loss (detached)."""
        opt = self.opt
        opt.zero_grad(set_to_none=True)
        with opt.active_tickets(ticket if ticket is not None else route):
            output = self.forward(x, route)
            if self.loss_keyword == "route":
                loss = self.loss_fn(output, y, route=route)
            elif self.loss_keyword == "ticket":
                loss = self.loss_fn(output, y, ticket=ticket)
            else:
                loss = self.loss_fn(output, y)
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
            per_sample = None
            if loss.dim() > 0:
                if loss.shape[0] != route.shape[0]:
                    raise ValueError(
                        f"loss_fn returned shape {tuple(loss.shape)}: return a scalar or per-sample "
                        f"values (B, ...) with B = {route.shape[0]}"
                    )
                per_sample = loss.reshape(loss.shape[0], -1).mean(1)
                loss = per_sample.mean()
            loss.backward()
            opt.step()
        value = loss.detach().double()
        self.loss_sum += value
        self.step_count += 1
        if ticket is not None:
            self.ticket_sum[ticket] += value
            self.ticket_count[ticket] += 1
        elif per_sample is not None:
            self.ticket_sum.index_add_(0, route, per_sample.detach().double())
            self.ticket_count.index_add_(0, route, torch.ones_like(route, dtype=torch.float64))
        return value

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save(self, epoch: int, position: int, records) -> None:
        rng = rng_state()
        if self.distributed:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rng, records))
        else:
            gathered = [(rng, records)]
        if self.rank != 0:
            return
        partial = None
        if position:
            partial = {
                "loss_sum": self.loss_sum.detach().cpu(),
                "count": self.step_count,
                "ticket_sum": self.ticket_sum.detach().cpu(),
                "ticket_count": self.ticket_count.detach().cpu(),
            }
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": self.kind,
            "num_tickets": self.num_tickets,
            "epoch": epoch,
            "position": position,
            "steps": self.result.steps,
            "epoch_losses": list(self.result.epoch_losses),
            "ticket_losses": [list(t) for t in self.result.ticket_losses],
            "partial": partial,
            "model": self.base.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": [g[0] for g in gathered],
            "data_rng": [g[1] for g in gathered],
        }
        atomic_save(payload, self.checkpoint)

    def load(self) -> Optional[Dict[str, Any]]:
        """Restore model, optimizer and history from the checkpoint if it exists; returns its payload."""
        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            return None
        payload = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"checkpoint {self.checkpoint!r} is not an rtl.train checkpoint")
        if payload.get("version") != _VERSION:
            raise ValueError(
                f"checkpoint {self.checkpoint!r} has version {payload.get('version')!r}, this rtl "
                f"reads version {_VERSION}"
            )
        if payload["kind"] != self.kind:
            raise ValueError(f"checkpoint {self.checkpoint!r} was written by {payload['kind']}, not {self.kind}")
        if payload["num_tickets"] != self.num_tickets:
            raise ValueError(
                f"checkpoint {self.checkpoint!r} has {payload['num_tickets']} tickets, the model has {self.num_tickets}"
            )
        self.base.load_state_dict(payload["model"])
        self.opt.load_state_dict(payload["optimizer"])
        self.result = TrainResult(
            list(payload["epoch_losses"]), [list(t) for t in payload["ticket_losses"]], payload["steps"]
        )
        partial = payload["partial"]
        if partial is not None:
            dev = self.weight_device
            self.loss_sum = partial["loss_sum"].to(dev)
            self.step_count = partial["count"]
            self.ticket_sum = partial["ticket_sum"].to(dev)
            self.ticket_count = partial["ticket_count"].to(dev)
        world = dist.get_world_size() if self.distributed else 1
        if len(payload["rng"]) != world:
            warnings.warn(
                f"checkpoint {self.checkpoint!r} was written by {len(payload['rng'])} processes and is "
                f"resumed by {world}: the RNG states are not restored, so the run will not repeat the "
                f"uninterrupted one exactly",
                stacklevel=3,
            )
            payload["rng"] = payload["data_rng"] = None
        return payload

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(
        self,
        loaders: Sequence[Iterable],
        cycle: bool,
        plan: Callable[[], Optional[List[Tuple[int, int]]]],
        prepare: Callable[[Any, int], Tuple[Any, Any, Tensor, Optional[int]]],
    ) -> TrainResult:
        """Run the epochs; ``plan()`` gives the epoch's (batch index, loader) order or None (one pass of loader 0),
        ``prepare(batch, k)`` gives (x, y, route, ticket or None) on the device."""
        modes = {m: m.training for m in self.model.modules()}
        restore_sync = self.opt.sync_tickets
        try:
            self.model.train()
            if self.freeze_bn:
                for m in self.model.modules():
                    if isinstance(m, nn.modules.batchnorm._NormBase):
                        m.eval()
            if self.distributed:
                self.opt.sync_tickets = True
            payload = self.load()
            start_epoch = payload["epoch"] if payload is not None else 0
            for epoch in range(start_epoch, self.epochs):
                resume = payload if payload is not None and epoch == start_epoch else None
                self._run_epoch(epoch, loaders, cycle, plan(), prepare, resume)
        finally:
            self.opt.sync_tickets = restore_sync
            if self.own_opt:
                self.opt.remove_hooks()
            for m, mode in modes.items():
                m.training = mode
        return self.result

    def _run_epoch(self, epoch: int, loaders, cycle: bool, order, prepare, resume) -> None:
        position = 0
        rng = data_rng = None
        if resume is not None:
            position = resume["position"]
            if resume["rng"] is not None:
                rng, data_rng = resume["rng"][self.rank], resume["data_rng"][self.rank]
        if position == 0 and rng is not None:
            set_rng_state(rng)
        source = _Batches(loaders, cycle=cycle, epoch=epoch, replay=data_rng if position else None)
        if order is not None:
            schedule: Iterable[Tuple[int, int]] = order
            total: Optional[int] = len(order)
        else:
            schedule = ((m, 0) for m in itertools.count())  # one pass of loader 0, as long as it yields
            try:
                total = len(loaders[0])
            except TypeError:  # e.g. a DataLoader over an IterableDataset without __len__
                total = None
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress, leave=False)
        bar.update(position)
        try:
            for step, (batch_index, k) in enumerate(schedule):
                try:
                    batch = source.next(k)
                except StopIteration:
                    break
                if step < position:
                    # Trained on before the interruption: drawn again only to replay the data order.
                    if step == position - 1 and rng is not None:
                        set_rng_state(rng)
                    continue
                x, y, route, ticket = prepare(batch, k)
                loss = self.step(x, y, route, ticket)
                bar.update(1)
                last = total is not None and step == total - 1
                self.result.steps += 1
                info = StepInfo(
                    epoch=epoch,
                    step=step,
                    global_step=self.result.steps - 1,
                    batch_index=batch_index,
                    ticket=ticket,
                    route=route,
                    loss=loss,
                    last_in_epoch=last,
                )
                for cb in self.callbacks:
                    cb(info)
                if not last and self.checkpoint_every is not None and (step + 1) % self.checkpoint_every == 0:
                    # Saved before the next batch is drawn: its RNG state is the one that batch is drawn with.
                    self.save(epoch, step + 1, list(source.records))
        finally:
            bar.close()
        self._close_epoch()
        if self.checkpoint is not None:
            self.save(epoch + 1, 0, [])


# -- public loops ------------------------------------------------------------------------------------------------
def _split_batch(batch, with_route: bool, where: str):
    if not isinstance(batch, (list, tuple)) or isinstance(batch, str):
        raise TypeError(
            f"{where} must yield (x, y) batches{' or (x, y, route)' if with_route else ''}, got {type(batch).__name__}"
        )
    sizes = (2, 3) if with_route else (2,)
    if len(batch) not in sizes:
        expected = "(x, y) or (x, y, route)" if with_route else "(x, y)"
        raise ValueError(f"{where} yielded a batch of {len(batch)} items, expected {expected}")
    return batch


def train_sequential(
    model: nn.Module,
    loaders: Sequence[Iterable],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    epochs: int = 1,
    device=None,
    progress: bool = True,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    checkpoint=None,
    freeze_bn: bool = False,
    checkpoint_every: Optional[int] = None,
) -> TrainResult:
    """Alg. 2 joint retraining: one optimizer step per (batch index m, ticket k), the batch routed to ticket k.

    The K subsets' batches come in :func:`balanced_cyclic_batches` order (the shorter subsets cycled up to the
    longest, M batch indices, K steps each). Each step runs the whole batch through ticket k and moves only the
    weights ticket k keeps (with any optimizer: see :class:`rtl.optim.TicketMaskedOptimizer`). Weights kept by
    several tickets get the sequential updates of each of them; the updates are not summed.

    Args:
        model: a model with routed layers, a :class:`rtl.RoutedModel`, or either wrapped in
            DistributedDataParallel. It is called as ``model(x)`` (``model(x, route)`` for a RoutedModel).
        loaders: one iterable with ``len()`` per ticket (lists or DataLoaders), K = the model's num_tickets;
            loader k yields batches (x, y) of subset k: x (B, ...) as the model takes it (or a tuple / dict of
            such tensors), y whatever loss_fn takes.
        optimizer: any torch optimizer over the model's parameters, or a TicketMaskedOptimizer built on this
            model (a plain one is wrapped for the run).
        loss_fn: ``loss_fn(output, y)`` returning a scalar or per-sample values (B, ...); declare a parameter
            ``route`` to receive the (B,) tickets or ``ticket`` to receive the int ticket (see the module notes).
        epochs: the total number of epochs (a resumed run counts the ones already done).
        device: where batches are moved (tensors inside tuples, lists and dicts too); None leaves them.
        progress: show a tqdm bar per epoch (process 0 only).
        callbacks: callables ``cb(info: StepInfo)`` called after every step.
        checkpoint: a file path: written after every epoch (atomically), and resumed from when it exists.
        freeze_bn: put BatchNorm / InstanceNorm layers in eval mode for the run (running statistics frozen);
            default False: one set of running statistics shared by all tickets.
        checkpoint_every: also write the checkpoint every this many steps inside an epoch (a resume replays the
            epoch's data order up to there).

    Returns:
        A :class:`TrainResult`: per-epoch mean loss and per-ticket mean losses.

    Example:
        >>> loaders = [DataLoader(subset_k, batch_size=64, shuffle=True) for subset_k in subsets]
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        >>> result = rtl.train.train_sequential(model, loaders, opt, nn.CrossEntropyLoss(), epochs=10)
        >>> result.epoch_losses[-1] < result.epoch_losses[0]
        True
    """
    lengths = _loader_lengths(loaders)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    num_tickets = model_num_tickets(_unwrap(model))
    if len(lengths) != num_tickets:
        raise ValueError(
            f"loaders has {len(lengths)} loaders but the model has {num_tickets} tickets: give one "
            f"per ticket (an empty list for a ticket not to train)"
        )
    trainer = _Trainer(
        "sequential",
        model,
        optimizer,
        loss_fn,
        epochs,
        device,
        progress,
        callbacks,
        checkpoint,
        checkpoint_every,
        freeze_bn,
    )
    plan = _balanced_plan(lengths)

    def prepare(batch, k: int):
        x, y = _split_batch(batch, with_route=False, where=f"loaders[{k}]")
        x, y = _to_device(x, trainer.device), _to_device(y, trainer.device)
        route = torch.full((_batch_size(x),), k, dtype=torch.int64, device=trainer.weight_device)
        return x, y, route, k

    return trainer.run(list(loaders), cycle=True, plan=lambda: plan, prepare=prepare)


def train_mixed(
    model: nn.Module,
    loader: Iterable,
    router_or_route_fn: Optional[Callable],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    epochs: int = 1,
    device=None,
    progress: bool = True,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    checkpoint=None,
    freeze_bn: bool = False,
    checkpoint_every: Optional[int] = None,
) -> TrainResult:
    """Joint retraining with one optimizer step per batch holding many tickets, each sample routed to its own.

    The step's gradient is the batch mean over all its samples, each through its ticket's mask; the optimizer
    moves only weights kept by at least one ticket present in the batch (under DistributedDataParallel, present
    in any process's batch). With T = 1 this is the same run as :func:`train_sequential` on the one loader.

    Args:
        model: a model with routed layers, a :class:`rtl.RoutedModel`, or either wrapped in
            DistributedDataParallel.
        loader: an iterable of batches (x, y, route) with route (B,) int tickets, or (x, y) when
            ``router_or_route_fn`` is given. One pass per epoch.
        router_or_route_fn: None (the loader yields the route) or a callable ``fn(x, y) -> route (B,)`` applied to
            each batch after it is moved to ``device`` (e.g. a class -> ticket map on the labels).
        optimizer, loss_fn, epochs, device, progress, callbacks, checkpoint, freeze_bn, checkpoint_every: as
            :func:`train_sequential`; loss_fn cannot ask for ``ticket`` (a batch holds several), only ``route``.

    Returns:
        A :class:`TrainResult`; per-ticket losses need a loss_fn returning per-sample values.

    Example:
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        >>> result = rtl.train.train_mixed(model, loader, lambda x, y: class_to_ticket[y], opt,
        ...                                nn.CrossEntropyLoss(), epochs=10)
    """
    if not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of batches, got {type(loader).__name__}")
    if router_or_route_fn is not None and not callable(router_or_route_fn):
        raise TypeError(f"router_or_route_fn must be callable or None, got {type(router_or_route_fn).__name__}")
    if _loss_keyword(loss_fn) == "ticket":
        raise TypeError(
            "loss_fn asks for `ticket`, but a mixed batch holds several tickets: declare a `route` "
            "parameter instead, which receives every sample's ticket (B,)"
        )
    trainer = _Trainer(
        "mixed", model, optimizer, loss_fn, epochs, device, progress, callbacks, checkpoint, checkpoint_every, freeze_bn
    )

    def prepare(batch, k: int):
        items = _split_batch(batch, with_route=True, where="loader")
        if len(items) == 3 and router_or_route_fn is not None:
            raise ValueError(
                "the loader yields (x, y, route) and router_or_route_fn is given too: pass None to use "
                "the loader's route, or yield (x, y)"
            )
        if len(items) == 2 and router_or_route_fn is None:
            raise ValueError(
                "the loader yields (x, y) batches without a route: pass router_or_route_fn, or yield (x, y, route)"
            )
        x, y = _to_device(items[0], trainer.device), _to_device(items[1], trainer.device)
        route = items[2] if len(items) == 3 else router_or_route_fn(x, y)
        route = check_route(route, trainer.num_tickets, batch=_batch_size(x), device=trainer.weight_device)
        return x, y, route, None

    return trainer.run([loader], cycle=False, plan=lambda: None, prepare=prepare)
