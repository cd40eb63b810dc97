"""The paper's protocol on one task: dense, single-mask IMP, independent per-subset models and RTL, from one init.

Stages, each saved to ``<out>/stages/<stage>.pt`` as soon as it finishes (atomically), so an interrupted run
resumes at the first unfinished stage; every stage seeds its own RNG from (seed, stage name), so a resumed run
computes exactly what an uninterrupted one would:

1. ``init``: θ0, the one shared initialisation of every method (paper A.2).
2. ``dense``: the unpruned model trained on all data.
3. ``single_masks`` / ``single@s``: single-mask IMP (one ticket, all data) to every sparsity, then the ticket
   retrained from θ0 at each sparsity (lottery-ticket style).
4. ``rtl_masks``: Alg. 1, one IMP per subset from θ0, to every sparsity (masks snapshotted on the way), and the
   tickets' similarity S_k after every IMP round (:mod:`rtl.experiments.round_similarity`).
5. ``rtl@s``: Alg. 2 joint retraining of the shared weight from θ0 with the masks of sparsity s.
6. ``multi@s``: the same masks, but K independent weight copies, each trained on its own subset only.
7. ``speed``: inference time of the routed model (rtl kernels) vs the dense model and the naive per-ticket loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import functools
import itertools
import random
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import rtl_kernels

from .. import diagnostics, metrics as rtl_metrics, train as rtl_train
from ..convert import convert_, extract_ticket
from ..iterative_pruning import IMP, CheckpointError
from ..routed_model import RoutedModel, model_num_tickets, use_route
from ..state_io import atomic_json, atomic_save, first_line
from ..sync_batch_norm import synchronized_batch_norm
from . import round_similarity
from .collapse import collapse_study
from .ranks import Ranks
from .run_lock import RunLock
from .tasks import Task, parse_granularity

STATE_VERSION = 2  # 2: equal retraining budgets, per-ticket Alg. 1 checkpoints


class RunStateError(ValueError):
    """A run directory that cannot be resumed (foreign, corrupt, or made with another configuration)."""


def _stage_seed(seed: int, stage: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


#: What a resumed run must share with the run it continues.
RESUME_KEYS = ("experiment", "seed", "sparsities", "preset", "overrides", "state_version")


def check_resumable(out_dir: str, config: Dict, keys: Sequence[str]) -> None:
    """Check that ``out_dir`` holds a run whose config.json agrees with ``config`` on ``keys``.

    Raises:
        RunStateError: no config.json (nothing to resume), an unreadable one, or another configuration.
    """
    cfg_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunStateError(f"{out_dir} is not an rtl run directory (no config.json): nothing to resume")
    try:
        with open(cfg_path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RunStateError(
            f"{cfg_path} is unreadable ({exc}); refusing to resume: restore it, or start the run again in another --out"
        ) from exc
    if not isinstance(saved, dict):
        raise RunStateError(
            f"{cfg_path} is not an rtl run configuration; refusing to resume: restore it, or start the run again in "
            f"another --out"
        )
    diff = {k: (saved.get(k), config.get(k)) for k in keys if saved.get(k) != config.get(k)}
    if diff:
        raise RunStateError(f"{out_dir} was made with another configuration {diff}; refusing to resume")


class StageStore:
    """Finished stages of one run on disk; refuses a directory made by another configuration."""

    def __init__(self, out_dir: str, config: Dict, resume: bool) -> None:
        self.out_dir = out_dir
        self.dir = os.path.join(out_dir, "stages")
        cfg_path = os.path.join(out_dir, "config.json")
        if resume:
            check_resumable(out_dir, config, RESUME_KEYS)
        else:
            if os.path.isdir(self.dir) and os.listdir(self.dir):
                raise RunStateError(
                    f"{out_dir} already holds a run: pass --resume {out_dir} to continue it, or choose another --out"
                )
            os.makedirs(self.dir, exist_ok=True)
            atomic_json(config, cfg_path)
        os.makedirs(self.dir, exist_ok=True)

    @classmethod
    def reader(cls, out_dir: str) -> "StageStore":
        """The store of a run another process (rank 0) owns: it loads stages and writes nothing."""
        store = cls.__new__(cls)
        store.out_dir, store.dir = out_dir, os.path.join(out_dir, "stages")
        return store

    def path(self, stage: str) -> str:
        return os.path.join(self.dir, stage.replace("@", "_at_") + ".pt")

    def load(self, stage: str):
        path = self.path(stage)
        if not os.path.isfile(path):
            return None
        try:
            blob = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # a truncated or foreign file: refuse, never overwrite silently
            raise RunStateError(
                f"checkpoint {path} is corrupt or not an rtl checkpoint ({first_line(exc)}): "
                f"delete it to compute that stage again"
            ) from exc
        if not isinstance(blob, dict) or blob.get("rtl_stage") != stage or blob.get("version") != STATE_VERSION:
            raise RunStateError(
                f"checkpoint {path} is not this run's stage {stage!r}: delete it to compute that stage again"
            )
        return blob["data"]

    def save(self, stage: str, data) -> None:
        atomic_save({"rtl_stage": stage, "version": STATE_VERSION, "data": data}, self.path(stage))


# -- training: every loop is rtl.train.train_sequential on views of the task's batches ---------------------------


class _TaskModel(nn.Module):
    """The model as the task calls it (the INR hands its routed models the coordinates only)."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.task.forward(self.model, x)


class _EpochBatches:
    """One subset's batches as a loader for rtl.train: every pass draws a new epoch (new order, new negatives).

    Args:
        draw: ``draw() -> iterator of (x, target)`` for one epoch.
        length: the number of batches one epoch holds.
        steps: when given, one pass yields exactly this many batches, drawing further epochs as needed.
    """

    def __init__(
        self, draw: Callable[[], Iterator], length: int, steps: Optional[int] = None, ranks: Optional[Ranks] = None
    ) -> None:
        self.draw, self.length, self.steps, self.ranks = draw, length, steps, ranks

    def __len__(self) -> int:
        return self.length if self.steps is None else self.steps

    def __iter__(self) -> Iterator:
        batches = self.draw() if self.steps is None else itertools.islice(self._epochs(), self.steps)
        for batch in batches:
            yield batch if self.ranks is None else self._share(*batch)

    def _epochs(self) -> Iterator:
        while True:
            drawn = 0
            for drawn, batch in enumerate(self.draw(), 1):
                yield batch
            if not drawn:  # an empty subset has no batch to repeat
                return

    def _share(self, x: Tensor, target: Tensor):
        """This rank's rows of a global batch, with the weight that makes the ranks' losses add up to its mean."""
        rows = self.ranks.shard(x.shape[0])
        weight = (rows.stop - rows.start) * self.ranks.world / max(x.shape[0], 1)
        return x[rows], (target[rows], weight)


def _fit(
    task: Task, model: nn.Module, loaders: List, loss_fn: Callable, epochs: int, ranks: Optional[Ranks] = None
) -> "Fit":
    """``epochs`` of :func:`rtl.train.train_sequential` with the task's Adam (paper A.2 / C.4) and LR schedule.

    With ``lr_schedule="cosine"`` the rate decays to 0 over the run's steps: the final weights then do not depend
    on where the last few full-rate Adam steps happened to land, which keeps method comparisons stable on short
    budgets. With ``ranks`` (several processes, loaders that share their batches out) the model trains
    data-parallel: DistributedDataParallel and BatchNorm over the global batch. Returns the mean loss per epoch and
    the budget spent: optimizer steps and sample presentations (all ranks' rows).
    """
    if task.settings.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {task.settings.lr_schedule!r}")
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=task.settings.lr)
    samples = [0]
    callbacks = [lambda info: samples.__setitem__(0, samples[0] + info.route.shape[0])]
    lengths = [len(loader) for loader in loaders]
    steps = epochs * max(lengths, default=0) * sum(1 for n in lengths if n)  # Alg. 2: shorter subsets cycled
    if task.settings.lr_schedule == "cosine" and steps > 0:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=steps)
        callbacks.append(lambda info: scheduler.step())
    if ranks is None or not ranks.distributed:
        result = rtl_train.train_sequential(
            _TaskModel(task, model), loaders, adam, loss_fn, epochs=epochs, progress=False, callbacks=callbacks
        )
        return Fit(result.epoch_losses, result.steps, samples[0])
    with synchronized_batch_norm(model):
        wrapped = DistributedDataParallel(_TaskModel(task, model))
        result = rtl_train.train_sequential(
            wrapped, loaders, adam, _shared_loss(loss_fn), epochs=epochs, progress=False, callbacks=callbacks
        )
    return Fit(result.epoch_losses, result.steps, sum(ranks.gather(samples[0])))


class Fit(NamedTuple):
    """One training call: mean loss per epoch, optimizer steps, sample presentations."""

    losses: List[float]
    steps: int
    samples: int

    def budget(self) -> Dict[str, int]:
        return {"steps": self.steps, "samples": self.samples}


def retraining_steps(task: Task) -> int:
    """The retraining budget every method of a comparison gets: RTL's joint retraining (Alg. 2), ``retrain_epochs``
    epochs of M batch indices times K' tickets (M: the longest subset's batches; K': the tickets with data).

    The single-mask model and the dense baseline take these steps over the whole training set, each independent
    model a K'-th of them on its subset, all with batches of ``batch_size``: the same optimizer steps and the same
    sample presentations for every method (docs/paper_notes.md, the budget rule).
    """
    counts = [task.ticket_batch_count(t) for t in range(task.num_tickets)]
    return task.settings.retrain_epochs * max(counts, default=0) * sum(1 for c in counts if c)


def round_steps(task: Task, ticket: int) -> int:
    """Alg. 1's training of one ticket before each of its pruning rounds: ``ticket_epochs`` epochs of its subset
    when set (the paper's 10 epochs), else ``ticket_steps`` steps (the paper's INR: 10,000)."""
    if task.settings.ticket_epochs:
        return task.settings.ticket_epochs * task.ticket_batch_count(ticket)
    return task.settings.ticket_steps


def _shared_loss(loss_fn: Callable) -> Callable:
    """The loss of one rank's rows, weighted so that the ranks' losses add up to the global batch's mean."""

    def weighted(out: Tensor, target_and_weight, ticket: int) -> Tensor:
        target, weight = target_and_weight
        if out.shape[0] == 0:  # a batch smaller than the number of ranks: this rank joins with a zero loss
            return out.sum() * 0.0
        return loss_fn(out, target, ticket) * weight

    return weighted


def train_plain(
    task: Task, model: nn.Module, gen: torch.Generator, epochs: Optional[int] = None, steps: Optional[int] = None
) -> Fit:
    """Train a one-ticket model on the whole training set (dense baseline, single-mask IMP) for ``epochs`` epochs or
    ``steps`` optimizer steps (epochs drawn one after the other)."""
    if (epochs is None) == (steps is None):
        raise ValueError("give epochs or steps")
    loader = _EpochBatches(lambda: task.all_batches(gen), task.batch_count(), steps=steps)
    return _fit(task, model, [loader], lambda out, y: task.loss_all(out, y), 1 if steps is not None else epochs)


def train_ticket_steps(
    task: Task, model: nn.Module, ticket: int, steps: int, gen: torch.Generator, route_ticket: Optional[int] = None
) -> Fit:
    """``steps`` optimizer steps on ticket ``ticket``'s subset and objective (none when the subset is empty: the
    loss is then NaN).

    Alg. 1's inner training routes the batch to ``ticket``; an independent one-mask model of the multi-model
    baseline routes it to its only ticket (``route_ticket=0``).
    """
    route_ticket = ticket if route_ticket is None else route_ticket
    if task.subset_size(ticket) == 0 or steps == 0:
        return Fit([float("nan")], 0, 0)
    loaders: List = [[] for _ in range(model_num_tickets(model))]
    loaders[route_ticket] = _EpochBatches(lambda: task.ticket_batches(ticket, gen), 0, steps=steps)
    return _fit(task, model, loaders, lambda out, y: task.loss_ticket(out, y, ticket), 1)


def train_joint(task: Task, model: nn.Module, epochs: int, gen: torch.Generator, ranks: Optional[Ranks] = None) -> Fit:
    """Alg. 2 (:func:`rtl.train.train_sequential`): per batch index, one step per ticket on that ticket's batch.

    Short subsets cycle, each pass drawing a new epoch of the subset. With several ranks every rank draws the same
    batches (same generator) and trains on its share of their rows.
    """
    shared = ranks if ranks is not None and ranks.distributed else None
    loaders = [
        _EpochBatches(functools.partial(task.ticket_batches, t, gen), task.ticket_batch_count(t), ranks=shared)
        for t in range(task.num_tickets)
    ]
    return _fit(task, model, loaders, lambda out, y, ticket: task.loss_ticket(out, y, ticket), epochs, shared)


# -- mask extraction -------------------------------------------------------------------------------------------


def _masks_of(model: nn.Module) -> Dict[str, Tensor]:
    return {name: m.weight_masks.clone() for name, m in model.named_modules() if hasattr(m, "weight_masks")}


def _load_masks(model: nn.Module, masks: Dict[str, Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight_masks.copy_(mask)


def extract_masks(
    task: Task,
    model: nn.Module,
    sparsities: Sequence[float],
    make_train_fn: Callable[[float], Callable[[nn.Module, int, int], object]],
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    ranks: Optional[Ranks] = None,
    record_rounds: bool = False,
) -> Dict:
    """Alg. 1 with :class:`rtl.IMP` from the model's current weights (θ0), masks snapshotted per target.

    Each ticket is extracted on its own (the tickets share nothing but θ0, so this is the paper's K independent IMP
    runs): one IMP run per target sparsity, in increasing order, each continuing from the previous masks (masks only
    shrink; IMP's rewind returns the weights to θ0 after every training, so θ0 is the same for all runs). Each round
    removes ``prune_fraction`` of a ticket's remaining weights, clipped to hit the target. With ``checkpoint_dir``
    every finished round is saved, per ticket, and an interrupted extraction resumes after it with any number of
    ranks. With ``ranks`` the tickets are spread over the processes and their masks gathered on every rank.

    Args:
        make_train_fn: ``make_train_fn(target) -> train_fn(model, ticket, round)``; the train_fn must draw its
            randomness from its arguments (not from a generator shared across rounds) for resumes to be exact.
        record_rounds: also keep every ticket's mask after each of its rounds (a
            :class:`~rtl.experiments.round_similarity.RoundHistory` per ticket, saved beside its IMP checkpoints as
            ``ticket<t>/rounds.pt`` so that a resumed extraction keeps the rounds done before the interruption).

    Returns:
        {"masks": {str(sparsity): {layer name: masks (T, *weight.shape)}}, "log": [per-round dicts]}, and with
        ``record_rounds`` "histories": [RoundHistory per ticket, or None where a resume found the rounds before it
        unrecorded].
    """
    ranks = ranks or Ranks()
    start = _masks_of(model)
    keys = [f"{target:g}" for target in sorted(sparsities)]
    mine: Dict[int, Dict[str, Dict[str, Tensor]]] = {}
    histories: Dict[int, Optional[Dict]] = {}
    log: List[Dict] = []
    for ticket in ranks.owned(range(model_num_tickets(model))):
        mine[ticket] = {}
        history, history_path, complete = None, None, True
        if record_rounds:
            if checkpoint_dir is not None:
                history_path = os.path.join(checkpoint_dir, f"ticket{ticket}", round_similarity.ROUNDS_FILE)
            try:
                history = round_similarity.RoundHistory.load_or_new(
                    history_path, {name: m[ticket] for name, m in start.items()}
                )
            except round_similarity.RoundHistoryError as exc:
                raise RunStateError(
                    f"{exc}. Delete it to go on without the per-round similarity record, or delete the folder "
                    f"{os.path.dirname(history_path)} to redo ticket {ticket}'s extraction"
                ) from exc
        for target, key in zip(sorted(sparsities), keys):
            if target > 0:
                ckpt = None if checkpoint_dir is None else os.path.join(checkpoint_dir, f"ticket{ticket}", key)
                train_fn = make_train_fn(target)
                if history is not None:
                    train_fn = history.recording(train_fn, ticket, target, history_path)
                imp = IMP(
                    model,
                    train_fn,
                    target,
                    amount=task.settings.prune_count or task.settings.prune_fraction,
                    tickets=[ticket],
                    checkpoint_dir=ckpt,
                    granularity=parse_granularity(task.settings.granularity),
                    progress=progress and ranks.main,
                )
                try:
                    imp.run()
                except CheckpointError as exc:
                    raise RunStateError(
                        f"{exc}. Delete that file to redo the rounds of ticket {ticket} at sparsity {key} from "
                        f"their start (the finished stages are kept)"
                    ) from exc
                log += [dict(entry, target=target, ticket=ticket) for entry in imp.log]
                if history is not None:
                    complete = history.finish(model, ticket, target, imp.round, history_path) and complete
            mine[ticket][key] = {name: m[ticket].clone() for name, m in _masks_of(model).items()}
        if history is not None:
            histories[ticket] = history.state_dict() if complete else None
    snapshots = {key: {name: m.clone() for name, m in start.items()} for key in keys}
    logs = []
    gathered: Dict[int, Optional[Dict]] = {}
    for masks_of_rank, log_of_rank, histories_of_rank in ranks.gather((mine, log, histories)):
        logs += log_of_rank
        gathered.update(histories_of_rank)
        for ticket, per_key in masks_of_rank.items():
            for key, masks in per_key.items():
                for name, row in masks.items():
                    snapshots[key][name][ticket] = row
    logs.sort(key=lambda entry: (entry["target"], entry["ticket"], entry["round"]))
    out = {"masks": snapshots, "log": logs}
    if record_rounds:
        out["histories"] = [
            None if gathered[t] is None else round_similarity.RoundHistory.from_state(gathered[t])
            for t in sorted(gathered)
        ]
    return out


# -- speed ----------------------------------------------------------------------------------------------------

# Timing of the speed table: the three models in turn, so that a slow spell of the machine hits all of them; at
# least MIN_REPEATS rounds after WARMUP, more (up to MAX_REPEATS) until each model has run MIN_SECONDS. A model whose
# p10-p90 spread exceeds SPREAD_FLAG of its median is flagged in the report.
WARMUP, MIN_REPEATS, MAX_REPEATS, MIN_SECONDS, SPREAD_FLAG = 3, 11, 101, 0.5, 0.2


def interleaved_ms(
    fns: Dict[str, Callable[[], object]],
    warmup: int = WARMUP,
    min_repeats: int = MIN_REPEATS,
    max_repeats: int = MAX_REPEATS,
    min_seconds: float = MIN_SECONDS,
) -> Dict[str, Dict[str, float]]:
    """Median, p10 and p90 ms of each function, timed in turn (one call of each per round).

    Args:
        fns: name -> a call to time.
        warmup: untimed rounds first.
        min_repeats / max_repeats: timed rounds, at least / at most.
        min_seconds: rounds go on (up to max_repeats) until every function has run this long in total.

    Returns:
        name -> {"median": ms, "p10": ms, "p90": ms, "repeats": rounds, "spread": (p90 - p10) / median}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < max_repeats and (rounds < min_repeats or min(sum(t) for t in times.values()) < min_seconds * 1e3):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    out = {}
    for name, t in times.items():
        median, p10, p90 = (float(v) for v in np.percentile(t, [50, 10, 90]))
        out[name] = {"median": median, "p10": p10, "p90": p90, "repeats": rounds, "spread": (p90 - p10) / median}
    return out


def measure_speed(task: Task, dense: nn.Module, routed_model: nn.Module, backend: Optional[str]) -> Dict[str, float]:
    """Inference ms of a mixed-ticket batch: rtl kernels, dense model, naive per-ticket loop (reference), timed in
    turn (see interleaved_ms)."""
    x, route = task.timing_batch()
    dense.eval()
    routed_model.eval()
    routed = RoutedModel(routed_model)
    with torch.no_grad():

        def ours():
            if backend:
                with rtl_kernels.set_backend(backend):
                    return task.forward(lambda inp: routed(inp, route), x)
            return task.forward(lambda inp: routed(inp, route), x)

        def naive():
            with rtl_kernels.set_backend("reference"):
                return task.forward(lambda inp: routed(inp, route), x)

        timed = interleaved_ms({"dense": lambda: task.forward(dense, x), "rtl": ours, "naive": naive})
        result = {"batch": int(x.shape[0]), "repeats": timed["rtl"]["repeats"]}
        for name, t in timed.items():
            result[f"{name}_ms"] = t["median"]
            result[f"{name}_spread"] = t["spread"]
        result["unstable"] = any(t["spread"] > SPREAD_FLAG for t in timed.values())
    result["rtl_vs_dense"] = result["dense_ms"] / result["rtl_ms"]
    result["rtl_vs_naive"] = result["naive_ms"] / result["rtl_ms"]
    return result


# -- the protocol -----------------------------------------------------------------------------------------------


def _routed_fn(task: Task, model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    routed = RoutedModel(model)
    return lambda x, route: task.forward(lambda inp: routed(inp, route), x)


def _multi_fn(task: Task, models: List[nn.Module]) -> Callable[[Tensor, Tensor], Tensor]:
    def fn(x, route):
        out = None
        for t, model in enumerate(models):
            rows = (route == t).nonzero().flatten()
            if rows.numel() == 0:
                continue
            with use_route(model, torch.zeros(rows.numel(), dtype=torch.int64, device=x.device)):
                y = task.forward(model, x[rows])
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out[rows] = y
        return out

    return fn


def _single_fn(task: Task, model: nn.Module) -> Callable[[Tensor], Tensor]:
    def fn(x):
        with use_route(model, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)):
            return task.forward(model, x)

    return fn


def run_protocol(
    task: Task,
    out_dir: str,
    sparsities: Sequence[float],
    seed: int,
    config: Dict,
    resume: bool = False,
    backend: Optional[str] = None,
    progress: bool = True,
    device="cpu",
    log: Callable[[str], None] = print,
    ranks: Optional[Ranks] = None,
) -> Dict:
    """Run (or resume) every stage of the protocol on ``task`` and return the metrics (also in metrics.json).

    With ``ranks`` (several processes started by torchrun, see :mod:`rtl.experiments.ranks`) rank 0 owns the run
    directory; Alg. 1 and the independent models are spread over the ranks and Alg. 2 runs data-parallel.

    Args:
        task: the experiment's :class:`~rtl.experiments.tasks.Task`.
        out_dir: the run directory.
        sparsities: targets in [0, 1).
        seed: the run's seed; every stage derives its own from it.
        config: the run's configuration, written to config.json (and compared on resume).
        resume: continue a run in ``out_dir``; otherwise ``out_dir`` must not hold one.
        backend: rtl_kernels backend for the routed models (None: automatic).
        device: where models and data live ("cpu" or "cuda"); the task's tensors must already be there.
        progress: show progress bars.
        log: where one-line progress messages go (rank 0 only).
        ranks: this process's rank among the run's processes (default: a single process).

    Raises:
        RunStateError: ``out_dir`` cannot be resumed, or holds a run when ``resume`` is False.
        RunLockedError: another process is running in ``out_dir``.

    Returns:
        The metrics dictionary.
    """
    ranks = ranks or Ranks()
    lock = None

    def take_directory() -> StageStore:
        nonlocal lock
        if not resume or os.path.isfile(os.path.join(out_dir, "config.json")):
            lock = RunLock(out_dir)  # held until the metrics are written; a killed run's lock dies with it
        return StageStore(out_dir, config, resume)

    try:
        store = ranks.from_main(take_directory)
        if not ranks.main:
            store, log = StageStore.reader(out_dir), lambda message: None
        return _run_protocol(task, store, sparsities, seed, backend, progress and ranks.main, device, log, ranks)
    finally:
        if lock is not None:
            lock.release()


def _run_protocol(task, store, sparsities, seed, backend, progress, device, log, ranks: Ranks) -> Dict:
    out_dir = store.out_dir
    sparsities = sorted(float(s) for s in sparsities)
    s_keys = [f"{s:g}" for s in sparsities]
    filt = task.prunable_filter
    T = task.num_tickets

    def stage(name: str, fn: Callable[[], object], spread: bool = False):
        """A stage's data: loaded when done earlier, else computed by rank 0 (by every rank when ``spread``: the
        stage shares its work out itself) and saved by rank 0; the other ranks read rank 0's file."""
        cached = store.load(name)
        if cached is not None:
            log(f"[{name}] done earlier, loaded")
            return cached
        start = time.perf_counter()

        def compute():
            gen = _seed_all(_stage_seed(seed, name))
            data = fn(gen)
            if ranks.main:
                store.save(name, data)
                if isinstance(data, dict) and "losses" in data:  # the training curve, readable without torch
                    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
                    atomic_json(_jsonable(data["losses"]), os.path.join(out_dir, "logs", f"{name}_losses.json"))
            return data

        computed: Dict[str, object] = {}
        if spread:
            computed["data"] = compute()
            ranks.barrier()
        else:  # rank 0 alone; its failure is raised on every rank
            ranks.from_main(lambda: computed.update(data=compute()))
        data = computed.get("data")
        if not ranks.main:
            data = store.load(name)
        log(f"[{name}] {time.perf_counter() - start:.1f} s")
        return data

    theta0 = stage(
        "init",
        lambda gen: {"dense": task.build_model(seed).state_dict(), "single": _single_model(task, seed).state_dict()},
    )

    def routed_model(tickets: int, single: bool = False) -> nn.Module:
        model = _single_model(task, seed) if single else task.build_model(seed)
        model.load_state_dict(theta0["single" if single else "dense"])
        return convert_(model.to(device), tickets, filter_fn=filt)

    # dense baseline
    def dense_stage(gen):
        # trained as one ticket whose mask keeps every weight (the same arithmetic as the dense model), so that
        # every method goes through rtl.train; the plain model is taken out afterwards
        model = routed_model(1)
        fit = train_plain(task, model, gen, steps=retraining_steps(task))
        model = extract_ticket(model, 0)
        return {
            "state": model.state_dict(),
            "losses": fit.losses,
            "budget": fit.budget(),
            "metrics": task.evaluate_single(lambda x: task.forward(model, x)),
        }

    dense = stage("dense", dense_stage)

    # single-mask IMP
    def round_gen(name: str, target: float, ticket: int, round_idx: int) -> torch.Generator:
        # one generator per (stage, target, round, ticket): a round resumed from IMP's checkpoint sees the same
        # batches as it would have in an uninterrupted run
        return torch.Generator().manual_seed(_stage_seed(seed, f"{name}:{target:g}:{round_idx}:{ticket}"))

    def single_masks_stage(gen):
        model = routed_model(1, single=True)
        make = lambda target: (
            lambda m, t, r: (
                train_plain(task, m, round_gen("single_masks", target, t, r), epochs=task.settings.single_epochs).losses
            )
        )
        return extract_masks(task, model, sparsities, make, os.path.join(store.dir, "single_masks_imp"), progress)

    single_masks = stage("single_masks", single_masks_stage)

    # RTL Alg. 1
    def rtl_masks_stage(gen):
        model = routed_model(T)
        make = lambda target: (
            lambda m, t, r: train_ticket_steps(
                task, m, t, round_steps(task, t), round_gen("rtl_masks", target, t, r)
            ).losses[0]
        )
        checkpoints = os.path.join(store.dir, "rtl_masks_imp")
        data = extract_masks(task, model, sparsities, make, checkpoints, progress, ranks, record_rounds=True)
        histories = data.pop("histories")
        # S_k per IMP round (json-ready, saved with the stage); rank 0's file is what every rank reads
        data["rounds"] = round_similarity.round_scores(histories) if ranks.main else None
        if ranks.main and data["rounds"] is None and T > 1:
            log(
                "[rtl_masks] no S_k per IMP round: the extraction resumed from IMP checkpoints without the rounds "
                "before them recorded (a run begun by an older rtl)"
            )
        return data

    rtl_masks = stage("rtl_masks", rtl_masks_stage, spread=True)
    if ranks.main:
        os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
        for name, data in (("single_masks", single_masks), ("rtl_masks", rtl_masks)):
            atomic_json(_jsonable(data["log"]), os.path.join(out_dir, "logs", f"{name}_rounds.json"))
    rounds = rtl_masks.get("rounds")  # absent from a stage saved by an older rtl
    single_masks, rtl_masks = single_masks["masks"], rtl_masks["masks"]

    results: Dict = {"dense": dense["metrics"], "dense_budget": dense["budget"], "sparsities": {}}
    for s, key in zip(sparsities, s_keys):

        def single_stage(gen, key=key):
            model = routed_model(1, single=True)
            _load_masks(model, single_masks[key])
            fit = train_plain(task, model, gen, steps=retraining_steps(task))
            return {
                "losses": fit.losses,
                "budget": fit.budget(),
                "metrics": task.evaluate_single(_single_fn(task, model)),
                "counts": rtl_metrics.parameter_counts(model),
            }

        def rtl_stage(gen, key=key):
            model = routed_model(T)
            _load_masks(model, rtl_masks[key])
            fit = train_joint(task, model, task.settings.retrain_epochs, gen, ranks)
            if not ranks.main:  # the weights are the same on every rank: rank 0 evaluates them
                return None
            return {
                "state": model.state_dict(),
                "losses": fit.losses,
                "budget": fit.budget(),
                "metrics": task.evaluate_routed(_routed_fn(task, model)),
                "counts": rtl_metrics.parameter_counts(model),
                "jaccard": diagnostics.jaccard_matrix(model),
                "similarity": diagnostics.ticket_similarity_scores(model),
                "similarity_chance_corrected": diagnostics.chance_corrected_similarity(model),
            }

        def multi_model(t: int, key=key) -> nn.Module:
            model = routed_model(1)
            _load_masks(model, {n: m[t : t + 1] for n, m in rtl_masks[key].items()})
            return model

        def multi_stage(gen, key=key):
            # the T independent models are spread over the ranks, each with its own generator
            trained = {}
            with_data = sum(1 for t in range(T) if task.ticket_batch_count(t))
            steps = retraining_steps(task) // max(with_data, 1)  # together, the RTL retraining's steps
            for t in ranks.owned(range(T)):
                model = multi_model(t)
                own_gen = torch.Generator().manual_seed(_stage_seed(seed, f"multi@{key}:{t}"))
                fit = train_ticket_steps(task, model, t, steps, own_gen, route_ticket=0)
                trained[t] = ({name: v.cpu() for name, v in model.state_dict().items()}, fit.budget())
            trained = {t: entry for part in ranks.gather(trained) for t, entry in part.items()}
            if not ranks.main:
                return None
            models = []
            for t in range(T):
                model = multi_model(t)
                model.load_state_dict(trained[t][0])
                models.append(model)
            return {
                "metrics": task.evaluate_routed(_multi_fn(task, models)),
                "budget": {k: sum(trained[t][1][k] for t in range(T)) for k in ("steps", "samples")},
            }

        single_r = stage(f"single@{key}", single_stage)
        rtl_r = stage(f"rtl@{key}", rtl_stage, spread=True)
        multi_r = stage(f"multi@{key}", multi_stage, spread=True)
        results["sparsities"][key] = {
            "single": {"metrics": single_r["metrics"], "counts": single_r["counts"], "budget": single_r["budget"]},
            "rtl": {
                "metrics": rtl_r["metrics"],
                "budget": rtl_r["budget"],
                "counts": rtl_r["counts"],
                "jaccard": rtl_r["jaccard"].tolist(),
                "similarity": rtl_r["similarity"].tolist(),
                "similarity_chance_corrected": rtl_r["similarity_chance_corrected"].tolist(),
            },
            "multi": {
                "metrics": multi_r["metrics"],
                "counts": {"sum": rtl_r["counts"]["sum"], "models": T},
                "budget": multi_r["budget"],
            },
        }

    results["collapse"] = collapse_study(
        task.kind,
        {key: rtl_masks[key] for key in s_keys},
        {key: results["sparsities"][key]["rtl"]["metrics"] for key in s_keys},
    )
    if rounds:
        results["rounds"] = rounds

    def speed_stage(gen):
        dense_model = task.build_model(seed)
        dense_model.load_state_dict(dense["state"])
        dense_model.to(device)
        out = {}
        for key in s_keys:
            model = routed_model(T)
            model.load_state_dict(store.load(f"rtl@{key}")["state"])
            out[key] = measure_speed(task, dense_model, model, backend)
        return out

    results["speed"] = stage("speed", speed_stage)
    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "backend": backend or "auto",
        "backends": rtl_kernels.available_backends(),
        "processes": ranks.world,
    }
    if ranks.main:
        atomic_json(_jsonable(results), os.path.join(out_dir, "metrics.json"))
    return results


def _single_model(task: Task, seed: int) -> nn.Module:
    build = getattr(task, "build_single_model", None)
    return build(seed) if build is not None else task.build_model(seed)


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
