"""Magnitude pruning of ticket masks: each ticket drops its lowest-importance kept weights, masks only shrink.

:func:`magnitude_prune_` edits the bool buffers ``weight_masks`` (T, *weight.shape) of a model's routed layers in
place. Each ticket is ranked on its own: by default on |weight|, or on a per-ticket importance such as the
magnitude of the weights that ticket reached after training (the paper's Alg. 1 ranks by theta_T^(k)). The amount
is a fraction of the ticket's remaining weights or an exact count (the paper removes 4,096 per round), ranked
across all prunable layers at once (``scope="global"``) or within each layer (``scope="layer"``), weight by weight
or in groups (blocks, vectors, output channels) so that the kernels can skip whole tiles.

:func:`ticket_sparsity` and :func:`prunable_count` measure what is pruned. The IMP driver (Alg. 1) lives in
:mod:`rtl.iterative_pruning` (``rtl.prune.IMP`` and ``rtl.imp.IMP``, its former names, still work with a
DeprecationWarning).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .nn import RoutedSparseModule, routed_modules

__all__ = ["magnitude_prune_", "prunable_count", "ticket_sparsity"]

FilterFn = Callable[[str, nn.Module], bool]
Granularity = Tuple  # normalised: ("unstructured",), ("block", bn, bk), ("vector", v), ("channel",)
Layers = List[Tuple[str, RoutedSparseModule]]

_SCOPES = ("global", "layer")


def __getattr__(name):
    # IMP lives in rtl.iterative_pruning, which imports this module; the old name rtl.prune.IMP keeps working, with
    # a warning.
    if name == "IMP":
        import warnings

        from .iterative_pruning import IMP

        message = "rtl.prune.IMP moved: use rtl.iterative_pruning.IMP (or rtl.IMP)"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return IMP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- layers, counts and sparsity -------------------------------------------------------------------------------------
def prunable_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Layers:
    """The routed layers selected by ``filter_fn``, in ``named_modules()`` order; ValueError if none or T differs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(name, module) -> bool, got {type(filter_fn).__name__}")
    layers = [(name, m) for name, m in routed_modules(model) if filter_fn is None or filter_fn(name, m)]
    if not layers:
        what = "routed layers" if filter_fn is None else "routed layers selected by filter_fn"
        raise ValueError(f"the model has no {what}: convert it first with rtl.convert_(model, num_tickets)")
    counts = {name: m.num_tickets for name, m in layers}
    if len(set(counts.values())) != 1:
        raise ValueError(f"routed layers disagree on num_tickets: {counts}")
    return layers


def prunable_count(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> int:
    """Number of prunable weights of one ticket: the weight elements of the routed layers ``filter_fn`` selects.

    Args:
        model: a model with routed layers.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the prunable routed layers (default: all).

    Returns:
        The count (the same for every ticket; biases are never counted).

    Example:
        >>> prunable_count(nn.Sequential(RoutedSparseLinear(8, 4, num_tickets=3)))
        32
    """
    return sum(m.weight.numel() for _, m in prunable_layers(model, filter_fn))


def ticket_sparsity(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Tensor:
    """Per-ticket sparsity: the fraction of the prunable weights each ticket has pruned.

    Args:
        model: a model with routed layers.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the prunable routed layers (default: all).

    Returns:
        (T,) float64 tensor on the CPU, each entry in [0, 1].

    Example:
        >>> ticket_sparsity(model)
        tensor([0.0000, 0.2500, 0.2500], dtype=torch.float64)
    """
    layers = prunable_layers(model, filter_fn)
    total = sum(m.weight.numel() for _, m in layers)
    # (total - kept) / total, not 1 - kept / total: exact counts give the correctly rounded fraction.
    return (total - _kept_per_ticket(layers)).double() / total


def kept_counts(module: RoutedSparseModule) -> Tensor:
    """(T,) int64 CPU: the weights each ticket keeps in one layer."""
    # A whole-tensor count_nonzero per ticket is about 100x faster on the CPU than a reduction over dim 1.
    return torch.stack([m.count_nonzero() for m in module.weight_masks]).cpu()


def _kept_per_ticket(layers: Layers) -> Tensor:
    """(T,) int64 CPU: kept prunable weights per ticket."""
    return sum(kept_counts(m) for _, m in layers)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _fraction_count(amount: float, remaining: int) -> int:
    """round(amount * remaining), halves up: the exact number of weights a fraction removes."""
    return min(remaining, round_half_up(amount * remaining))


# -- argument checks -------------------------------------------------------------------------------------------------
def check_granularity(granularity) -> Granularity:
    """Normalise ``granularity`` to a tuple; ValueError naming the value if it is not one of the known forms."""
    if granularity in ("unstructured", "channel"):
        return (granularity,)
    if isinstance(granularity, (tuple, list)) and granularity:
        kind, sizes = granularity[0], tuple(granularity[1:])
        want = {"block": 2, "vector": 1}.get(kind) if isinstance(kind, str) else None
        if want is not None:
            if len(sizes) != want or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
                form = '("block", bn, bk)' if kind == "block" else '("vector", v)'
                raise ValueError(f"granularity {granularity!r} must be {form} with positive int sizes")
            return (kind,) + sizes
    raise ValueError(
        f'unknown granularity {granularity!r}: use "unstructured", "channel", ("block", bn, bk) or ("vector", v)'
    )


def check_scope(scope) -> str:
    if scope not in _SCOPES:
        raise ValueError(f'unknown scope {scope!r}: use "global" or "layer"')
    return scope


def _check_amount(amount) -> Union[int, float]:
    """An int >= 0 (a count) or a float in [0, 1) (a fraction of the remaining weights)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be an int count or a float fraction, got {type(amount).__name__}")
    if isinstance(amount, int):
        if amount < 0:
            raise ValueError(f"amount must be an int >= 0 (a count of weights), got {amount}")
    elif not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be a float in [0, 1) (a fraction of the remaining weights), got {amount}")
    return amount


def check_tickets(tickets, num_tickets: int) -> List[int]:
    """Sorted distinct ticket ids in [0, num_tickets); None means all."""
    if tickets is None:
        return list(range(num_tickets))
    if isinstance(tickets, Tensor):
        tickets = tickets.tolist()
    if isinstance(tickets, int) and not isinstance(tickets, bool):
        tickets = [tickets]
    try:
        tickets = list(tickets)
    except TypeError:
        raise TypeError(f"tickets must be an int, a sequence of ints or None, got {type(tickets).__name__}") from None
    for t in tickets:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"tickets must hold ints, got {t!r}")
        if not 0 <= t < num_tickets:
            raise ValueError(f"ticket {t} in tickets is outside [0, {num_tickets})")
    return sorted(set(tickets))


def _check_importance(importance, layers: Layers) -> Optional[Dict[str, Tensor]]:
    """Check an importance dict covers exactly the prunable layers, each as a real tensor (T, *weight.shape)."""
    if importance is None:
        return None
    if not isinstance(importance, Mapping):
        raise TypeError(
            f"importance must be a dict {{layer name: tensor (T, *weight.shape)}}, got {type(importance).__name__}"
        )
    names = [name for name, _ in layers]
    unknown = sorted(set(importance) - set(names))
    if unknown:
        raise ValueError(f"importance names unknown or non-prunable layers {unknown}; prunable layers: {names}")
    missing = [name for name in names if name not in importance]
    if missing:
        raise ValueError(f"importance is missing prunable layers {missing}")
    for name, m in layers:
        value = importance[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"importance[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"importance[{name!r}] must hold real numbers, got dtype {value.dtype}")
        want = tuple(m.weight_masks.shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"importance[{name!r}] has shape {tuple(value.shape)}, expected (T, *weight.shape) = {want}"
            )
    return dict(importance)


# -- selection ------------------------------------------------------------------------------------------------------
def block_shape(weight_shape, granularity: Granularity) -> Optional[Tuple[int, int, int, int]]:
    """(rows, cols, bn, bk): every structured granularity as a bn x bk tiling of the weight's 2-D view.

    The 2-D view is the weight as stored, (shape[0], rest): (out, in * kh * kw) for Linear and Conv2d; for
    ConvTranspose2d the rows are its dim 0, the input channels. "channel" is a (1, cols) tiling and
    ("vector", v) a (1, v) one; None for unstructured.
    """
    kind = granularity[0]
    if kind == "unstructured":
        return None
    rows, cols = weight_shape[0], math.prod(weight_shape[1:])
    if kind == "channel":
        return rows, cols, 1, max(cols, 1)
    if kind == "vector":
        return rows, cols, 1, granularity[1]
    return rows, cols, granularity[1], granularity[2]


def _block_sum(x: Tensor, block: Tuple[int, int, int, int]) -> Tensor:
    """Sum of a flat tensor (rows * cols,) over each bn x bk tile -> (tiles,), edge tiles padded with zeros."""
    rows, cols, bn, bk = block
    gr, gc = -(-rows // bn), -(-cols // bk)
    x = x.view(rows, cols)
    if gr * bn != rows or gc * bk != cols:
        x = torch.nn.functional.pad(x, (0, gc * bk - cols, 0, gr * bn - rows))
    return x.view(gr, bn, gc, bk).sum((1, 3)).reshape(-1)


def _block_expand(tiles: Tensor, block: Tuple[int, int, int, int]) -> Tensor:
    """The inverse layout of _block_sum: a per-tile value (tiles,) broadcast to every element -> (rows * cols,)."""
    rows, cols, bn, bk = block
    gr, gc = -(-rows // bn), -(-cols // bk)
    full = tiles.view(gr, 1, gc, 1).expand(gr, bn, gc, bk).reshape(gr * bn, gc * bk)
    return full[:rows, :cols].reshape(-1)


def _lowest_k(values: Tensor, k: int, candidates: Callable[[], Tensor]) -> Tensor:
    """Bool mask of the k smallest ``values`` (n,) among the candidates; ties go to the lower index.

    Non-candidates must hold +inf and ``candidates()`` returns the (n,) bool candidate mask, built only when the
    threshold is +inf itself (a finite threshold cannot tie with a non-candidate). kthvalue finds the threshold
    in O(n) (a full sort of 11M scores costs about a second on a CPU); only the entries equal to it need an
    order, and nonzero lists them by index, which makes the choice deterministic.
    """
    threshold = values.kthvalue(k).values
    drop = values < threshold
    need = k - int(drop.count_nonzero())
    ties = values == threshold
    if bool(torch.isinf(threshold)):
        ties &= candidates()
    drop[ties.nonzero().squeeze(1)[:need]] = True
    return drop


def _drop_unstructured(keeps: List[Tensor], scores: List[Tensor], request: int) -> Tuple[List[Tensor], int]:
    """Per-layer drop masks (flat bool) removing exactly ``request`` of the kept weights with the lowest scores."""
    sizes = [k.numel() for k in keeps]
    n_kept = sum(int(k.count_nonzero()) for k in keeps)
    request = min(request, n_kept)
    if request == 0:
        return [torch.zeros_like(k) for k in keeps], 0
    if request == n_kept:
        return [k.clone() for k in keeps], request
    # Pruned weights score +inf instead of being compacted away (a boolean gather and scatter of 11M entries
    # cost more than the ranking): the request-th smallest is then the request-th smallest kept score. Each
    # layer writes its slice of one buffer, so the scores are never concatenated first.
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores])
    masked = torch.empty(sum(sizes), dtype=dtype, device=keeps[0].device)
    inf = torch.tensor(float("inf"), dtype=dtype, device=masked.device)
    for keep, score, part in zip(keeps, scores, masked.split(sizes)):
        torch.where(keep, score.to(dtype), inf, out=part)
    drop = _lowest_k(masked, request, candidates=lambda: torch.cat(keeps))
    return list(drop.split(sizes)), request


def _drop_groups(
    keeps: List[Tensor], scores: List[Tensor], blocks: List[Tuple[int, int, int, int]], request: int
) -> Tuple[List[Tensor], int]:
    """Per-layer drop masks removing whole groups, lowest mean kept score first, while the count stays <= request.

    A group's score is the mean score of its kept weights and its size is its number of kept weights (a group
    that is partly pruned already removes only what it still keeps); fully pruned groups score +inf with size 0,
    so they never count. Ties go to the group listed first (layer order, then row-major tile index).
    """
    tile_scores, tile_sizes = [], []
    for keep, score, block in zip(keeps, scores, blocks):
        zero = torch.zeros((), dtype=score.dtype, device=score.device)
        total = _block_sum(torch.where(keep, score, zero), block)
        size = _block_sum(keep.to(torch.int32), block)
        inf = torch.tensor(float("inf"), dtype=total.dtype, device=total.device)
        tile_scores.append(torch.where(size > 0, total / size.clamp(min=1), inf))
        tile_sizes.append(size)
    all_scores, all_sizes = torch.cat(tile_scores), torch.cat(tile_sizes)
    # Every kept group holds at least one weight, so no more than `request` of them can be taken: only the groups
    # scoring at most the request-th smallest score need the (stable, hence tie-deterministic) sort.
    candidates = torch.arange(all_scores.numel(), device=all_scores.device)
    if 0 < request < all_scores.numel():
        threshold = all_scores.kthvalue(request).values
        candidates = (all_scores <= threshold).nonzero().squeeze(1)
    order = candidates[torch.sort(all_scores[candidates], stable=True).indices]
    running = all_sizes[order].cumsum(0)
    # Sizes are >= 0, so the running total never decreases and the groups that fit form a prefix of the ranking.
    taken = int((running <= request).count_nonzero()) if request > 0 else 0
    removed = int(running[taken - 1]) if taken else 0
    chosen = torch.zeros(all_scores.numel(), dtype=torch.bool, device=all_scores.device)
    chosen[order[:taken]] = True
    drops = [
        _block_expand(piece, block) & keep
        for keep, block, piece in zip(keeps, blocks, chosen.split([t.numel() for t in tile_scores]))
    ]
    return drops, removed


def prune_ticket_(
    layers: Layers,
    ticket: int,
    scores: List[Tensor],
    request,
    scope: str,
    blocks: Optional[List[Tuple[int, int, int, int]]],
) -> List[int]:
    """Prune one ticket's masks in place; ``request`` is an int (global) or a list of ints per layer (layer).

    Args:
        layers: the prunable layers.
        ticket: the ticket to prune.
        scores: per layer, the ticket's importance (weight.shape), floating point.
        request: weights to remove: an int over all layers, or one int per layer when scope is "layer".
        scope: "global" or "layer".
        blocks: per layer the (rows, cols, bn, bk) tiling of a structured granularity, or None for unstructured.

    Returns:
        Weights removed per layer.
    """
    keeps = [m.weight_masks[ticket].reshape(-1) for _, m in layers]
    flat_scores = [s.reshape(-1) for s in scores]

    def select(idx: List[int], count: int) -> List[Tensor]:
        ks, ss = [keeps[i] for i in idx], [flat_scores[i] for i in idx]
        if blocks is None:
            return _drop_unstructured(ks, ss, count)[0]
        return _drop_groups(ks, ss, [blocks[i] for i in idx], count)[0]

    if scope == "global":
        drops = select(list(range(len(layers))), request)
    else:
        drops = [select([i], request[i])[0] for i in range(len(layers))]
    removed = []
    with torch.no_grad():
        for (_, m), drop in zip(layers, drops):
            removed.append(int(drop.count_nonzero()))
            # In place on the buffer (not a new tensor) so its version counter moves and the kernels recompile.
            m.weight_masks[ticket].logical_and_(~drop.view(m.weight_masks.shape[1:]))
    return removed


def ticket_scores(layers: Layers, ticket: int, importance: Optional[Dict[str, Tensor]]) -> List[Tensor]:
    """Per layer, the ticket's ranking scores as a floating tensor on the mask's device (ValueError on NaN)."""
    scores = []
    for name, m in layers:
        raw = m.weight.detach().abs() if importance is None else importance[name][ticket]
        raw = raw.to(device=m.weight_masks.device)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        if bool(torch.isnan(raw).any()):
            source = "|weight|" if importance is None else f"importance[{name!r}]"
            raise ValueError(f"{source} of layer {name!r} holds NaN for ticket {ticket}: cannot rank it")
        scores.append(raw)
    return scores


def magnitude_prune_(
    model: nn.Module,
    amount: Union[int, float],
    tickets=None,
    scope: str = "global",
    granularity="unstructured",
    importance: Optional[Mapping[str, Tensor]] = None,
    filter_fn: Optional[FilterFn] = None,
) -> dict:
    """Prune every selected ticket's masks in place, dropping its lowest-importance kept weights.

    Each ticket is ranked on its own, among the weights it still keeps (masks only shrink, a pruned weight never
    comes back). Unstructured counts are exact and ties are broken by position (layer order as
    ``named_modules()`` gives it, then the flat index in the weight), so equal inputs always give equal masks.

    Structured granularities work on the 2-D view of each weight as stored, (shape[0], rest), i.e.
    (out, in * kh * kw) for Linear and Conv2d (for ConvTranspose2d the rows are its dim 0, the input channels):
    ``("block", bn, bk)`` tiles it in bn x bk blocks (edge blocks partial), ``("vector", v)`` cuts each row in
    runs of v consecutive weights (the last run partial), ``"channel"`` takes whole rows. A group is scored by the
    mean importance of the weights it still keeps and removed whole. The requested number of weights is met by
    removing the lowest-scored groups in order for as long as the running total stays within the request, so a
    round never removes more than asked; it is exact when the groups have equal size and the request is a
    multiple of it, and it removes nothing when the lowest group is larger than the request. From all-ones
    masks, blocks stay all kept or all pruned round after round.

    Args:
        model: a model with routed layers (rtl.nn layers or after :func:`rtl.convert_`).
        amount: a float in [0, 1): the fraction of each ticket's remaining prunable weights to remove, rounded
            to the nearest integer count (halves up); or an int >= 0: the exact number of weights per ticket
            (the paper removes 4,096 per round). With ``scope="layer"`` it applies to each layer separately.
        tickets: an int, a sequence of ints in [0, T), or None for every ticket.
        scope: "global" ranks all prunable layers of a ticket together (what the paper's fixed count implies);
            "layer" removes the amount from each layer separately.
        granularity: "unstructured", ("block", bn, bk), ("vector", v) or "channel".
        importance: None to rank by |weight|, or a dict {layer name as ``named_modules()`` gives it: tensor
            (T, *weight.shape)}, higher = more important, covering every prunable layer; row t ranks ticket t
            (Alg. 1 passes the magnitude of each ticket's own trained weights). Values are used as given
            (no abs). An expanded view (``w.abs().expand(T, *w.shape)``) costs no memory.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the prunable routed layers (default: all; the
            paper keeps BN, SE and the classifier dense, by not converting them or filtering them out here).

    Returns:
        A report dict: ``"tickets"`` the pruned tickets; ``"requested"`` and ``"removed"`` {ticket: weights};
        ``"sparsity"`` {ticket: new sparsity over the prunable weights}; ``"layer_density"`` {layer name: list
        of T kept fractions}.

    Raises:
        ValueError: no (selected) routed layers, unknown scope or granularity, amount out of range or above a
            ticket's (or layer's) remaining weights, tickets out of range, importance with unknown or missing
            layer names or wrong shapes, NaN importance.

    Example:
        >>> model = nn.Sequential(RoutedSparseConv2d(1, 4, 3, 2, padding=1), nn.ReLU(), nn.Flatten(),
        ...                       RoutedSparseLinear(256, 10, 2))
        >>> report = magnitude_prune_(model, 100)          # 100 weights per ticket, global ranking on |weight|
        >>> report["removed"]
        {0: 100, 1: 100}
    """
    layers = prunable_layers(model, filter_fn)
    scope = check_scope(scope)
    granularity = check_granularity(granularity)
    amount = _check_amount(amount)
    num_tickets = layers[0][1].num_tickets
    tickets = check_tickets(tickets, num_tickets)
    importance = _check_importance(importance, layers)

    kept = [kept_counts(m) for _, m in layers]  # per layer (T,)
    requests = {}
    for t in tickets:
        if scope == "global":
            remaining = int(sum(k[t] for k in kept))
            if isinstance(amount, float):
                requests[t] = _fraction_count(amount, remaining)
            elif amount > remaining:
                raise ValueError(f"amount {amount} exceeds the {remaining} prunable weights ticket {t} still keeps")
            else:
                requests[t] = amount
        else:
            per_layer = []
            for (name, _), k in zip(layers, kept):
                remaining = int(k[t])
                if isinstance(amount, float):
                    per_layer.append(_fraction_count(amount, remaining))
                elif amount > remaining:
                    raise ValueError(
                        f"amount {amount} exceeds the {remaining} weights ticket {t} still keeps in "
                        f"layer {name!r} (scope='layer' removes the count from every layer)"
                    )
                else:
                    per_layer.append(amount)
            requests[t] = per_layer

    blocks = None
    if granularity[0] != "unstructured":
        blocks = [block_shape(tuple(m.weight.shape), granularity) for _, m in layers]
    removed = {}
    shared = ticket_scores(layers, 0, None) if importance is None else None  # |weight| is the same for all
    for t in tickets:
        scores = shared if shared is not None else ticket_scores(layers, t, importance)
        per_layer = prune_ticket_(layers, t, scores, requests[t], scope, blocks)
        for k, r in zip(kept, per_layer):
            k[t] -= r  # the counts stay current without another pass over the masks
        removed[t] = sum(per_layer)

    total = sum(m.weight.numel() for _, m in layers)
    sparsity = (total - sum(kept)).double() / total
    return {
        "tickets": tickets,
        "requested": {t: (r if isinstance(r, int) else sum(r)) for t, r in requests.items()},
        "removed": removed,
        "sparsity": {t: float(sparsity[t]) for t in tickets},
        "layer_density": {name: (k.double() / m.weight.numel()).tolist() for (name, m), k in zip(layers, kept)},
    }
