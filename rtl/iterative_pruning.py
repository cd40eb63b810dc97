"""Iterative magnitude pruning per ticket (the paper's Alg. 1, "adaptive ticket extraction"), resumable.

:class:`IMP` extracts every ticket's mask from one shared initialisation theta0: train the ticket for a few steps
on its subset, prune its mask by the magnitude of the weights it reached, rewind all weights to theta0, repeat
until the target sparsity. Tickets do not interact beyond the shared theta0 (the paper: equivalent to K
independent IMP runs). Rounds are checkpointed atomically so that an interrupted extraction resumes where it
stopped and ends with the same masks as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .prune import (
    FilterFn,
    check_granularity,
    check_scope,
    check_tickets,
    block_shape,
    kept_counts,
    prunable_layers,
    prune_ticket_,
    round_half_up,
    ticket_scores,
)
from .state_io import atomic_save, first_line, rng_state, set_rng_state

__all__ = ["IMP", "CheckpointError"]

_FORMAT = "rtl.imp"  # the checkpoint tag keeps the module's former name, so older checkpoints still resume
_VERSION = 1
CHECKPOINT_NAME = "imp_checkpoint.pt"


class CheckpointError(ValueError):
    """An IMP checkpoint that cannot be resumed: unreadable, not IMP's, another version, model or settings.
    The file is left as it is."""


def _is_mask(name: str) -> bool:
    return name == "weight_masks" or name.endswith(".weight_masks")


def _snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """Off-module copy of every parameter and buffer except the masks: {name: tensor}."""
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if not _is_mask(name)})
    return state


def _restore_(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """Copy ``state`` back into the model's parameters and buffers, bit for bit, and drop stale gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
            p.grad = None
        for name, b in model.named_buffers():
            if not _is_mask(name):
                b.copy_(state[name])


def _plain(value: Any) -> Any:
    """A train_fn result as plain Python (numbers, strings, lists, dicts) so the log survives weights_only loads."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _largest_remainder(planned: List[int], total: int) -> List[int]:
    """Scale the per-layer counts ``planned`` down to sum exactly ``total`` (< sum(planned)), as evenly as can be.

    Each layer gets floor(planned * total / sum); the leftover units go to the largest fractional parts, ties to
    the earlier layer, so the split is deterministic and no layer gets more than it planned.
    """
    whole = sum(planned)
    shares = [p * total for p in planned]
    alloc = [s // whole for s in shares]
    left = total - sum(alloc)
    by_remainder = sorted(range(len(planned)), key=lambda i: (-(shares[i] % whole), i))
    for i in by_remainder[:left]:
        alloc[i] += 1
    return alloc


class IMP:
    """Iterative magnitude pruning of every ticket from one shared theta0: the paper's Alg. 1.

    For each round and each ticket k still below the target: ``train_fn(model, k, round)`` trains the routed model
    on subset k (masked training: routed by k, pruned weights get no gradient); the magnitudes of the weights it
    reached, theta_T^(k), rank ticket k's kept weights and the lowest are pruned; then every parameter and buffer
    (BN statistics included; not the masks) is rewound bit-exactly to the rewind point, so the next ticket trains
    from the same start. At the end the model holds theta0 (or the rewind point) and every ticket's mask at the
    target: the paper's f(x; m_k * theta0), ready for joint retraining (Alg. 2).

    Decisions where the paper is silent or inconsistent (docs/paper_notes.md, choices 1-5):

    - Loop condition: a ticket is pruned while its sparsity is below the target (Alg. 1's "density(m_K) < s" read
      as "sparsity(m_k) < s", for every k). The target is a count, round(target_sparsity * prunable) halves up,
      and the last round is clipped to it, so every ticket ends exactly at the target (unstructured).
    - Amount: an int is a fixed count per round and ticket (the appendices remove 4,096); a float p is Alg. 1's
      fraction of the ticket's remaining prunable weights, rounded halves up and at least 1 so a round always
      progresses. With ``scope="layer"`` the amount applies to each layer (an int clipped to what a layer still
      keeps), and a clipped last round is shared among the layers in proportion to what each would have lost
      (largest remainders).
    - Ranking: global over the prunable layers by default (a fixed global count cannot be layer-wise for small
      layers); among the ticket's currently kept weights only, so masks only shrink.
    - Masked training is the train_fn's job: it runs the model routed by its ticket (``model(x, route)`` through
      :class:`rtl.RoutedModel` or :func:`rtl.use_route`), which gives pruned weights no gradient.
    - Rewind: ``"init"`` rewinds to theta0, the weights at the start (the paper); an int r rewinds to the weights
      after r optimizer steps of the first ticket's training in the first round (late rewinding), counted by a
      global optimizer step hook on optimizers holding the model's parameters. Snapshots live in dicts of tensors
      on this object, never as module attributes. Gradients are cleared at every rewind; the train_fn builds a
      fresh optimizer at each call, so no optimizer state crosses rounds or tickets.
    - Order: each ticket is pruned right after its training, before the rewind, from its own trained weights,
      which is equivalent to training all tickets then pruning them all (tickets share nothing but the rewind
      point) without keeping T copies of the trained weights. If a round raises (train_fn error, interrupt), the
      masks and weights return to where the round started.
    - Structured granularity: rounds never remove more than asked (see :func:`rtl.prune.magnitude_prune_`); a
      ticket whose round removes nothing (its smallest group is larger than the request) stops with a
      RuntimeWarning, below the target.

    Resuming: with ``checkpoint_dir``, every finished round writes ``imp_checkpoint.pt`` atomically (temporary
    file then ``os.replace``) holding theta0, the rewind point, the masks, the round index, the log and the RNG
    states (torch, CUDA, numpy, Python ``random``), all as tensors and plain containers that
    ``torch.load(weights_only=True)`` reads. A new ``IMP(...)`` with the same arguments then resumes after the
    last finished round and ends with the same masks as an uninterrupted run, provided train_fn draws its
    randomness from those global generators (a DataLoader with its own generator must be seeded per round).
    A checkpoint written for another model or other settings raises ValueError and is left untouched.

    Args:
        model: a model with routed layers (T tickets).
        train_fn: ``train_fn(model, ticket, round_idx) -> None | dict`` trains the model on the ticket's subset
            for the round's steps; what it returns (e.g. losses) goes into the log as plain values.
        target_sparsity: float in [0, 1], the fraction of the prunable weights each ticket ends without.
        amount: int >= 1 (weights per ticket and round) or float in (0, 1) (fraction of the remaining weights).
        scope: "global" or "layer" ranking.
        granularity: "unstructured", ("block", bn, bk), ("vector", v) or "channel".
        filter_fn: ``filter_fn(name, module) -> bool`` selects the prunable routed layers (default: all).
        tickets: the tickets to extract (default: all); the others are left alone.
        rewind: "init" or an int >= 0 (steps of the first training).
        checkpoint_dir: a folder for the resumable checkpoint, or None.
        progress: show a tqdm bar over rounds.
        callbacks: ``callback(imp, round_log)`` called after each finished round (after its checkpoint).

    Attributes:
        log: list of per-round dicts: ``round``, ``tickets`` (trained this round), ``removed`` {ticket: count},
            ``sparsity`` {ticket: sparsity after the round, for every extracted ticket}, ``train`` {ticket:
            train_fn's return}, ``wall_time`` (seconds).
        round: the number of finished rounds.
        theta0, rewind_point: the snapshots {name: tensor}.
        target_count: the number of prunable weights each ticket ends without.

    Example:
        >>> def train_fn(model, ticket, round_idx):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     for x, y in loaders[ticket]:
        ...         loss = F.cross_entropy(model(x, torch.full((len(x),), ticket)), y)
        ...         opt.zero_grad(); loss.backward(); opt.step()
        ...     return {"loss": loss.item()}
        >>> log = IMP(rtl.RoutedModel(model), train_fn, target_sparsity=0.5, amount=4096).run()
    """

    def __init__(
        self,
        model: nn.Module,
        train_fn: Callable[[nn.Module, int, int], Optional[dict]],
        target_sparsity: float,
        amount: Union[int, float] = 0.2,
        scope: str = "global",
        granularity="unstructured",
        filter_fn: Optional[FilterFn] = None,
        tickets=None,
        rewind: Union[str, int] = "init",
        checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
        progress: bool = True,
        callbacks: Sequence[Callable[["IMP", dict], Any]] = (),
    ) -> None:
        if not callable(train_fn):
            raise TypeError(f"train_fn must be callable(model, ticket, round_idx), got {type(train_fn).__name__}")
        self.layers = prunable_layers(model, filter_fn)
        if (
            isinstance(target_sparsity, bool)
            or not isinstance(target_sparsity, (int, float))
            or not 0.0 <= target_sparsity <= 1.0
        ):
            raise ValueError(f"target_sparsity must be a number in [0, 1], got {target_sparsity!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"amount must be an int count or a float fraction, got {type(amount).__name__}")
        if isinstance(amount, int) and amount < 1:
            raise ValueError(f"amount must be an int >= 1 (weights per round), got {amount}")
        if isinstance(amount, float) and not 0.0 < amount < 1.0:
            raise ValueError(f"amount must be a float in (0, 1) (a fraction of the remaining weights), got {amount}")
        if not (rewind == "init" or (isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= 0)):
            raise ValueError(f'rewind must be "init" or an int >= 0 (optimizer steps), got {rewind!r}')
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks must be callables(imp, round_log), got {type(cb).__name__}")
        self.model = model
        self.train_fn = train_fn
        self.target_sparsity = float(target_sparsity)
        self.amount = amount
        self.scope = check_scope(scope)
        self.granularity = check_granularity(granularity)
        self.num_tickets = self.layers[0][1].num_tickets
        self.tickets = check_tickets(tickets, self.num_tickets)
        self.rewind = rewind
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.progress = progress
        self.callbacks = callbacks
        self.prunable = sum(m.weight.numel() for _, m in self.layers)
        self.target_count = min(self.prunable, round_half_up(self.target_sparsity * self.prunable))
        self._blocks = None
        if self.granularity[0] != "unstructured":
            self._blocks = [block_shape(tuple(m.weight.shape), self.granularity) for _, m in self.layers]
        self.log: List[dict] = []
        self.round = 0
        self.theta0: Optional[Dict[str, Tensor]] = None
        self.rewind_point: Optional[Dict[str, Tensor]] = None
        self.stopped: List[int] = []  # tickets a structured round could not prune further

    # -- configuration and checkpoint ------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, CHECKPOINT_NAME)

    def config(self) -> dict:
        """The settings and model layout a checkpoint must match to be resumed (plain values)."""
        state = {name: [list(t.shape), str(t.dtype)] for name, t in _snapshot_meta(self.model)}
        return {
            "target_sparsity": self.target_sparsity,
            "amount": self.amount,
            "amount_kind": type(self.amount).__name__,
            "scope": self.scope,
            "granularity": list(self.granularity),
            "tickets": list(self.tickets),
            "num_tickets": self.num_tickets,
            "rewind": self.rewind,
            "prunable": {name: list(m.weight.shape) for name, m in self.layers},
            "state": state,
        }

    def _save_checkpoint(self) -> None:
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config(),
            "round": self.round,
            "theta0": self.theta0,
            "rewind_point": None if self.rewind_point is self.theta0 else self.rewind_point,
            "masks": {name: m.weight_masks.detach().cpu().clone() for name, m in self.layers},
            "log": self.log,
            "stopped": list(self.stopped),
            "rng": rng_state(),
        }
        atomic_save(payload, self.checkpoint_path)

    def _load_checkpoint(self) -> bool:
        """Restore the state of the last finished round; False when there is no checkpoint. Checks come first."""
        path = self.checkpoint_path
        if path is None or not os.path.exists(path):
            return False
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read the IMP checkpoint {path!r}: {first_line(exc)}") from exc
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise CheckpointError(f"{path!r} is not an rtl IMP checkpoint")
        if payload.get("version") != _VERSION:
            raise CheckpointError(
                f"IMP checkpoint {path!r} has version {payload.get('version')!r}, this rtl reads version {_VERSION}"
            )
        missing = [
            k
            for k in ("config", "theta0", "rewind_point", "masks", "round", "log", "stopped", "rng")
            if k not in payload
        ]
        if missing:
            raise CheckpointError(f"the IMP checkpoint {path!r} lacks {', '.join(missing)}: remove it to redo the run")
        saved, current = payload["config"], self.config()
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            detail = "; ".join(
                f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
                for k in diff
                if k not in ("state", "prunable")
            )
            shapes = [k for k in diff if k in ("state", "prunable")]
            if shapes:
                detail = "; ".join(filter(None, [detail, f"the model's {' and '.join(shapes)} shapes differ"]))
            raise CheckpointError(
                f"the IMP checkpoint {path!r} was written for another model or settings "
                f"({detail}); remove it or pass another checkpoint_dir"
            )
        device_of = dict(_snapshot_meta(self.model))
        self.theta0 = {k: v.to(device_of[k].device) for k, v in payload["theta0"].items()}
        if payload["rewind_point"] is None:
            self.rewind_point = self.theta0
        else:
            self.rewind_point = {k: v.to(device_of[k].device) for k, v in payload["rewind_point"].items()}
        with torch.no_grad():
            for name, m in self.layers:
                m.weight_masks.copy_(payload["masks"][name])
        _restore_(self.model, self.rewind_point if self.rewind_point is not None else self.theta0)
        self.round = payload["round"]
        self.log = payload["log"]
        self.stopped = list(payload["stopped"])
        set_rng_state(payload["rng"])
        return True

    # -- the loop --------------------------------------------------------------------------------------------------
    def _removed_so_far(self) -> Dict[int, int]:
        kept = sum(kept_counts(m) for _, m in self.layers)
        return {t: self.prunable - int(kept[t]) for t in self.tickets}

    def _active(self) -> List[int]:
        removed = self._removed_so_far()
        return [t for t in self.tickets if removed[t] < self.target_count and t not in self.stopped]

    def _request(self, ticket: int):
        """This round's removal for a ticket: an int (global scope) or per-layer ints (layer scope), clipped."""
        kept = [int(m.weight_masks[ticket].count_nonzero()) for _, m in self.layers]
        to_target = self.target_count - (self.prunable - sum(kept))
        if self.scope == "global":
            if isinstance(self.amount, int):
                count = self.amount
            else:
                count = max(1, round_half_up(self.amount * sum(kept)))
            return min(count, to_target)
        if isinstance(self.amount, int):
            planned = [min(self.amount, k) for k in kept]
        else:
            planned = [round_half_up(self.amount * k) for k in kept]
            if sum(planned) == 0:
                # A fraction of tiny remainders rounds to nothing everywhere: take one weight from the fullest layer.
                planned[max(range(len(kept)), key=lambda i: (kept[i], -i))] = 1
        if sum(planned) > to_target:
            planned = _largest_remainder(planned, to_target)
        return planned

    def _estimate_rounds(self) -> Optional[int]:
        """Rounds left for the least pruned ticket, for the progress bar (exact for unstructured global)."""
        removed = self._removed_so_far()
        left = [self.target_count - removed[t] for t in self._active()]
        if not left:
            return self.round
        start = max(left)
        kept, rounds = self.prunable - (self.target_count - start), 0
        while start > 0 and rounds < 100_000:
            step = self.amount if isinstance(self.amount, int) else max(1, round_half_up(self.amount * kept))
            step = min(step, start)
            start, kept, rounds = start - step, kept - step, rounds + 1
        return self.round + rounds

    def _train_and_prune(self, ticket: int) -> tuple:
        """Train one ticket from the rewind point, prune it by its trained weights, rewind. -> (removed, result)."""
        capture = self.rewind_point is None
        steps = [0]
        handle = None
        if capture:
            param_ids = {id(p) for p in self.model.parameters()}

            def count_step(optimizer, args, kwargs):
                if any(id(p) in param_ids for group in optimizer.param_groups for p in group["params"]):
                    steps[0] += 1
                    if steps[0] == self.rewind:
                        self.rewind_point = _snapshot(self.model)

            handle = register_optimizer_step_post_hook(count_step)
        try:
            result = self.train_fn(self.model, ticket, self.round)
        finally:
            if handle is not None:
                handle.remove()
        if capture and self.rewind_point is None:
            raise ValueError(
                f"rewind={self.rewind} needs that many optimizer steps in the first training, but "
                f"train_fn took {steps[0]}"
            )
        request = self._request(ticket)
        scores = ticket_scores(self.layers, ticket, None)  # |theta_T^(k)|: the weights the ticket just reached
        removed = sum(prune_ticket_(self.layers, ticket, scores, request, self.scope, self._blocks))
        _restore_(self.model, self.rewind_point)
        return removed, _plain(result)

    def run(self) -> List[dict]:
        """Prune every ticket to the target (resuming from the checkpoint if there is one); returns the log.

        Returns:
            The per-round log (list of dicts, see the class docstring). The model is left at the rewind point
            with every extracted ticket's mask at the target sparsity.
        """
        if not self._load_checkpoint():
            self.theta0 = _snapshot(self.model)
            self.rewind_point = self.theta0 if self.rewind in ("init", 0) else None
        bar = None
        if self.progress:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is an optional dependency (pip install rtl[method])
                warnings.warn(
                    "IMP: progress=True needs tqdm, which is not installed; running without a bar",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                bar = tqdm(total=self._estimate_rounds(), initial=self.round, desc="IMP", unit="round")
        try:
            while True:
                active = self._active()
                if not active:
                    break
                round_log = self._run_round(active)
                if bar is not None:
                    bar.total = max(self._estimate_rounds(), self.round)
                    bar.set_postfix(sparsity=min(round_log["sparsity"].values()), refresh=False)
                    bar.update(1)
                for cb in self.callbacks:
                    cb(self, round_log)
        finally:
            if bar is not None:
                bar.close()
        return self.log

    def _run_round(self, active: List[int]) -> dict:
        start = time.perf_counter()
        masks_before = [m.weight_masks.clone() for _, m in self.layers]
        first_round_capture = self.rewind_point is None
        removed, results = {}, {}
        try:
            for ticket in active:
                removed[ticket], results[ticket] = self._train_and_prune(ticket)
        except BaseException:
            # Leave the model where the round started: the checkpoint and a rerun continue from there.
            with torch.no_grad():
                for (_, m), before in zip(self.layers, masks_before):
                    m.weight_masks.copy_(before)
            if first_round_capture:
                self.rewind_point = None
            _restore_(self.model, self.theta0 if self.rewind_point is None else self.rewind_point)
            raise
        for ticket in active:
            if removed[ticket] == 0:
                self.stopped.append(ticket)
                warnings.warn(
                    f"IMP: a round removed no weight of ticket {ticket}: its lowest-scored {self.granularity[0]} "
                    f"group holds more weights than the round's request; it stops at sparsity "
                    f"{self._sparsity()[ticket]:.4f}, below the target {self.target_sparsity}. Use a larger "
                    f"amount or a finer granularity.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.round += 1
        sparsity = self._sparsity()
        round_log = {
            "round": self.round - 1,
            "tickets": list(active),
            "removed": removed,
            "sparsity": {t: sparsity[t] for t in self.tickets},
            "train": results,
            "wall_time": time.perf_counter() - start,
        }
        self.log.append(round_log)
        if self.checkpoint_dir is not None:
            self._save_checkpoint()
        return round_log

    def _sparsity(self) -> Dict[int, float]:
        removed = self._removed_so_far()
        return {t: removed[t] / self.prunable for t in self.tickets}


def _snapshot_meta(model: nn.Module):
    """(name, tensor) of every parameter and buffer a snapshot holds, without copying."""
    items = list(model.named_parameters())
    items += [(name, b) for name, b in model.named_buffers() if not _is_mask(name)]
    return items
