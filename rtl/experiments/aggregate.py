"""Several seeds of one experiment: ``aggregate.md``, ``aggregate.json`` and a plot with error bars.

For every sparsity and method: the headline metric's mean and standard deviation over the seeds, and the paired
difference RTL minus each baseline (same seed: same θ0 and data order) with its 95 % interval from Student's t over
the seeds. A seed directory is one finished `rtl run` (``seed<N>/metrics.json``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from ..state_io import atomic_json, atomic_write
from .report import SIGNAL_KINDS, dense_headline, headline_metric, headline_value, method_rows

__all__ = ["interval95", "seed_dirs", "write_aggregate"]


def seed_dirs(out_dir: str) -> List[Tuple[int, str]]:
    """(seed, directory) of every finished seed run under ``out_dir``, by seed."""
    found = []
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith("seed") and name[4:].isdigit() and os.path.isfile(os.path.join(path, "metrics.json")):
            found.append((int(name[4:]), path))
    return sorted(found)


def interval95(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, low, high): the mean and its two-sided 95 % interval from Student's t (n - 1 degrees of freedom);
    NaN bounds with fewer than two values."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def write_aggregate(out_dir: str) -> str:
    """Write the aggregate of the finished seed runs under ``out_dir``; returns the path of aggregate.md.

    Raises:
        ValueError: no finished seed run, or runs of different experiments / sparsities.
    """
    runs = seed_dirs(out_dir)
    if not runs:
        raise ValueError(f"{out_dir} holds no finished seed run (seed<N>/metrics.json)")
    configs, metrics = [], []
    for _, path in runs:
        with open(os.path.join(path, "config.json")) as fh:
            configs.append(json.load(fh))
        with open(os.path.join(path, "metrics.json")) as fh:
            metrics.append(json.load(fh))
    kind, experiment = configs[0]["kind"], configs[0]["experiment"]
    keys = sorted(metrics[0]["sparsities"], key=float)
    for cfg, m in zip(configs, metrics):
        if cfg["experiment"] != experiment or sorted(m["sparsities"], key=float) != keys:
            raise ValueError(f"{out_dir} mixes runs of different experiments or sparsities")
    label, unit = headline_metric(kind)
    seeds = [seed for seed, _ in runs]

    # values[key][method] = one headline value per seed
    values: Dict[str, Dict[str, List[float]]] = {}
    primary: Optional[str] = None
    for m in metrics:
        for key in keys:
            rows = method_rows(kind, m["sparsities"][key])
            primary = primary or rows[0][0]
            per_method = values.setdefault(key, {})
            for name, entry, _ in rows:
                per_method.setdefault(name, []).append(headline_value(kind, entry))
            per_method.setdefault("dense", []).append(dense_headline(kind, m["dense"]))

    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for key in keys:
        table[key] = {}
        rtl_values = values[key][primary]
        for name, vals in values[key].items():
            row = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else math.nan}
            if name != primary:
                diff, low, high = interval95([a - b for a, b in zip(rtl_values, vals)])
                row.update(rtl_minus=diff, rtl_minus_low=low, rtl_minus_high=high)
            table[key][name] = row

    digits = 2 if kind in SIGNAL_KINDS else 3
    fmt = lambda v: "—" if v is None or math.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
    lines = [
        f"# rtl run: {experiment}, {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        f"{label}{f' ({unit})' if unit else ''}: mean ± standard deviation over the seeds; the last column is the "
        f"paired difference `{primary}` minus the row's method (same seed, same θ0 and data), mean and 95 % "
        f"interval (Student's t, {len(seeds) - 1} degrees of freedom). An interval that holds 0 is no difference "
        f"at these seeds.",
        "",
        "| sparsity | method | mean ± std | RTL minus this [95 % interval] |",
        "|---:|:---|---:|---:|",
    ]
    for key in keys:
        for name, row in table[key].items():
            diff = (
                ""
                if name == primary
                else f"{fmt(row['rtl_minus'])} [{fmt(row['rtl_minus_low'])}, {fmt(row['rtl_minus_high'])}]"
            )
            lines.append(f"| {key} | {name} | {fmt(row['mean'])} ± {fmt(row['std'])} | {diff} |")
    lines += ["", "Each seed's own report: " + ", ".join(f"[seed {s}](seed{s}/report.md)" for s in seeds)]
    plot = _plot(out_dir, experiment, keys, table, label, unit)
    if plot:
        lines += ["", f"![{label} vs sparsity, mean ± std over the seeds]({plot})"]
    atomic_json(
        {"experiment": experiment, "seeds": seeds, "metric": label, "table": table},
        os.path.join(out_dir, "aggregate.json"),
    )
    path = os.path.join(out_dir, "aggregate.md")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda handle: handle.write(text), binary=False)
    return path


def _plot(out_dir, experiment, keys, table, label, unit) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the aggregate still has every number
        return None
    xs = [float(k) for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in table[keys[0]]:
        means = [table[k][name]["mean"] for k in keys]
        stds = [0.0 if math.isnan(table[k][name]["std"]) else table[k][name]["std"] for k in keys]
        style = {"color": "grey", "linestyle": "--"} if name == "dense" else {"marker": "o"}
        ax.errorbar(xs, means, yerr=stds, capsize=3, label=name, **style)
    ax.set_xlabel("sparsity (fraction of prunable weights removed, per mask)")
    ax.set_ylabel(f"{label} ({unit})" if unit else label)
    ax.set_title(f"{experiment}: mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "aggregate_vs_sparsity.png"
    fig.savefig(os.path.join(out_dir, name), dpi=120)
    plt.close(fig)
    return name
