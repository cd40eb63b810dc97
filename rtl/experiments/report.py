"""A run directory's report: ``report.md`` with the paper's Table 1 view, and PNG plots.

Plots (matplotlib, Agg backend): accuracy vs sparsity per method; per-ticket similarity vs sparsity next to each
ticket's accuracy (the paper's Fig. 2 view); the T x T Jaccard matrix at the highest sparsity; per-ticket S_k per
IMP round (:mod:`rtl.experiments.round_similarity`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..state_io import atomic_write
from . import round_similarity

__all__ = [
    "SIGNAL_KINDS",
    "SignalKind",
    "dense_headline",
    "headline_metric",
    "headline_value",
    "method_rows",
    "per_ticket_values",
    "write_report",
    "write_report_file",
]


@dataclass(frozen=True)
class SignalKind:
    """How a report reads a task kind scored by one number in dB per method, rather than as classifiers.

    Attributes:
        entry: the key of a method's metrics that holds the scores; value: the headline field in it;
        per_ticket: the field with one value per ticket; label: the metric's name;
        routed, single: the row labels of RTL and of the single-mask model.
    """

    entry: str
    value: str
    per_ticket: str
    label: str
    routed: str
    single: str


SIGNAL_KINDS = {
    "inr": SignalKind(
        "image", "psnr", "psnr_per_region", "PSNR", "RTL (region routing)", "IMP single (region embedding)"
    ),
    "enhancement": SignalKind(
        "speech",
        "si_snri",
        "si_snri_per_ticket",
        "SI-SNRi",
        "RTL (environment routing)",
        "IMP single (one mask for every environment)",
    ),
}


def headline_metric(kind: str) -> Tuple[str, str]:
    """(label, unit) of the metric the report leads with for a task kind."""
    return (SIGNAL_KINDS[kind].label, "dB") if kind in SIGNAL_KINDS else ("balanced accuracy", "")


def method_rows(kind: str, entry: Dict) -> List[Tuple[str, Optional[Dict], Optional[int]]]:
    """(method label, metrics dict with balanced_accuracy/precision/recall or psnr, stored weights)."""
    rtl_m, multi_m, single_m = entry["rtl"]["metrics"], entry["multi"]["metrics"], entry["single"]["metrics"]
    union, total = entry["rtl"]["counts"]["union"], entry["rtl"]["counts"]["sum"]
    single_n = entry["single"]["counts"]["single"]
    if kind in SIGNAL_KINDS:
        sig = SIGNAL_KINDS[kind]
        return [
            (sig.routed, rtl_m[sig.entry], union),
            (sig.single, single_m[sig.entry], single_n),
            ("IMP multi (independent models)", multi_m[sig.entry], total),
        ]
    rows = []
    if kind == "detector":
        rows += [
            ("RTL, detectors (paper Table 1 protocol)", rtl_m["detectors"], union),
            ("IMP multi, detectors", multi_m["detectors"], total),
        ]
        if "detectors" in single_m:  # the single model under the same one-vs-rest protocol
            rows.append(("IMP single, detectors (class probability >= 0.5)", single_m["detectors"], single_n))
        if "all_tickets" in rtl_m:
            rows += [
                ("RTL, all tickets, argmax (label-free)", rtl_m["all_tickets"], union),
                ("IMP multi, all tickets, argmax (label-free)", multi_m["all_tickets"], total),
            ]
    else:
        rows += [
            ("RTL, oracle environment routing", rtl_m["oracle"], union),
            ("RTL, cluster routing (label-free)", rtl_m["cluster"], union),
            ("RTL, all tickets, most confident (label-free)", rtl_m["all_tickets"], union),
            ("IMP multi, oracle routing", multi_m["oracle"], total),
        ]
    rows.append(("IMP single (C-way classifier)", single_m["multiclass"], single_n))
    return rows


def _count(value) -> str:
    return f"{int(round(value)):,}" if value is not None else "—"


def _fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def headline_value(kind: str, metrics: Dict) -> float:
    return metrics[SIGNAL_KINDS[kind].value] if kind in SIGNAL_KINDS else metrics["balanced_accuracy"]


def dense_headline(kind: str, dense_metrics: Dict) -> float:
    """The dense model's headline value from its metrics (a signal kind's entry, or its C-way classification)."""
    entry = dense_metrics[SIGNAL_KINDS[kind].entry] if kind in SIGNAL_KINDS else dense_metrics["multiclass"]
    return headline_value(kind, entry)


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and the PNG plots of a finished run; returns the report's path."""
    with open(os.path.join(run_dir, "config.json")) as fh:
        config = json.load(fh)
    if isinstance(config, dict) and config.get("images"):  # one run per image: their combined report
        from .multi_image import write_images_report

        return write_images_report(run_dir)
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} holds no metrics.json: the run has not finished (resume it with --resume)")
    with open(path) as fh:
        metrics = json.load(fh)
    kind = config["kind"]
    label, unit = headline_metric(kind)
    keys = sorted(metrics["sparsities"], key=float)
    preset = config.get("preset") or ("quick" if config["quick"] else "full")
    lines = [
        f"# rtl run: {config['experiment']}",
        "",
        f"{config['description']}",
        "",
        f"- seed {config['seed']}, sparsities {', '.join(keys)}, {preset} settings, {config['num_tickets']} tickets "
        f"({', '.join(config['ticket_names'])})",
        f"- machine: {metrics['environment']['machine']}, {metrics['environment']['threads']} threads, "
        f"torch {metrics['environment']['torch']}, rtl_kernels backend {metrics['environment']['backend']}",
        f"- prunable weights: {config.get('prunable_weights', '?')}",
        "",
    ]
    dense = metrics["dense"]
    sig = SIGNAL_KINDS.get(kind)
    dense_m = dense[sig.entry] if sig else dense["multiclass"]
    lines += [
        "## Results",
        "",
        "Dense model (no pruning): "
        + (
            f"{sig.label} {dense_m[sig.value]:.2f} dB"
            if sig
            else f"balanced accuracy {dense_m['balanced_accuracy']:.3f}, precision {dense_m['precision']:.3f}, "
            f"recall {dense_m['recall']:.3f}, accuracy {dense_m['accuracy']:.3f}"
        ),
        "",
    ]
    if sig:
        lines += [f"| sparsity | method | {sig.label} (dB) | stored weights |", "|---:|:---|---:|---:|"]
    else:
        lines += [
            "| sparsity | method | bal. acc | precision | recall | stored weights |",
            "|---:|:---|---:|---:|---:|---:|",
        ]
    for key in keys:
        for name, m, count in method_rows(kind, metrics["sparsities"][key]):
            if sig:
                lines.append(f"| {key} | {name} | {_fmt(m[sig.value], 2)} | {_count(count)} |")
            else:
                lines.append(
                    f"| {key} | {name} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['precision'])} | "
                    f"{_fmt(m['recall'])} | {_count(count)} |"
                )
    lines += [
        "",
        "Stored weights: RTL keeps the union of its tickets' masks over one shared weight; independent "
        "models keep the sum of theirs; the single model keeps one mask. Dense layers left unpruned "
        "(BatchNorm, classifier) are not counted.",
        "",
    ]
    if kind == "detector":
        lines += [
            "Protocols: *detectors* score every method as one-vs-rest detectors, the paper's Table 1 protocol (ticket "
            "t fires on an image when its score is >= 0.5: the sigmoid of its own logit for RTL and the independent "
            "models, the probability the single model gives t's class, or its cluster's classes summed, for the "
            "single model); *all tickets* and *C-way* score every method as a label-free classifier (the argmax over "
            "the tickets' scores, or over the single model's classes). A CIFAR-100 cluster ticket's logit is the "
            'logsumexp of its classes\' logits, the score of "any class of my cluster" under a sigmoid.',
            "",
        ]
    if "dense_budget" in metrics:
        lines += _budget_lines(metrics, keys)
    lines += [
        "## Ticket similarity (the paper's diagnostic)",
        "",
        "Mean Jaccard of each ticket's mask to the others' (S_k), and its chance-corrected variant (0: as "
        "similar as independent random masks of the same densities, 1: identical).",
        "",
        "| sparsity | mean S_k | min S_k | max S_k | mean chance-corrected |",
        "|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        sim = metrics["sparsities"][key]["rtl"]["similarity"]
        cc = metrics["sparsities"][key]["rtl"]["similarity_chance_corrected"]
        lines.append(
            f"| {key} | {sum(sim) / len(sim):.3f} | {min(sim):.3f} | {max(sim):.3f} | {sum(cc) / len(cc):.3f} |"
        )
    from .similarity_vs_performance import report_lines as similarity_vs_performance_lines  # imports this module

    lines += similarity_vs_performance_lines(kind, metrics["sparsities"])
    if metrics.get("collapse"):
        lines += _collapse_lines(metrics["collapse"], unit)
    if metrics.get("rounds"):  # S_k per IMP round; absent from runs made by an older rtl
        lines += round_similarity.report_lines(metrics["rounds"])
    speed = metrics.get("speed", {})
    if speed:
        lines += [
            "",
            "## Inference speed of the routed model",
            "",
            "One mixed-ticket batch of test inputs; the three models timed in turn, median of at least 11 "
            "rounds after 3 warm-up rounds (more until each model ran half a second). dense: the unpruned "
            "model; naive: the per-ticket loop (rtl_kernels' reference backend); rtl: the rtl kernels. Ratios "
            "> 1 mean rtl is faster. spread: the largest (p90 - p10) / median of the three; above 20 % the "
            "machine was too noisy for the ratios to be read closely (flagged !).",
            "",
            "| sparsity | batch | dense ms | naive ms | rtl ms | rtl vs dense | rtl vs naive | spread |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key in keys:
            s = speed.get(key)
            if s:
                spread = max((s.get(f"{n}_spread", 0.0) for n in ("dense", "naive", "rtl")), default=0.0)
                flag = " !" if s.get("unstable") else ""
                lines.append(
                    f"| {key} | {s['batch']} | {s['dense_ms']:.2f} | {s['naive_ms']:.2f} | {s['rtl_ms']:.2f} "
                    f"| {s['rtl_vs_dense']:.2f}x | {s['rtl_vs_naive']:.2f}x | {spread:.0%}{flag} |"
                )
    plots = _plots(run_dir, kind, metrics, keys, label, unit, config)
    plots += round_similarity.plots(run_dir, metrics, config)
    return write_report_file(run_dir, lines, plots)


def write_report_file(run_dir: str, lines: List[str], plots: List[Tuple[str, str]]) -> str:
    """Write ``lines`` and a "Plots" section linking ``plots`` ((file name, title) pairs) to ``run_dir``/report.md,
    atomically. Returns the report's path."""
    if plots:
        lines = lines + ["", "## Plots", ""] + [f"![{title}]({name})" for name, title in plots]
    out = os.path.join(run_dir, "report.md")
    text = "\n".join(lines) + "\n"
    atomic_write(out, lambda handle: handle.write(text), binary=False)
    return out


def per_ticket_values(kind: str, rtl_metrics: Dict) -> Optional[List[float]]:
    if kind in SIGNAL_KINDS:
        return rtl_metrics[SIGNAL_KINDS[kind].entry][SIGNAL_KINDS[kind].per_ticket]
    if kind == "detector":
        return rtl_metrics["detectors"]["per_ticket"]["balanced_accuracy"]
    return rtl_metrics["oracle"].get("per_ticket_accuracy")


def _collapse_lines(collapse: Dict, unit: str) -> List[str]:
    """The collapse study: S_k (global, and the mean of the per-layer scores) against sparsity, and the verdict."""
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    lines = [
        "",
        "## Collapse study",
        "",
        "The paper's diagnostic over the sparsities: RTL's mean S_k over all prunable weights and the mean of the "
        "per-layer S_k, next to the mean of the tickets' own metric (a detector's balanced accuracy, an environment "
        "ticket's accuracy, a region's PSNR or an environment's SI-SNRi in dB).",
        "",
        "| sparsity | mean S_k (global) | mean S_k (per layer) | mean per-ticket metric |",
        "|---:|---:|---:|---:|",
    ]
    for entry in collapse["history"]:
        layers = [mean(v) for v in entry.get("layer_scores", {}).values()]
        metric = entry.get("metrics", {}).get("metric")
        lines.append(
            f"| {entry['sparsity']:g} | {mean(entry['scores']):.3f} | {mean(layers):.3f} | "
            f"{_fmt(mean(metric) if metric else None, 2 if unit else 3)} |"
        )
    t = collapse["thresholds"]
    rule = (
        f"a ticket's S_k moving by more than {t['similarity_jump']} at or one step before a drop of its metric by "
        f"more than {t['metric_drop']}{(' ' + unit) if unit else ''}"
    )
    if collapse["flagged"]:
        pairs = ", ".join(f"ticket {f['ticket']} at {f['sparsity']:g}" for f in collapse["flagged"])
        lines += ["", f"Verdict: collapse flagged ({rule}): {pairs}."]
    else:
        lines += ["", f"Verdict: no collapse flagged over these sparsities ({rule})."]
    return lines


def _budget_lines(metrics: Dict, keys: List[str]) -> List[str]:
    """The retraining budget each method got: optimizer steps / sample presentations."""
    cell = lambda b: f"{b['steps']:,} / {b['samples']:,}"  # noqa: E731
    lines = [
        "## Training budget",
        "",
        "Optimizer steps / sample presentations of each method's final training. The rule: every method gets RTL's "
        "joint-retraining budget (the dense baseline and the single-mask model over the whole training set, the "
        "independent models sharing it), so no method wins by training longer.",
        "",
        "| sparsity | dense | RTL | IMP single | IMP multi (all models) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        entry = metrics["sparsities"][key]
        lines.append(
            f"| {key} | {cell(metrics['dense_budget'])} | {cell(entry['rtl']['budget'])} | "
            f"{cell(entry['single']['budget'])} | {cell(entry['multi']['budget'])} |"
        )
    return lines + [""]


def _plots(run_dir, kind, metrics, keys, label, unit, config) -> List[Tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still has every number
        return []
    made = []
    xs = [float(k) for k in keys]
    ylabel = f"{label} ({unit})" if unit else label

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods: Dict[str, List[float]] = {}
    for key in keys:
        for name, m, _ in method_rows(kind, metrics["sparsities"][key]):
            methods.setdefault(name, []).append(headline_value(kind, m))
    for name, ys in methods.items():
        ax.plot(xs, ys, marker="o", label=name)
    dense = dense_headline(kind, metrics["dense"])
    ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (fraction of prunable weights removed, per mask)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{config['experiment']}: {label} vs sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "accuracy_vs_sparsity.png"), dpi=120)
    plt.close(fig)
    made.append(("accuracy_vs_sparsity.png", f"{label} vs sparsity per method"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    names = config["ticket_names"]
    for t, name in enumerate(names):
        sims = [metrics["sparsities"][k]["rtl"]["similarity"][t] for k in keys]
        accs = [
            (per_ticket_values(kind, metrics["sparsities"][k]["rtl"]["metrics"]) or [float("nan")] * len(names))[t]
            for k in keys
        ]
        ax1.plot(xs, sims, marker="o", label=name)
        ax2.plot(xs, accs, marker="o", label=name)
    ax1.set_xlabel("sparsity")
    ax1.set_ylabel("mean Jaccard to the other tickets")
    ax1.set_title("ticket similarity")
    ax2.set_xlabel("sparsity")
    ax2.set_ylabel(f"per-ticket {ylabel}")
    ax2.set_title("ticket performance")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "similarity_vs_sparsity.png"), dpi=120)
    plt.close(fig)
    made.append(("similarity_vs_sparsity.png", "per-ticket similarity and performance vs sparsity (paper Fig. 2 view)"))

    jac = metrics["sparsities"][keys[-1]]["rtl"]["jaccard"]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(jac, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"Jaccard of ticket masks at sparsity {keys[-1]}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "jaccard_matrix.png"), dpi=120)
    plt.close(fig)
    made.append(("jaccard_matrix.png", "T x T Jaccard matrix"))
    return made
