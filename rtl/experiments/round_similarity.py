"""S_k per IMP round: the paper's similarity diagnostic after every pruning round of Alg. 1, not only at the targets.

Alg. 1 extracts every ticket with its own IMP run (one run per target sparsity, each continuing from the previous
masks), and all tickets follow the same round schedule, so round r of one ticket is comparable with round r of the
others. :class:`RoundHistory` keeps one ticket's mask after each of its rounds, compactly and resumably (a file next
to the ticket's IMP checkpoints); :func:`round_scores` lines the tickets' rounds up and measures each round's masks
with :class:`rtl.diagnostics.CollapseMonitor` (global and per-layer S_k); :func:`report_lines` and :func:`plots`
are the report's section "S_k per IMP round" and its plot ``similarity_per_round.png``.
"""

from __future__ import annotations

import bisect
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..diagnostics import CollapseMonitor
from ..state_io import atomic_save, first_line

__all__ = [
    "MAX_ROWS",
    "ROUNDS_FILE",
    "RoundHistory",
    "RoundHistoryError",
    "plots",
    "report_lines",
    "round_masks",
    "round_scores",
]

#: The file of a ticket's round history, in its folder of IMP checkpoints (``<checkpoint_dir>/ticket<t>/``).
ROUNDS_FILE = "rounds.pt"
_FORMAT, _VERSION = "rtl.imp_rounds", 1

Key = Tuple[float, int]  # (target sparsity of the IMP run, round index within that run)


class RoundHistoryError(ValueError):
    """A round-history file that cannot be resumed (unreadable, not one, or made for other layers)."""


class RoundHistory:
    """One ticket's mask after each of its IMP rounds, over all target sparsities, in one int tensor per layer.

    Masks only shrink over IMP's rounds, so each weight is kept up to some round and pruned from then on:
    ``kept[layer]`` (int16, the layer's weight shape; int32 past 32,766 rounds) holds, per weight, how many of the
    recorded rounds it survived, and -1 for a weight already pruned before the first round. The mask after the i-th
    recorded round is ``kept > i`` (i = -1: the mask before any round). This costs 2 bytes per weight whatever the
    number of rounds, against a byte per weight and round for the masks themselves.

    Args:
        start: {layer name: bool mask of the ticket before its first round (*weight.shape)}.

    Attributes:
        keys: [(target, round within that target's IMP run)] of the recorded rounds, in order.
        kept: {layer name: int tensor (*weight.shape)} on the CPU.
    """

    def __init__(self, start: Dict[str, Tensor]) -> None:
        self.keys: List[Key] = []
        self.kept = {name: torch.where(mask.cpu(), 0, -1).to(torch.int16) for name, mask in start.items()}

    # -- recording -------------------------------------------------------------------------------------------------
    def record(self, key: Key, masks: Dict[str, Tensor]) -> None:
        """Append a round: ``masks`` {layer: bool (*weight.shape)} is the ticket's mask after it."""
        count = len(self.keys) + 1
        for name, mask in masks.items():
            kept = self.kept[name]
            if count >= torch.iinfo(kept.dtype).max:  # int16 runs out past 32,766 rounds
                kept = kept.to(torch.int32)
            self.kept[name] = torch.where(mask.cpu(), count, kept).to(kept.dtype)
        self.keys.append((float(key[0]), int(key[1])))

    def truncate(self, key: Key) -> bool:
        """Forget the rounds from ``key`` on (a redone IMP run records them again); True if any was dropped."""
        count = bisect.bisect_left(self.keys, (float(key[0]), int(key[1])))
        if count == len(self.keys):
            return False
        self.keys = self.keys[:count]
        self.kept = {name: kept.clamp(max=count) for name, kept in self.kept.items()}
        return True

    def rounds_of(self, target: float) -> List[int]:
        return [r for t, r in self.keys if t == float(target)]

    def mask_after(self, index: int) -> Dict[str, Tensor]:
        """The mask {layer: bool (*weight.shape)} after the index-th recorded round (-1: before the first)."""
        return {name: kept > index for name, kept in self.kept.items()}

    def recording(
        self, train_fn: Callable[[nn.Module, int, int], object], ticket: int, target: float, path: Optional[str]
    ) -> Callable[[nn.Module, int, int], object]:
        """``train_fn`` that first records the previous round of the IMP run to ``target``.

        When IMP starts round r's training, the model holds the ticket's mask after round r - 1, already in IMP's
        checkpoint: recording it here (and saving to ``path``) rather than after the round keeps the history in
        step with the checkpoint whatever the moment of an interruption (a round finished and checkpointed but not
        yet recorded is recorded when the resumed run starts the next one, or by :meth:`finish`).
        """

        def train(model: nn.Module, t: int, round_idx: int):
            changed = self.truncate((target, round_idx))
            if round_idx > 0 and (not self.keys or self.keys[-1] != (float(target), round_idx - 1)):
                self.record((target, round_idx - 1), _ticket_masks(model, ticket))
                changed = True
            if changed and path is not None:
                self.save(path)
            return train_fn(model, t, round_idx)

        return train

    def finish(self, model: nn.Module, ticket: int, target: float, rounds: int, path: Optional[str]) -> bool:
        """Record the last round of the IMP run to ``target`` (``rounds`` rounds finished) if it is not yet.

        Returns:
            Whether the history holds every round of that run, 0 .. rounds - 1 (False after a resume from IMP
            checkpoints that have no history beside them, e.g. a run begun by an older rtl).
        """
        if rounds > 0 and (float(target), rounds - 1) not in self.keys:
            self.truncate((target, rounds - 1))
            self.record((target, rounds - 1), _ticket_masks(model, ticket))
            if path is not None:
                self.save(path)
        return self.rounds_of(target) == list(range(rounds))

    # -- persistence -----------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Plain containers and tensors (``torch.load(weights_only=True)`` reads them)."""
        return {"format": _FORMAT, "version": _VERSION, "keys": [list(k) for k in self.keys], "kept": dict(self.kept)}

    @classmethod
    def from_state(cls, state: Dict) -> "RoundHistory":
        history = cls({})
        history.keys = [(float(t), int(r)) for t, r in state["keys"]]
        history.kept = dict(state["kept"])
        return history

    def save(self, path: str) -> None:
        atomic_save(self.state_dict(), path)

    @classmethod
    def load_or_new(cls, path: Optional[str], start: Dict[str, Tensor]) -> "RoundHistory":
        """The history saved at ``path`` (checked against the layers of ``start``), else a new one from ``start``.

        Raises:
            RoundHistoryError: the file is unreadable, not a round history, or made for other layers.
        """
        if path is None or not os.path.isfile(path):
            return cls(start)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RoundHistoryError(f"cannot read the round history {path!r}: {first_line(exc)}") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise RoundHistoryError(f"{path!r} is not an rtl round history of version {_VERSION}")
        shapes = {name: tuple(kept.shape) for name, kept in state["kept"].items()}
        if shapes != {name: tuple(mask.shape) for name, mask in start.items()}:
            raise RoundHistoryError(f"the round history {path!r} was written for other layers")
        return cls.from_state(state)


def _ticket_masks(model: nn.Module, ticket: int) -> Dict[str, Tensor]:
    return {name: m.weight_masks[ticket] for name, m in model.named_modules() if hasattr(m, "weight_masks")}


# -- scores ---------------------------------------------------------------------------------------------------------
def round_masks(histories: Sequence[RoundHistory]):
    """Every round of the tickets' common schedule with all tickets' masks after it.

    The schedule is the union of the tickets' round keys, in order (the same for every ticket unless a structured
    ticket stopped early); a ticket without a given round contributes its mask after its last round before it.

    Yields:
        ((target, round within its IMP run), {layer: bool masks (T, *weight.shape)}).
    """
    keys = sorted({key for history in histories for key in history.keys})
    for key in keys:
        index = [bisect.bisect_right(history.keys, key) - 1 for history in histories]
        per_ticket = [history.mask_after(i) for history, i in zip(histories, index)]
        yield key, {name: torch.stack([masks[name] for masks in per_ticket]) for name in per_ticket[0]}


def round_scores(histories: Sequence[Optional[RoundHistory]]) -> Optional[List[Dict]]:
    """The similarity diagnostic of every IMP round: the json-ready ``metrics["rounds"]`` of a run.

    Args:
        histories: one :class:`RoundHistory` per ticket (T >= 2); None marks a ticket whose history is incomplete.

    Returns:
        One dict per round, in order: ``round`` (0, 1, ... over all targets), ``target`` and ``target_round`` (the
        IMP run and its round), ``sparsity`` (mean over tickets of the fraction of prunable weights removed),
        ``ticket_sparsity`` (T,), ``scores`` (global S_k, (T,)), ``chance_corrected`` (T,), ``jaccard`` (T, T) and
        ``layer_scores`` ({layer: (T,)}); None when a history is missing or T < 2 (S_k needs two tickets).
    """
    if len(histories) < 2 or any(history is None for history in histories):
        return None
    monitor = CollapseMonitor(per_layer=True)
    out = []
    for index, ((target, target_round), masks) in enumerate(round_masks(histories)):
        entry = monitor.record(index, masks)
        out.append(
            {
                "round": index,
                "target": target,
                "target_round": target_round,
                **{k: entry[k] for k in ("sparsity", "ticket_sparsity", "scores", "chance_corrected", "jaccard")},
                "layer_scores": entry["layer_scores"],
            }
        )
        monitor.history.clear()  # the entries are copied out; the monitor's per-layer matrices need not pile up
    return out


# -- report ---------------------------------------------------------------------------------------------------------
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


#: Table rows of the report's section at most (the paper's schedule runs thousands of rounds); the plot has them all.
MAX_ROWS = 40


def _shown(rounds: List[Dict]) -> List[Dict]:
    """At most about MAX_ROWS rounds, evenly spread, always with the last round of every IMP run (a target)."""
    step = -(-len(rounds) // MAX_ROWS)
    last = {entry["target"]: entry["round"] for entry in rounds}
    return [e for i, e in enumerate(rounds) if i % step == 0 or last[e["target"]] == e["round"]]


def report_lines(rounds: List[Dict]) -> List[str]:
    """The report section "S_k per IMP round": a table row per round of Alg. 1 (every few rounds past MAX_ROWS)."""
    shown = _shown(rounds)
    lines = [
        "",
        "## S_k per IMP round",
        "",
        "The paper's diagnostic after every pruning round of Alg. 1 (the tickets' masks before joint retraining; "
        "every ticket follows the same round schedule): the round's sparsity, the mean over tickets of S_k over all "
        "prunable weights and of the mean per-layer S_k, and the lowest and highest ticket S_k."
        + (
            f" {len(shown)} of the {len(rounds)} rounds are shown (evenly spread, and the last of each target); "
            "metrics.json and the plot have them all."
            if len(shown) < len(rounds)
            else ""
        ),
        "",
        "| round | IMP run (target) | sparsity | mean S_k (global) | mean S_k (per layer) | min S_k | max S_k |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in shown:
        scores = entry["scores"]
        layers = _mean(_mean(v) for v in entry.get("layer_scores", {}).values())
        lines.append(
            f"| {entry['round']} | {entry['target']:g} | {entry['sparsity']:.3f} | {_mean(scores):.3f} | "
            f"{layers:.3f} | {min(scores):.3f} | {max(scores):.3f} |"
        )
    return lines


def plots(run_dir: str, metrics: Dict, config: Dict) -> List[Tuple[str, str]]:
    """``similarity_per_round.png``: per-ticket S_k against each round's sparsity, the targets and any flagged
    collapse marked (the paper's Fig. 2 view, per round). Returns [(file name, title)], empty without rounds."""
    rounds = metrics.get("rounds")
    if not rounds:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still has every number
        return []
    xs = [entry["sparsity"] for entry in rounds]
    names = config.get("ticket_names") or [f"ticket {t}" for t in range(len(rounds[0]["scores"]))]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t, name in enumerate(names):
        ax.plot(xs, [entry["scores"][t] for entry in rounds], marker=".", label=name)
    for i, key in enumerate(sorted(metrics.get("sparsities", {}), key=float)):
        label = "target sparsity (joint retraining)" if i == 0 else None
        ax.axvline(float(key), color="grey", linestyle=":", label=label)
    flagged = sorted({f["sparsity"] for f in (metrics.get("collapse") or {}).get("flagged", [])})
    for i, sparsity in enumerate(flagged):
        ax.axvline(sparsity, color="red", linestyle="--", label="collapse flagged" if i == 0 else None)
    ax.set_xlabel("sparsity after the IMP round (mean over the tickets' masks)")
    ax.set_ylabel("S_k: mean Jaccard to the other tickets")
    ax.set_title(f"{config.get('experiment', '')}: ticket similarity per IMP round")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "similarity_per_round.png"), dpi=120)
    plt.close(fig)
    return [("similarity_per_round.png", "per-ticket S_k per IMP round vs sparsity (paper Fig. 2 view, per round)")]
