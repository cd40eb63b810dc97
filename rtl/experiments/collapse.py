"""The collapse study of a run: the paper's diagnostic over the sparsity grid, with rtl's CollapseMonitor.

The paper describes collapse as a ticket's mask similarity S_k moving sharply while its performance drops, and
gives no threshold. For every target sparsity of a run (in increasing order, one monitor "round" each) the monitor
records RTL's masks (global and per-layer Jaccard and S_k) and each ticket's headline metric after joint retraining;
:func:`collapse_study` then lists the (sparsity, ticket) pairs where S_k moved by more than ``SIMILARITY_JUMP``
within one step before or at a drop of the metric by more than the kind's ``METRIC_DROP``.
"""

from __future__ import annotations

from typing import Dict, List, Mapping

from torch import Tensor

from ..diagnostics import CollapseMonitor
from .report import per_ticket_values

__all__ = ["METRIC_DROP", "SIMILARITY_JUMP", "collapse_study"]

#: |change| of a ticket's S_k between consecutive sparsities that counts as sharp.
SIMILARITY_JUMP = 0.05
#: Drop of a ticket's metric between consecutive sparsities that counts as a collapse: balanced accuracy, or dB of
#: PSNR (INR) and SI-SNRi (speech).
METRIC_DROP = {"detector": 0.05, "classifier": 0.05, "inr": 1.0, "enhancement": 1.0}


def collapse_study(kind: str, masks: Mapping[str, Dict[str, Tensor]], rtl_metrics: Mapping[str, Dict]) -> Dict:
    """The monitor's history over the sparsities and its verdict.

    Args:
        kind: the task kind ("detector", "classifier", "inr" or "enhancement").
        masks: {sparsity key: {layer name: RTL's masks (T, *weight.shape)}}.
        rtl_metrics: {sparsity key: RTL's metrics dict at that sparsity}.

    Returns:
        {"sparsities": [...], "history": CollapseMonitor.history (json-ready), "flagged": [{"sparsity", "ticket",
        "similarity_change", "metric_change"}], "thresholds": {...}}.
    """
    keys = sorted(masks, key=float)
    monitor = CollapseMonitor(per_layer=True)
    with_metric = True
    for index, key in enumerate(keys):
        values = per_ticket_values(kind, rtl_metrics[key])
        with_metric = with_metric and values is not None
        monitor.record(
            index, masks[key], metrics={"metric": values} if values is not None else None, sparsity=float(key)
        )
    drop = METRIC_DROP[kind]
    flagged: List[Dict] = []
    if with_metric and len(keys) > 1:
        for entry in monitor.flagged("metric", similarity_jump=SIMILARITY_JUMP, metric_drop=drop, lead=1):
            flagged.append(dict(entry, sparsity=float(keys[entry["round"]])))
    return {
        "sparsities": [float(k) for k in keys],
        "history": monitor.history,
        "flagged": flagged,
        "thresholds": {"similarity_jump": SIMILARITY_JUMP, "metric_drop": drop, "lead": 1},
    }
