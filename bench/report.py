"""Summary of the benchmark results: speed-up tables in ``summary.md`` and speed-up-vs-sparsity plots.

Usage::

    python -m bench report [--results DIR] [--out DIR] [--all-runs] [--include-quick]

Reads every ``*.csv`` under the results folder (default bench/results, searched recursively): ``linear_<kind>.csv``
from bench_linear.py, ``conv2d_<kind>.csv`` from bench_conv2d.py, ``models_<kind>.csv`` from the model benchmark,
and any other CSV in the same house schema. The benchmark ("op") is the file name up to its last ``_``. The
schema is read leniently: only ``provider`` is required; ``run_id``, ``timestamp``, ``device``, ``device_kind``,
``torch``, ``git_rev``, ``threads``, ``quick``, ``case``, ``mode``, ``T``, ``sparsity``, ``status``, ``median_ms``,
``ratio_vs_B0``, ``ratio_vs_B1`` and ``target_met`` are used when present (a missing ratio is computed from the
medians of B0 / B1 in the same run, case and mode).

Results are grouped per device (the ``device`` column: CPU model or GPU name) and op. By default only the latest
run of each (device, op) is summarised (latest by ``timestamp``, else by position in the file); ``--all-runs``
summarises every run, oldest first. Runs made with ``--quick`` (tiny smoke shapes) are left out unless
``--include-quick`` is given.

Written to the output folder (default: the results folder):

- ``summary.md``: per device, per op, a table of the speed-up of ours (every ``ours*`` provider) over B0 (dense)
  and over B1 (the naive per-ticket loop) by case and mode, headed by the device, torch version and git revision;
- ``plots/<op>_<device>_speedup.png``: speed-up over B0 against sparsity, one line per provider (the geometric
  mean over the cases at that sparsity; each case is a faint dot), one panel per mode.

The same CSV files always give the same files: nothing depends on the clock or the machine running the report.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import harness

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
OP_ORDER = ("linear", "conv2d", "models")
MODE_ORDER = ("fwd", "fwd+bwd")
# Providers that are not a way of computing the layer: they have no place in a speed-up plot.
NOT_PLOTTED = ("B0", "route_prep")


# ------------------------------------------------------------------------------------------------------- reading
def op_of(path: Path) -> str:
    """The benchmark a CSV belongs to: its file name up to the last '_' (``linear_cpu.csv`` -> ``linear``).

    Example:
        >>> op_of(Path("conv2d_cuda.csv"))
        'conv2d'
    """
    stem = Path(path).stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def _number(value) -> Optional[float]:
    """A finite float from a CSV cell, else None (blank, 'nan', text)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _truthy(value) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


def read_results(results_dir: Path, skip: Iterable[Path] = ()) -> Tuple[List[Dict[str, str]], List[str]]:
    """Every row of every benchmark CSV under ``results_dir``, each tagged with its op, file and line.

    Args:
        results_dir: the folder to search (recursively) for ``*.csv``.
        skip: folders whose CSV files are not results (the plots folder).

    Returns:
        (rows, notes): rows as dicts with the extra keys ``_op``, ``_file`` (path relative to results_dir) and
        ``_line`` (1-based data row); notes name the files that were skipped and why.

    Example:
        >>> rows, notes = read_results(Path("bench/results"))
    """
    results_dir = Path(results_dir)
    skip = [Path(s).resolve() for s in skip]
    rows: List[Dict[str, str]] = []
    notes: List[str] = []
    for path in sorted(results_dir.rglob("*.csv")):
        if any(p in path.resolve().parents for p in skip):
            continue
        rel = path.relative_to(results_dir).as_posix()
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "provider" not in reader.fieldnames:
                notes.append(f"{rel}: no `provider` column, not a benchmark result; skipped")
                continue
            for line, row in enumerate(reader, 1):
                if not row.get("provider"):
                    continue
                row = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
                row.update(_op=op_of(path), _file=rel, _line=str(line))
                rows.append(row)
    return rows, notes


# ---------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """The rows of one run of one benchmark on one device."""

    op: str
    device: str
    run_id: str
    rows: List[Dict[str, str]] = field(default_factory=list)

    def values(self, key: str) -> str:
        """Every distinct non-blank value of a column in this run, in order, joined (one value in a sane CSV)."""
        return ", ".join(dict.fromkeys(r.get(key, "") for r in self.rows if r.get(key, ""))) or "unknown"

    @property
    def quick(self) -> bool:
        return any(_truthy(r.get("quick")) for r in self.rows)

    def sort_key(self) -> tuple:
        """Older runs first: by timestamp when the rows have one, then by where the run ends in its file."""
        stamps = [_timestamp(r.get("timestamp")) for r in self.rows]
        stamps = [s for s in stamps if s is not None]
        last = max(int(r["_line"]) for r in self.rows)
        if stamps:
            return (1, max(stamps), last, self.run_id)
        return (0, _dt.datetime.min.replace(tzinfo=_dt.timezone.utc), last, self.run_id)


def _timestamp(text) -> Optional[_dt.datetime]:
    if not text:
        return None
    try:
        stamp = _dt.datetime.fromisoformat(str(text).strip())
    except ValueError:
        return None
    # Naive stamps are taken as UTC so they compare with aware ones.
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=_dt.timezone.utc)


def device_of(row: Dict[str, str]) -> str:
    """The device a row was measured on: the ``device`` column, else ``device_kind``, else the file's suffix."""
    for key in ("device", "device_kind"):
        if row.get(key, "").strip():
            return row[key].strip()
    stem = Path(row.get("_file", "")).stem
    return stem.rsplit("_", 1)[1] if "_" in stem else "unknown"


def group_runs(rows: Sequence[Dict[str, str]]) -> Dict[Tuple[str, str], List[Run]]:
    """{(device, op): runs oldest first}. A run is a ``run_id`` (else a timestamp and git revision, else a file)."""
    runs: Dict[Tuple[str, str, str], Run] = {}
    for row in rows:
        device, op = device_of(row), row["_op"]
        run_id = row.get("run_id", "").strip()
        if not run_id:
            stamp, rev = row.get("timestamp", "").strip(), row.get("git_rev", "").strip()
            run_id = f"{stamp} {rev}".strip() or row["_file"]
        key = (device, op, run_id)
        if key not in runs:
            runs[key] = Run(op=op, device=device, run_id=run_id)
        runs[key].rows.append(row)
    out: Dict[Tuple[str, str], List[Run]] = {}
    for run in runs.values():
        out.setdefault((run.device, run.op), []).append(run)
    for key in out:
        out[key].sort(key=Run.sort_key)
    return out


def _op_sort_key(op: str) -> tuple:
    return (OP_ORDER.index(op), "") if op in OP_ORDER else (len(OP_ORDER), op)


def _in_order(values: Iterable[str], preferred: Sequence[str] = ()) -> List[str]:
    """Distinct values: the preferred ones first in their order, then the others in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


# -------------------------------------------------------------------------------------------------------- ratios
def is_ours(provider: str) -> bool:
    """Whether a provider is one of rtl's own backends ('ours' or 'ours:<backend>')."""
    return provider == "ours" or provider.startswith("ours:") or provider.startswith("ours_")


def _ok(row: Dict[str, str]) -> bool:
    status = row.get("status", "").strip()
    return status in ("", "ok")


def speedups(run: Run) -> Dict[Tuple[str, str, str], Dict[str, Optional[float]]]:
    """{(case, mode, provider): {'median_ms', 'ratio_vs_B0', 'ratio_vs_B1'}} of one run.

    A ratio is the baseline's median over the provider's (> 1: faster than the baseline). The CSV's own ratio
    columns are used where present; otherwise they are computed from the medians of the same case and mode.
    Rows whose status is not 'ok' get no figures.

    Example:
        >>> speedups(run)[("b_1024_u90", "fwd", "ours:cpu")]["ratio_vs_B0"]
        2.6
    """
    medians: Dict[Tuple[str, str, str], float] = {}
    for r in run.rows:
        key = (r.get("case", ""), r.get("mode", ""), r["provider"])
        median = _number(r.get("median_ms"))
        if _ok(r) and median is not None and median > 0 and key not in medians:
            medians[key] = median
    out: Dict[Tuple[str, str, str], Dict[str, Optional[float]]] = {}
    for r in run.rows:
        case, mode, provider = r.get("case", ""), r.get("mode", ""), r["provider"]
        key = (case, mode, provider)
        if key in out:
            continue
        figures: Dict[str, Optional[float]] = {"median_ms": medians.get(key)}
        for against in ("B0", "B1"):
            ratio = _number(r.get(f"ratio_vs_{against}")) if _ok(r) else None
            if ratio is None and _ok(r):
                other, mine = medians.get((case, mode, against)), medians.get(key)
                ratio = other / mine if other is not None and mine else None
            figures[f"ratio_vs_{against}"] = ratio
        out[key] = figures
    return out


# ------------------------------------------------------------------------------------------------------ markdown
def _sparsity_text(value: str) -> str:
    number = _number(value)
    if number is None:
        return value or ""
    return f"{number:.0%}" if abs(number * 100 - round(number * 100)) < 1e-9 else f"{number:.1%}"


def run_header(run: Run) -> str:
    """One line naming what a run was measured with: device, versions, git revision, run id and time."""
    kind = run.values("device_kind")
    threads = run.values("threads")
    where = run.device + (f" ({kind}" + (f", {threads} threads" if threads != "unknown" else "") + ")"
                          if kind != "unknown" else "")  # fmt: skip
    parts = [f"device: {where}", f"torch {run.values('torch')}"]
    if run.values("triton") not in ("unknown", "not installed"):
        parts.append(f"triton {run.values('triton')}")
    parts.append(f"git {run.values('git_rev')}")
    parts.append(f"run {run.run_id}" + (f", {run.values('timestamp')}" if run.values("timestamp") != "unknown" else ""))
    if run.quick:
        parts.append("**quick run: smoke shapes, the figures say nothing about the real cases**")
    return "- " + "; ".join(parts)


def run_table(run: Run) -> str:
    """The markdown speed-up table of one run: a row per case and mode, columns per ours provider."""
    figures = speedups(run)
    providers = [p for p in _in_order(r["provider"] for r in run.rows) if is_ours(p)]
    cases = _in_order(r.get("case", "") for r in run.rows)
    modes = _in_order((r.get("mode", "") for r in run.rows), MODE_ORDER)
    first = {}
    for r in run.rows:
        first.setdefault(r.get("case", ""), r)
    status = {(r.get("case", ""), r.get("mode", ""), r["provider"]): r.get("status", "") for r in run.rows}
    target = {}
    for r in run.rows:
        if is_ours(r["provider"]) and r.get("target_met", "").strip():
            target.setdefault((r.get("case", ""), r.get("mode", "")), []).append(
                (r["provider"], r["target_met"].strip())
            )
    has_targets = bool(target)
    has_t = any(r.get("T", "").strip() for r in run.rows)

    headers = ["case", "mode"] + (["T"] if has_t else []) + ["sparsity", "B0 ms", "B1 ms"]
    for p in providers:
        headers += [f"{p} ms", f"{p} vs B0", f"{p} vs B1"]
    if has_targets:
        headers.append("target")
    table = []
    for case in cases:
        for mode in modes:
            if not any((case, mode, p) in figures for p in _in_order(r["provider"] for r in run.rows)):
                continue
            row = [case, mode or "-"]
            if has_t:
                row.append(first[case].get("T", ""))
            row.append(_sparsity_text(first[case].get("sparsity", "")))
            for base in ("B0", "B1"):
                row.append(_ms_text(figures, status, (case, mode, base)))
            for p in providers:
                f = figures.get((case, mode, p))
                row.append(_ms_text(figures, status, (case, mode, p)))
                row.append(harness.format_ratio(f["ratio_vs_B0"]) if f else "")
                row.append(harness.format_ratio(f["ratio_vs_B1"]) if f else "")
            if has_targets:
                met = target.get((case, mode), [])
                row.append("; ".join(v if len(providers) == 1 else f"{p}: {v}" for p, v in met))
            table.append(row)
    align = "l" * 2 + "r" * (len(headers) - 2 - int(has_targets)) + ("l" if has_targets else "")
    return harness.markdown_table(headers, table, align=align)


def _ms_text(figures, status, key) -> str:
    f = figures.get(key)
    if f is None:
        return ""
    if f["median_ms"] is None:
        return status.get(key, "") or ""
    return harness.format_ms(f["median_ms"])


# --------------------------------------------------------------------------------------------------------- plots
def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device name ('NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3')."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


Series = Tuple[str, str]  # (provider, mask structure; '' when the runs use one structure only)


def plot_points(runs: Sequence[Run]) -> Dict[str, Dict[Series, List[Tuple[float, float]]]]:
    """{mode: {(provider, structure): [(sparsity, speed-up over B0), ...]}}: one point per run and case.

    The mask structure (``mask_structure`` column) splits a provider's points only when the runs mix several
    (block and unstructured masks at the same sparsity are different problems); otherwise it is ''.
    """
    raw = []
    for run in runs:
        sparsity, structure = {}, {}
        for r in run.rows:
            sparsity.setdefault(r.get("case", ""), _number(r.get("sparsity")))
            structure.setdefault(r.get("case", ""), r.get("mask_structure", "").strip())
        for (case, mode, provider), f in speedups(run).items():
            if provider in NOT_PLOTTED or f["ratio_vs_B0"] is None or sparsity.get(case) is None:
                continue
            raw.append((mode, provider, structure.get(case, ""), sparsity[case], f["ratio_vs_B0"]))
    split = len({structure for _, _, structure, _, _ in raw}) > 1
    points: Dict[str, Dict[Series, List[Tuple[float, float]]]] = {}
    for mode, provider, structure, sparsity, ratio in raw:
        series = (provider, structure if split else "")
        points.setdefault(mode, {}).setdefault(series, []).append((sparsity, ratio))
    return points


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def write_plot(runs: Sequence[Run], path: Path, title: str) -> bool:
    """Speed-up over B0 against sparsity, one line per provider and one panel per mode; False if nothing to plot.

    Each line joins the geometric means over the cases (and runs) at each sparsity; every case is a faint dot.
    A provider keeps its colour in every panel; when the runs mix mask structures, each structure gets its own
    line style.

    Args:
        runs: the runs of one (device, op).
        path: the PNG to write.
        title: the figure's title.

    Returns:
        Whether a plot was written.
    """
    points = plot_points(runs)
    if not points:
        return False
    import matplotlib
    import matplotlib.style
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = _in_order(points, MODE_ORDER)
    every = {series for by_series in points.values() for series in by_series}
    providers = sorted({p for p, _ in every}, key=_provider_sort_key)
    structures = sorted({s for _, s in every})
    styles = ["-", "--", ":", "-."]
    with matplotlib.style.context("default"):  # the user's matplotlibrc must not change the output
        fig = Figure(figsize=(5.5 * len(modes), 4.2), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(modes), squeeze=False)[0]
        colors = matplotlib.colormaps["tab10"]
        for ax, mode in zip(axes, modes):
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="B0 (dense)")
            for i, provider in enumerate(providers):
                for j, structure in enumerate(structures):
                    pts = points[mode].get((provider, structure))
                    if not pts:
                        continue
                    color = colors(i % 10)
                    xs = sorted({s for s, _ in pts})
                    means = [_geomean([v for s, v in pts if s == x]) for x in xs]
                    ax.scatter([100 * s for s, _ in pts], [v for _, v in pts], color=color, alpha=0.3, s=14)
                    ax.plot([100 * x for x in xs], means, color=color, marker="o", linestyle=styles[j % len(styles)],
                            label=f"{provider}, {structure}" if structure else provider)  # fmt: skip
            ax.set_yscale("log", base=2)
            # Plain factors (0.5x, 1x, 2x) read faster than powers of two.
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("speed-up over B0 (B0 time / provider time)")
            ax.set_title(mode or "(no mode)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        # No 'Software' entry: the PNG's bytes depend on the CSV only, not on which matplotlib wrote the tag.
        fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _provider_sort_key(provider: str) -> tuple:
    # Baselines first in their B-number order, then ours.
    return (1 if is_ours(provider) else 0, provider)


# -------------------------------------------------------------------------------------------------------- report
def write_report(
    results_dir: Path, out_dir: Optional[Path] = None, all_runs: bool = False, include_quick: bool = False
) -> Path:
    """Read the CSVs under ``results_dir``; write ``summary.md`` and the plots to ``out_dir``.

    Args:
        results_dir: where the benchmark CSVs are.
        out_dir: where to write (default: results_dir); plots go to ``out_dir/plots``.
        all_runs: summarise every run instead of the latest per (device, op).
        include_quick: keep runs made with --quick (smoke shapes).

    Returns:
        The path of summary.md.

    Raises:
        FileNotFoundError: results_dir does not exist.
        ValueError: it holds no benchmark rows (none left once quick runs are dropped).

    Example:
        >>> write_report(Path("bench/results"))
        PosixPath('bench/results/summary.md')
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    plots_dir = out_dir / "plots"
    rows, notes = read_results(results_dir, skip=[plots_dir])
    if not rows:
        raise ValueError(f"no benchmark rows in any CSV under {results_dir}")
    grouped = group_runs(rows)
    dropped_quick = 0
    if not include_quick:
        for key in list(grouped):
            kept = [run for run in grouped[key] if not run.quick]
            dropped_quick += len(grouped[key]) - len(kept)
            if kept:
                grouped[key] = kept
            else:
                del grouped[key]
    if not grouped:
        raise ValueError(
            f"every run under {results_dir} is a --quick run (smoke shapes); pass --include-quick to summarise them"
        )

    lines = [
        "# rtl benchmark summary",
        "",
        "Speed-up of rtl's routed ops (`ours`) over the dense layer with the unmasked weights (B0) and over the naive "
        "per-ticket loop of the reference backend (B1): that baseline's median time over ours, same run, case and mode "
        "(> 1: ours is faster). ms: median per call.",
        "",
        f"- sources: {', '.join(sorted({r['_file'] for r in rows}))}",
        "- runs: "
        + ("every run, oldest first" if all_runs else "the latest run of each device and benchmark")
        + ("" if include_quick else "; --quick runs (smoke shapes) left out")
        + (f" ({dropped_quick} of them)" if dropped_quick else ""),
    ]
    lines += [f"- {n}" for n in notes]
    devices = sorted({device for device, _ in grouped})
    for device in devices:
        lines += ["", f"## {device}"]
        for op in sorted((op for d, op in grouped if d == device), key=_op_sort_key):
            runs = grouped[(device, op)]
            chosen = runs if all_runs else runs[-1:]
            lines += ["", f"### {op}"]
            for run in chosen:
                if all_runs:
                    lines += ["", f"#### run {run.run_id}"]
                lines += ["", run_header(run)]
                if not all_runs:
                    older = _in_order(r.get("case", "") for old in runs[:-1] for r in old.rows)
                    here = {r.get("case", "") for r in run.rows}
                    missing = [c for c in older if c not in here]
                    if missing:
                        lines.append(f"- cases only in older runs (see --all-runs): {', '.join(missing)}")
                lines += ["", run_table(run)]
            name = f"{op}_{slug(device)}_speedup.png"
            title = (f"{op} on {device}: speed-up over B0 vs sparsity\n"
                     + (f"geometric mean over {len(chosen)} runs" if len(chosen) > 1
                        else f"torch {chosen[0].values('torch')}, git {chosen[0].values('git_rev')}"))  # fmt: skip
            if write_plot(chosen, plots_dir / name, title):
                lines += ["", f"![{op} speed-up over B0 on {device}](plots/{name})"]
            else:
                lines += ["", "(no plot: no row with both a sparsity and a speed-up over B0)"]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="folder holding the benchmark CSVs (default: bench/results)",
    )
    ap.add_argument("--out", type=Path, default=None, help="where summary.md and plots/ go (default: --results)")
    ap.add_argument("--all-runs", action="store_true", help="every run, not only the latest per device and op")
    ap.add_argument("--include-quick", action="store_true", help="keep runs made with --quick (smoke shapes)")
    return ap.parse_args(argv)  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = write_report(args.results, args.out, all_runs=args.all_runs, include_quick=args.include_quick)
    except (FileNotFoundError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary} and plots in {summary.parent / 'plots'}")
    return 0
