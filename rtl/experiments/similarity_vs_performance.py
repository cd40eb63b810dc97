"""Does a ticket that shares more of its mask with the others perform better? Spearman's rank correlation between
each ticket's similarity score S_k (mean Jaccard of its mask to the other tickets', :mod:`rtl.diagnostics`) and its
own metric after joint retraining.

The paper reports ρ ≈ 0.98 between an INR region's S_k and its PSNR across 15 regions at 50 % sparsity. A run's
report shows ρ per sparsity for every experiment with per-ticket values (a detector's balanced accuracy, an
environment ticket's accuracy, a region's PSNR, a speech environment's SI-SNRi); :mod:`rtl.experiments.multi_image`
pools the regions of several images.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from .report import per_ticket_values

__all__ = ["report_lines", "spearman", "ticket_spearman"]

#: Fewest (S_k, metric) pairs a correlation is computed from: with two, ρ is ±1 whatever the data.
MIN_PAIRS = 3


def spearman(x: Sequence[float], y: Sequence[float]) -> Dict[str, Optional[float]]:
    """Spearman's rank correlation of paired values, pairs holding a NaN or None left out.

    Args:
        x, y: (n,) paired values (S_k and the ticket's metric).

    Returns:
        {"rho": ρ in [-1, 1], "p": scipy's two-sided p-value, "n": pairs used}; rho and p are None (JSON-safe) with
        fewer than :data:`MIN_PAIRS` pairs or a constant side, where ρ is undefined.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must pair up, got {len(x)} and {len(y)} values")
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y)
        if a is not None and b is not None and not math.isnan(a) and not math.isnan(b)
    ]
    out: Dict[str, Optional[float]] = {"rho": None, "p": None, "n": len(pairs)}
    if len(pairs) < MIN_PAIRS or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return out
    from scipy.stats import spearmanr

    rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    out["rho"], out["p"] = float(rho), float(p)
    return out


def ticket_spearman(kind: str, sparsities: Dict[str, Dict]) -> Dict[str, Dict[str, Optional[float]]]:
    """ρ(S_k, the ticket's metric) of RTL at every sparsity of a run.

    Args:
        kind: the task kind (see :func:`rtl.experiments.report.per_ticket_values`).
        sparsities: a run's ``metrics["sparsities"]``: {key: {"rtl": {"similarity": (T,), "metrics": {...}}}}.

    Returns:
        {sparsity key: :func:`spearman`'s dict}; empty when the kind has no per-ticket values.
    """
    out = {}
    for key in sorted(sparsities, key=float):
        rtl = sparsities[key]["rtl"]
        values = per_ticket_values(kind, rtl["metrics"])
        if values is None:
            return {}
        out[key] = spearman(rtl["similarity"], values)
    return out


def _cell(stats: Dict[str, Optional[float]]) -> str:
    return "—" if stats["rho"] is None else f"{stats['rho']:.2f}"


def report_lines(kind: str, sparsities: Dict[str, Dict]) -> List[str]:
    """The report section: ρ(S_k, metric) per sparsity; no lines when the kind has no per-ticket values."""
    table = ticket_spearman(kind, sparsities)
    if not table:
        return []
    lines = [
        "",
        "## Ticket similarity vs ticket performance",
        "",
        "Spearman's rank correlation ρ between each RTL ticket's S_k and its own metric after joint retraining (a "
        "detector's balanced accuracy, an environment ticket's accuracy, a region's PSNR, a speech environment's "
        "SI-SNRi), over the run's tickets; "
        "the paper reports ρ ≈ 0.98 between an INR region's S_k and its PSNR across 15 regions at 50 % sparsity. "
        "With a handful of tickets ρ moves in coarse steps; p is the two-sided p-value (scipy); — where ρ is "
        "undefined (fewer than 3 tickets, or a constant S_k or metric).",
        "",
        "| sparsity | tickets | Spearman ρ | p |",
        "|---:|---:|---:|---:|",
    ]
    for key, stats in table.items():
        p = "—" if stats["p"] is None else f"{stats['p']:.3f}"
        lines.append(f"| {key} | {stats['n']} | {_cell(stats)} | {p} |")
    return lines
