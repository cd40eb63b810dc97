"""Mask-similarity diagnostics: Jaccard between tickets, per-ticket scores, chance correction, a collapse monitor.

The paper (arXiv 2601.22141, Eq. 8) compares two tickets by the Jaccard index of their masks,
J(M_i, M_j) = |M_i ∩ M_j| / |M_i ∪ M_j|, counted element-wise over all prunable weights (globally) or per layer,
and scores each ticket by its mean J to the other tickets, S_k = mean_{j != k} J(M_k, M_j). It reads collapse off
the curves of S_k and accuracy over pruning rounds; the direction of the similarity change at collapse differs
between its experiments (rising on CIFAR, falling in the INR figures), so :class:`CollapseMonitor` flags a change
in either direction.

Random masks overlap by chance: two independent masks of densities a and b have E[J] ≈ ab / (a + b - ab)
(d / (2 - d) when both have density d), which rises as d falls. :func:`chance_corrected_similarity` reports
(J - E[J]) / (1 - E[J]): 0 means no more overlap than chance, 1 means identical masks.

Everything here needs only the masks: a model (every submodule with a bool buffer ``weight_masks`` (T, ...)) or a
dict {layer name: bool tensor (T, ...)}. Conventions: J of two empty masks is 1.0 (they are identical); results
are float64 tensors on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .masks_io import collect_masks

__all__ = [
    "CollapseMonitor",
    "chance_corrected_similarity",
    "expected_random_jaccard",
    "jaccard_matrix",
    "ticket_similarity_scores",
]

# Columns per matmul chunk: bounds the float copy of a layer's masks to T x _CHUNK floats, and keeps each partial
# count below 2**24 so float32 sums of 0/1 products stay exact integers before they are accumulated in float64.
_CHUNK = 1 << 20

_Counts = Tuple[Tensor, Tensor, int]  # (intersections (T, T), sizes (T,), number of weights), all counts exact


# -- counting ---------------------------------------------------------------------------------------------------------
def _layer_counts(mask: Tensor) -> _Counts:
    """Pairwise intersection sizes (T, T) float64, mask sizes (T,) float64 and weight count of one layer's masks."""
    flat = mask.reshape(mask.shape[0], -1)
    num_tickets, numel = flat.shape
    inter = torch.zeros(num_tickets, num_tickets, dtype=torch.float64)
    for start in range(0, numel, _CHUNK):
        chunk = flat[:, start : start + _CHUNK].to(torch.float32)
        inter += (chunk @ chunk.T).to(device="cpu", dtype=torch.float64)
    sizes = flat.sum(1).to(device="cpu", dtype=torch.float64)
    return inter, sizes, numel


def _all_counts(masks: Dict[str, Tensor]) -> Dict[str, _Counts]:
    return {name: _layer_counts(mask) for name, mask in masks.items()}


def _global_counts(counts: Dict[str, _Counts]) -> _Counts:
    inter = sum(c[0] for c in counts.values())
    sizes = sum(c[1] for c in counts.values())
    return inter, sizes, sum(c[2] for c in counts.values())


def _jaccard(inter: Tensor, sizes: Tensor) -> Tensor:
    union = sizes[:, None] + sizes[None, :] - inter
    # Two empty masks are the same (empty) set: J = 1 keeps the diagonal at 1 and J(i, j) = 1 iff M_i == M_j.
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _expected_jaccard(counts: Dict[str, _Counts]) -> Tensor:
    """E[J] (T, T) for independent random masks with each ticket's density in each layer (ratio of expectations)."""
    expected_inter = None
    sizes_total = None
    for _, sizes, numel in counts.values():
        # A random mask of density a_l in a layer of n_l weights meets another of density b_l in n_l a_l b_l
        # places on average; layer by layer because global pruning leaves layers at different densities.
        part = sizes[:, None] * sizes[None, :] / max(numel, 1)  # an empty layer has sizes 0: adds nothing
        expected_inter = part if expected_inter is None else expected_inter + part
        sizes_total = sizes if sizes_total is None else sizes_total + sizes
    return _jaccard(expected_inter, sizes_total)


def _kappa(jaccard: Tensor, expected: Tensor) -> Tensor:
    # E[J] = 1 only when both masks are full or both empty: then chance already forces J = 1 and the
    # correction 0/0 is undefined, reported as NaN.
    denom = 1.0 - expected
    return torch.where(denom > 1e-12, (jaccard - expected) / denom.clamp_min(1e-12), torch.full_like(jaccard, math.nan))


def _mean_others(matrix: Tensor, nan_skip: bool = False) -> Tensor:
    """(T,) mean over j != k of matrix[k, j]; needs T >= 2."""
    num_tickets = matrix.shape[0]
    if num_tickets < 2:
        raise ValueError(
            f"per-ticket similarity needs at least 2 tickets (a ticket has no others to compare with), "
            f"got num_tickets={num_tickets}"
        )
    off = ~torch.eye(num_tickets, dtype=torch.bool)
    values = matrix[off].reshape(num_tickets, num_tickets - 1)
    return values.nanmean(1) if nan_skip else values.mean(1)


def _check_flag(value, arg: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be a bool, got {value!r}")
    return value


# -- public functions -------------------------------------------------------------------------------------------------
def jaccard_matrix(model_or_masks, per_layer: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
    """The (T, T) Jaccard similarity J(M_i, M_j) = |M_i ∩ M_j| / |M_i ∪ M_j| between all pairs of tickets.

    Counted element-wise over all prunable weights of all layers together (global, the paper's Eq. 8), or layer
    by layer. Two empty masks have J = 1.0 (identical sets). Counts come from chunked matmuls of the flattened
    masks (|M_i ∩ M_j| = M @ M.T), so memory stays bounded and the counts are exact.

    Args:
        model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}.
        per_layer: if True, return one matrix per layer.

    Returns:
        (T, T) float64 CPU tensor, symmetric with a diagonal of 1; or {layer name: (T, T)} when per_layer.

    Example:
        >>> masks = {"fc": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)}
        >>> jaccard_matrix(masks)
        tensor([[1.0000, 0.3333],
                [0.3333, 1.0000]], dtype=torch.float64)
    """
    counts = _all_counts(collect_masks(model_or_masks))
    if _check_flag(per_layer, "per_layer"):
        return {name: _jaccard(inter, sizes) for name, (inter, sizes, _) in counts.items()}
    inter, sizes, _ = _global_counts(counts)
    return _jaccard(inter, sizes)


def ticket_similarity_scores(model_or_masks, per_layer: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
    """The paper's per-ticket score S_k = mean over j != k of J(M_k, M_j): how much ticket k shares with the rest.

    A single ticket has no others to compare with, so T = 1 raises ValueError (rather than returning NaN, which
    would surface far from its cause).

    Args:
        model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}, T >= 2.
        per_layer: if True, return the scores computed on each layer's masks alone.

    Returns:
        (T,) float64 CPU tensor in [0, 1]; or {layer name: (T,)} when per_layer.

    Example:
        >>> masks = {"fc": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)}
        >>> ticket_similarity_scores(masks)  # ticket 0: (1/3 + 1) / 2
        tensor([0.6667, 0.3333, 0.6667], dtype=torch.float64)
    """
    jaccard = jaccard_matrix(model_or_masks, per_layer=per_layer)
    if isinstance(jaccard, dict):
        return {name: _mean_others(matrix) for name, matrix in jaccard.items()}
    return _mean_others(jaccard)


def expected_random_jaccard(model_or_masks, per_layer: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
    """E[J] (T, T) for independent uniformly random masks with the same density as each ticket, layer by layer.

    For two random masks of densities a and b in a layer of n weights the expected intersection is n·a·b and the
    expected union n·(a + b - ab), so E[J] ≈ ab / (a + b - ab) (= d / (2 - d) when a = b = d). The global value
    sums the expected intersections and unions over layers, so a model pruned to different densities per layer is
    compared with random masks of those same per-layer densities. The ratio of expectations is accurate for layers
    of more than a few hundred weights. Both masks empty gives 1.0, as in :func:`jaccard_matrix`.

    Args:
        model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}.
        per_layer: if True, return one matrix per layer.

    Returns:
        (T, T) float64 CPU tensor; or {layer name: (T, T)} when per_layer.

    Example:
        >>> masks = {"fc": torch.rand(2, 100, 100) < 0.5}
        >>> expected_random_jaccard(masks)[0, 1]  # about 0.5 / 1.5
        tensor(0.3333, dtype=torch.float64)
    """
    counts = _all_counts(collect_masks(model_or_masks))
    if _check_flag(per_layer, "per_layer"):
        return {name: _expected_jaccard({name: c}) for name, c in counts.items()}
    return _expected_jaccard(counts)


def chance_corrected_similarity(
    model_or_masks, per_layer: bool = False, matrix: bool = False
) -> Union[Tensor, Dict[str, Tensor]]:
    """Ticket similarity corrected for chance overlap: kappa = (J - E[J]) / (1 - E[J]) per pair of tickets.

    E[J] is :func:`expected_random_jaccard`: what independent random masks with the same per-layer densities
    would score. kappa is 0 for overlap at chance level, 1 for identical masks and negative for masks that avoid
    each other. It is NaN for a pair whose masks are both full or both empty, where chance alone forces J = 1.
    The per-ticket score is the mean over j != k of kappa(k, j), skipping NaN pairs (NaN if all are).

    Args:
        model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}.
        per_layer: if True, correct each layer on its own and return a dict.
        matrix: if True, return the (T, T) kappa matrix instead of the (T,) per-ticket means.

    Returns:
        (T,) float64 CPU tensor (T >= 2 needed, else ValueError), or (T, T) when matrix; a dict {layer name: ...}
        of those when per_layer.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> masks = {"fc": torch.rand(3, 200, 200, generator=g) < 0.3}
        >>> chance_corrected_similarity(masks).abs().max() < 0.02  # independent masks: chance level
        tensor(True)
    """
    counts = _all_counts(collect_masks(model_or_masks))
    _check_flag(per_layer, "per_layer")
    _check_flag(matrix, "matrix")

    def corrected(part: Dict[str, _Counts]) -> Tensor:
        inter, sizes, _ = _global_counts(part)
        kappa = _kappa(_jaccard(inter, sizes), _expected_jaccard(part))
        return kappa if matrix else _mean_others(kappa, nan_skip=True)

    if per_layer:
        return {name: corrected({name: c}) for name, c in counts.items()}
    return corrected(counts)


# -- collapse monitor -------------------------------------------------------------------------------------------------
def _to_float_list(values, length: int, arg: str) -> List[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{arg} must be a sequence of {length} numbers (one per ticket), got {type(values).__name__}")
    if len(values) != length:
        raise ValueError(f"{arg} must hold one value per ticket ({length}), got {len(values)}")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{arg} must hold numbers, got {v!r}")
        else:
            out.append(float(v))
    return out


def _matrix_list(matrix: Tensor) -> List[List[float]]:
    return [[float(v) for v in row] for row in matrix.tolist()]


class CollapseMonitor:
    """Records mask similarity and per-ticket metrics over pruning rounds and flags suspected collapse.

    At each round :meth:`record` stores the sparsity, the global (T, T) Jaccard matrix, the per-ticket scores
    S_k, their chance-corrected variant and whatever per-ticket metrics the caller measured (accuracy, PSNR, ...).
    :meth:`flagged` lists the (round, ticket) pairs where a ticket's similarity score changed by more than a
    threshold, in either direction, while its metric dropped by more than a threshold. The paper gives no
    threshold and no stopping rule; the defaults here are a starting point, not the paper's.

    ``history`` is a list of plain dicts (ints, floats, lists, dicts), one per round, ready for json; NaN stands
    for undefined values (json writes it as NaN). :meth:`state_dict` / :meth:`load_state_dict` and
    :meth:`to_json` / :meth:`from_json` let a monitor resume with its run.

    Args:
        per_layer: also record each layer's Jaccard matrix and scores (keys ``layer_jaccard``, ``layer_scores``).

    Example:
        >>> monitor = CollapseMonitor()
        >>> for r, masks in enumerate(rounds_of_masks):
        ...     monitor.record(r, masks, metrics={"accuracy": per_ticket_accuracy[r]})
        >>> monitor.flagged(metric="accuracy", similarity_jump=0.05, metric_drop=0.05)
        [{'round': 7, 'ticket': 3, 'similarity_change': 0.12, 'metric_change': -0.21}]
    """

    _STATE_VERSION = 1

    def __init__(self, per_layer: bool = False) -> None:
        self.per_layer = _check_flag(per_layer, "per_layer")
        self.history: List[Dict[str, Any]] = []

    @property
    def num_tickets(self) -> Optional[int]:
        """T of the recorded masks, or None before the first record."""
        return len(self.history[0]["scores"]) if self.history else None

    def record(
        self,
        round: int,
        model_or_masks,
        metrics: Optional[Mapping[str, Sequence[float]]] = None,
        sparsity: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Measure the masks after pruning round ``round`` and store them with the caller's per-ticket metrics.

        Rounds must not go back; recording the last round again replaces it (a run resumed after a crash may
        redo its last round).

        Args:
            round: the pruning round (int >= 0).
            model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}, T >= 2.
            metrics: {metric name: T values (list, tensor (T,) or array)}, one value per ticket; None entries are
                stored as NaN.
            sparsity: the round's sparsity to store; None computes it from the masks as the mean over tickets
                of the fraction of prunable weights removed.

        Returns:
            The stored entry (a dict: round, sparsity, ticket_sparsity, jaccard, scores, chance_corrected,
            metrics, and layer_jaccard / layer_scores when per_layer).
        """
        try:
            round = operator.index(round)
        except TypeError:
            raise TypeError(f"round must be an int, got {round!r}") from None
        if isinstance(round, bool) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        last = self.history[-1]["round"] if self.history else None
        if last is not None and round < last:
            raise ValueError(f"round {round} comes before the last recorded round {last}: rounds must not go back")

        counts = _all_counts(collect_masks(model_or_masks))
        inter, sizes, numel = _global_counts(counts)
        num_tickets = len(sizes)
        if self.num_tickets is not None and num_tickets != self.num_tickets:
            raise ValueError(
                f"model_or_masks has {num_tickets} tickets but the monitor recorded {self.num_tickets} so far"
            )
        jaccard = _jaccard(inter, sizes)
        scores = _mean_others(jaccard)
        kappa = _mean_others(_kappa(jaccard, _expected_jaccard(counts)), nan_skip=True)
        ticket_sparsity = (1.0 - sizes / numel).tolist() if numel > 0 else [math.nan] * num_tickets
        if sparsity is None:
            sparsity = sum(ticket_sparsity) / num_tickets
        elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1] or None, got {sparsity!r}")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict {{name: per-ticket values}} or None, got {type(metrics).__name__}")
        stored_metrics = {}
        for name, values in (metrics or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"metrics: names must be str, got {name!r}")
            stored_metrics[name] = _to_float_list(values, num_tickets, f"metrics[{name!r}]")

        entry: Dict[str, Any] = {
            "round": round,
            "sparsity": float(sparsity),
            "ticket_sparsity": [float(s) for s in ticket_sparsity],
            "jaccard": _matrix_list(jaccard),
            "scores": scores.tolist(),
            "chance_corrected": kappa.tolist(),
            "metrics": stored_metrics,
        }
        if self.per_layer:
            entry["layer_jaccard"] = {name: _matrix_list(_jaccard(c[0], c[1])) for name, c in counts.items()}
            entry["layer_scores"] = {name: _mean_others(_jaccard(c[0], c[1])).tolist() for name, c in counts.items()}
        if last is not None and round == last:
            self.history[-1] = entry
        else:
            self.history.append(entry)
        return entry

    def flagged(
        self,
        metric: str = "accuracy",
        similarity_jump: float = 0.05,
        metric_drop: float = 0.05,
        *,
        score: str = "scores",
        lead: int = 0,
        higher_is_better: bool = True,
    ) -> List[Dict[str, Any]]:
        """The (round, ticket) pairs where the similarity score moved by more than ``similarity_jump`` (either
        direction) while ``metric`` dropped by more than ``metric_drop``, each against the previous recorded round.

        Args:
            metric: the name of a metric given to :meth:`record`.
            similarity_jump: threshold (>= 0) on |change| of the ticket's score between consecutive rounds.
            metric_drop: threshold (>= 0) on the metric's drop between the same rounds (a fall when
                ``higher_is_better``, a rise otherwise), in the metric's units.
            score: "scores" (the paper's S_k) or "chance_corrected".
            lead: how many earlier round-to-round steps a similarity change may precede the drop by (the paper
                says the similarity change "precedes or coincides" with the accuracy drop); 0 = same step only.
            higher_is_better: False for metrics such as loss, whose rise is the drop.

        Returns:
            A list of dicts {round, ticket, similarity_change, metric_change} sorted by round then ticket; round is
            the round where the metric dropped, similarity_change the signed change of largest size in the window,
            metric_change the signed change of the metric. Rounds where the metric was not recorded are skipped.

        Example:
            >>> monitor.flagged("accuracy", similarity_jump=0.1, metric_drop=0.1, lead=1)
            [{'round': 9, 'ticket': 0, 'similarity_change': -0.18, 'metric_change': -0.3}]
        """
        if not isinstance(metric, str):
            raise TypeError(f"metric must be a str, got {metric!r}")
        if score not in ("scores", "chance_corrected"):
            raise ValueError(f"score must be 'scores' or 'chance_corrected', got {score!r}")
        for arg, value in (("similarity_jump", similarity_jump), ("metric_drop", metric_drop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{arg} must be a number >= 0, got {value!r}")
        if isinstance(lead, bool) or not isinstance(lead, int) or lead < 0:
            raise ValueError(f"lead must be an int >= 0, got {lead!r}")
        _check_flag(higher_is_better, "higher_is_better")
        if not self.history:
            return []
        recorded = sorted({name for entry in self.history for name in entry["metrics"]})
        if metric not in recorded:
            raise ValueError(f"metric {metric!r} was never recorded; recorded metrics: {recorded}")

        sign = 1.0 if higher_is_better else -1.0
        flags = []
        for i in range(1, len(self.history)):
            prev, cur = self.history[i - 1]["metrics"].get(metric), self.history[i]["metrics"].get(metric)
            if prev is None or cur is None:
                continue
            for ticket in range(len(cur)):
                change = cur[ticket] - prev[ticket]
                if not sign * change < -metric_drop:  # NaN compares False: undefined metrics never flag
                    continue
                steps = range(max(1, i - lead), i + 1)
                moves = [self.history[j][score][ticket] - self.history[j - 1][score][ticket] for j in steps]
                moves = [m for m in moves if not math.isnan(m)]
                if not moves:
                    continue
                biggest = max(moves, key=abs)
                if abs(biggest) > similarity_jump:
                    flags.append(
                        {
                            "round": self.history[i]["round"],
                            "ticket": ticket,
                            "similarity_change": biggest,
                            "metric_change": change,
                        }
                    )
        return flags

    # -- persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """A plain dict (json-ready, a deep copy) from which :meth:`load_state_dict` restores this monitor."""
        return {"version": self._STATE_VERSION, "per_layer": self.per_layer, "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history and settings from :meth:`state_dict`'s output (replacing what is recorded).

        Args:
            state_dict: a dict as returned by :meth:`state_dict` (also after a json round trip).
        """
        if not isinstance(state_dict, Mapping) or "history" not in state_dict or "version" not in state_dict:
            raise ValueError("state_dict is not a CollapseMonitor state (needs keys 'version' and 'history')")
        if state_dict["version"] != self._STATE_VERSION:
            raise ValueError(
                f"state_dict has CollapseMonitor state version {state_dict['version']!r}; "
                f"this rtl reads version {self._STATE_VERSION}"
            )
        history = list(state_dict["history"])
        for entry in history:
            missing = {"round", "sparsity", "jaccard", "scores", "chance_corrected", "metrics"} - set(entry)
            if missing:
                raise ValueError(f"state_dict: a history entry lacks {sorted(missing)}")
        self.per_layer = _check_flag(state_dict.get("per_layer", False), "per_layer")
        self.history = copy.deepcopy(history)

    def to_json(self, **kwargs) -> str:
        """The state as json text (NaN written as NaN, as Python's json does); kwargs go to json.dumps."""
        return json.dumps(self.state_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "CollapseMonitor":
        """A monitor restored from :meth:`to_json`'s text.

        Args:
            text: the json text.

        Returns:
            A new CollapseMonitor holding the saved history.

        Example:
            >>> restored = CollapseMonitor.from_json(monitor.to_json())
            >>> restored.to_json() == monitor.to_json()
            True
        """
        monitor = cls()
        monitor.load_state_dict(json.loads(text))
        return monitor
