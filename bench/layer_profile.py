"""Where a routed model's inference time goes, layer by layer: ``python -m bench models --profile`` prints this table
per case.

For every routed layer: the path the backend took (on the cpu backend: dense / image / mixed, with the sparse tickets
and the dense mask classes of the call), the layer's median time in the routed model and in the dense model (the
same layer of the same architecture, timed by the same hooks in the same interleaved runs), their ratio, and the
layer's share of the routed model's time. The rows after the layers give what the hooks saw in total and what the
models took end to end, so the time outside the routed layers (batch norms, activations, routing) can be read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

import rtl


@dataclass
class LayerTime:
    """One routed layer's profile row."""

    name: str
    weight_shape: Tuple[int, ...]
    path: str
    ours_ms: float
    dense_ms: float

    @property
    def ratio(self) -> float:
        """Dense time over ours (> 1: the routed layer is faster)."""
        return self.dense_ms / self.ours_ms if self.ours_ms else float("nan")


class _LayerClock:
    """Forward pre/post hooks that time the named layers of a model on every call."""

    def __init__(self, model: nn.Module, names: List[str], on_done: Optional[Callable[[str], None]] = None) -> None:
        self.times: Dict[str, List[float]] = {n: [] for n in names}
        self._start: Dict[str, float] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name, on_done)))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name, on_done):
        def hook(module, args, out):
            self.times[name].append(time.perf_counter() - self._start.pop(name))
            if on_done is not None:
                on_done(name)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _paths_of_one_call(routed: nn.Module, call: Callable[[], object], names: List[str]) -> Dict[str, str]:
    """The path each routed layer took in one call (what the cpu backend's trace recorded during its forward)."""
    paths = {n: "" for n in names}
    try:
        from rtl_kernels.backends.cpu import trace
    except Exception:  # the cpu backend cannot load here: paths stay blank
        call()
        return paths
    with trace.record_calls() as calls:
        seen = [0]

        def done(name: str) -> None:
            new = calls[seen[0] :]
            seen[0] = len(calls)
            if new:
                c = new[-1]
                text = c["path"]
                if c["path"] != "dense":
                    text += f" ({c['sparse_tickets']} sparse"
                    text += f", {c['dense_classes']} dense cl.)" if c["dense_classes"] else ")"
                paths[name] = text

        clock = _LayerClock(routed, names, on_done=done)
        try:
            call()
        finally:
            clock.remove()
    return paths


def profile_inference(
    dense: nn.Module,
    routed: nn.Module,
    run_dense: Callable[[], object],
    run_routed: Callable[[], object],
    repeats: int = 7,
    warmup: int = 2,
) -> Tuple[List[LayerTime], Dict[str, float]]:
    """Per-layer inference times of a routed model and of the same model dense, interleaved.

    Args:
        dense: the dense model (its layers carry the routed model's names).
        routed: the routed model.
        run_dense / run_routed: one inference call each (no grad, eval mode, inputs and route bound).
        repeats: timed calls of each model (medians are reported).
        warmup: untimed calls of each first.

    Returns:
        (rows in the routed model's order, totals: {"ours_layers_ms", "dense_layers_ms", "ours_model_ms",
        "dense_model_ms"}).

    Example:
        >>> rows, totals = profile_inference(dense, routed, lambda: dense(x), lambda: wrapper(x, route))
    """
    names = [n for n, _ in rtl.routed_modules(routed)]
    paths = _paths_of_one_call(routed, run_routed, names)
    for _ in range(warmup):
        run_dense()
        run_routed()
    ours_clock = _LayerClock(routed, names)
    dense_clock = _LayerClock(dense, names)
    model_ms = {"ours": [], "dense": []}
    try:
        for _ in range(repeats):
            for key, fn in (("dense", run_dense), ("ours", run_routed)):
                start = time.perf_counter()
                fn()
                model_ms[key].append((time.perf_counter() - start) * 1e3)
    finally:
        ours_clock.remove()
        dense_clock.remove()
    modules = dict(routed.named_modules())
    rows = [
        LayerTime(
            n,
            tuple(modules[n].weight.shape),
            paths[n],
            statistics.median(ours_clock.times[n]) * 1e3,
            statistics.median(dense_clock.times[n]) * 1e3,
        )
        for n in names
    ]
    totals = {
        "ours_layers_ms": sum(r.ours_ms for r in rows),
        "dense_layers_ms": sum(r.dense_ms for r in rows),
        "ours_model_ms": statistics.median(model_ms["ours"]),
        "dense_model_ms": statistics.median(model_ms["dense"]),
    }
    return rows, totals


def profile_markdown(title: str, rows: List[LayerTime], totals: Dict[str, float]) -> str:
    """The profile as a GitHub table: one row per routed layer, then the totals.

    Example:
        >>> print(profile_markdown("resnet18_u90", rows, totals))
    """
    lines = [
        f"### {title}",
        "",
        "| layer | weight | path | ours ms | dense ms | dense / ours | share of ours |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    model = totals["ours_model_ms"]
    for r in rows:
        shape = "x".join(str(d) for d in r.weight_shape)
        lines.append(
            f"| {r.name} | {shape} | {r.path or '-'} | {r.ours_ms:.2f} | {r.dense_ms:.2f} | "
            f"{r.ratio:.2f}x | {r.ours_ms / model:.1%} |"
        )
    lines.append(
        f"| routed layers | | | {totals['ours_layers_ms']:.1f} | {totals['dense_layers_ms']:.1f} | "
        f"{totals['dense_layers_ms'] / totals['ours_layers_ms']:.2f}x | "
        f"{totals['ours_layers_ms'] / model:.1%} |"
    )
    lines.append(
        f"| whole model | | | {model:.1f} | {totals['dense_model_ms']:.1f} | "
        f"{totals['dense_model_ms'] / model:.2f}x | 100% |"
    )
    return "\n".join(lines) + "\n"
