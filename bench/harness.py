"""The one harness every benchmark under bench/ plugs into: ``python -m bench {linear,conv2d,models} [ARGS]``.

A benchmark (bench_linear.py, bench_conv2d.py, bench_models.py) is a :class:`Benchmark`: its cases, how to build one
case's inputs, providers and float64 references (:class:`Prepared`), its CSV columns and its markdown heading and
legend. Everything else is done here, the same way for every benchmark:

- cases (:class:`Case`): a name, the name without its dtype (``base``), a family, targets, a quick variant
  (:meth:`Case.quick`) and selection by any of those names (:func:`select_cases`), per device type;
- providers (:class:`Provider`): the baselines (B0, B1, ...) and ours, each one callable per mode it is timed in,
  or an "unavailable because ..." reason that becomes a row of its own instead of a silent gap;
- the float64 check (:func:`check_provider`): before anything is timed, every provider's forward output is compared
  with a float64 computation of the function it computes; a provider off by more than the dtype's tolerance is
  refused (an ``error`` row, not timed), so a fast wrong answer never shows up as a speed-up;
- timing (:func:`time_fn`): warm-up, then individually timed calls, median and p10/p90; a case is timed mode by
  mode, its providers one after the other within a mode, on the very same tensors;
- ratios to B0 and B1 and target verdicts (:func:`add_ratios_and_targets`);
- results: rows appended to ``<results-dir>/<benchmark>_<device kind>.csv`` (header checked before measuring,
  :func:`append_csv`) and the run's tables in ``<benchmark>_<device kind>_<git rev>.md`` (:func:`run_markdown`);
- the shared command line (:func:`argument_parser`) and run driver (:func:`run_cases`);
- for the two op benchmarks, their common inputs, references and providers (:func:`op_providers`).

Also here: :func:`environment` (device, versions, threads, git revision, gathered once per run so every row carries
them) and the mask makers (unstructured and block-structured, with an exact kept count per ticket).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import importlib.metadata
import math
import platform
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings of one call, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of an already sorted, non-empty sequence."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on device (a no-op on CPU, where every op runs to completion before returning)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 20,
    max_seconds: Optional[float] = None,
    min_repeats: int = 3,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    Warm-up absorbs one-time costs (layout compilation and caching, allocator growth, Triton JIT, MKL thread
    start-up) that a training loop pays once, not per step. Each call is timed on its own so the spread can be
    reported. Python's garbage collector is paused while timing so a collection pause is not charged to whichever
    provider happens to trigger it (callers may ``gc.collect()`` beforehand; it is not done here because with torch
    loaded one collection takes a good fraction of a second, too much to pay per row).

    Args:
        fn: the work to time; its result is dropped.
        device: where it runs; on CUDA the calls are timed with events and synchronised.
        warmup: untimed calls first.
        repeats: timed calls wanted.
        max_seconds: stop early (after at least ``min_repeats`` calls) once the timed calls add up to this much, so
            a slow provider cannot blow the run's time budget; None or 0 for no cap.
        min_repeats: the fewest timed calls kept even when over ``max_seconds``.

    Returns:
        Timing with the median, p10 and p90 in ms and the number of timed calls made.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    was_enabled = gc.isenabled()
    gc.disable()
    samples: List[float] = []
    total = 0.0
    try:
        for i in range(max(1, repeats)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            samples.append(ms)
            total += ms / 1e3
            if max_seconds and total >= max_seconds and i + 1 >= min_repeats:
                break
    finally:
        if was_enabled:
            gc.enable()
    ordered = sorted(samples)
    return Timing(
        median_ms=statistics.median(ordered),
        p10_ms=_percentile(ordered, 0.10),
        p90_ms=_percentile(ordered, 0.90),
        repeats=len(ordered),
    )


# ------------------------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name for CUDA devices; otherwise the CPU model (from /proc/cpuinfo) and, in brackets, the vector
    ISA torch's CPU kernels use ('AMD EPYC (AVX512)').

    The ISA is part of the name because a VM's model name hides the host: two 2-core "AMD EPYC" VMs, one with
    AVX2 and one with AVX-512, ran the dense resnet18 baseline at 260 and 75 ms (bench/results/models_cpu.csv), so
    ratios to dense are not comparable across the two (rtl's CPU kernels also pick their build by the CPU).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older torch
        isa = ""
    return f"{_cpu_model()} ({isa})" if isa else _cpu_model()


def package_version(name: str) -> str:
    """Installed version of a distribution, read from metadata (so Triton is not imported just to name it)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_revision(ignore: Iterable[Path] = ()) -> str:
    """Short HEAD hash, plus ``-dirty`` when the working tree differs from it.

    Untracked files under the ``ignore`` folders (the results directory) do not count: otherwise the first run would
    mark every later run of the same commit dirty with its own output. Any other change, tracked or untracked,
    does, because it may change what is measured.
    """
    rev = _git("rev-parse", "--short", "HEAD")
    if rev is None:
        return "unknown"
    rev = rev.strip()
    status = _git("status", "--porcelain")
    if status is None:
        return rev
    skip = []
    for folder in ignore:
        try:
            rel = Path(folder).resolve().relative_to(REPO_ROOT).as_posix().rstrip("/") + "/"
        except ValueError:  # outside the repository: cannot show up in git status anyway
            continue
        skip.append(rel)
    for line in status.splitlines():
        path = line[3:].strip().strip('"')
        if " -> " in path:  # rename: the new name is what is in the tree
            path = path.split(" -> ", 1)[1]
        if any(path == s.rstrip("/") or path.startswith(s) for s in skip):
            continue
        return rev + "-dirty"
    return rev


def environment(device: torch.device, results_dir: Optional[Path] = None) -> Dict[str, str]:
    """The record every result row carries: device, versions, thread count, git revision, time of the run."""
    device = torch.device(device)
    env = {
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_kind": device.type,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "git_rev": git_revision([results_dir] if results_dir is not None else []),
    }
    if device.type == "cuda":
        env["cuda"] = str(torch.version.cuda)
        # TF32 changes fp32 matmul speed and error; say which was in force.
        env["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    return env


# ------------------------------------------------------------------------------------------------------------ masks
def _generator(seed: int) -> torch.Generator:
    # Masks are drawn on CPU from a seeded generator and then moved, so the same seed gives the same masks on every
    # device and machine (results from a CPU and a GPU run describe the same problem).
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _kept_count(total: int, sparsity: float) -> int:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round((1.0 - sparsity) * total))


def unstructured_masks(
    tickets: int, n: int, k: int, sparsity: float, seed: int = 0, device: torch.device = "cpu"
) -> torch.Tensor:
    """(tickets, n, k) bool masks, each ticket keeping exactly round((1 - sparsity) * n * k) weights at random.

    Tickets are drawn independently (as separate IMP runs would give), so they overlap only by chance.
    """
    g = _generator(seed)
    keep = _kept_count(n * k, sparsity)
    masks = torch.zeros(tickets, n * k, dtype=torch.bool)
    for t in range(tickets):
        masks[t, torch.randperm(n * k, generator=g)[:keep]] = True
    return masks.view(tickets, n, k).to(device)


def block_masks(
    tickets: int,
    n: int,
    k: int,
    sparsity: float,
    block_n: int,
    block_k: int,
    seed: int = 0,
    device: torch.device = "cpu",
) -> torch.Tensor:
    """(tickets, n, k) bool masks made of whole block_n x block_k blocks, independent per ticket.

    Each ticket keeps exactly round((1 - sparsity) * NB * KB) of the NB x KB blocks (edge blocks are cut to the
    weight's shape), as block-granular pruning produces. Kept blocks are fully dense.
    """
    g = _generator(seed)
    nb, kb = -(-n // block_n), -(-k // block_k)
    keep = _kept_count(nb * kb, sparsity)
    blocks = torch.zeros(tickets, nb * kb, dtype=torch.bool)
    for t in range(tickets):
        blocks[t, torch.randperm(nb * kb, generator=g)[:keep]] = True
    blocks = blocks.view(tickets, nb, kb)
    full = blocks.repeat_interleave(block_n, dim=1).repeat_interleave(block_k, dim=2)
    return full[:, :n, :k].contiguous().to(device)


def mask_sparsity(masks: torch.Tensor) -> float:
    """Fraction of pruned weights over all tickets."""
    return 1.0 - masks.float().mean().item()


# -------------------------------------------------------------------------------------------------------------- CSV
def check_csv_header(path: Path, fields: Sequence[str]) -> None:
    """Raise if ``path`` exists with another header than ``fields``.

    Called before measuring: appending rows under a different header would silently shift every column, and
    finding out only at the end would waste the run.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if header != list(fields):
        raise ValueError(
            f"{path} has columns {header}, this benchmark writes {list(fields)}; "
            "move the old file aside (it is kept as history) or pass another --results-dir"
        )


def append_csv(path: Path, rows: Iterable[Mapping[str, object]], fields: Sequence[str]) -> int:
    """Append rows to a CSV, writing the header only when the file is new or empty. Returns rows written.

    Opened in append mode, never rewritten: the CSV is the history of every run on every machine.
    """
    path = Path(path)
    check_csv_header(path, fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    count = 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in fields})
            count += 1
    return count


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    return value


def read_csv(path: Path) -> List[Dict[str, str]]:
    """All rows of a CSV as dicts (for tests and for summarising history)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------------- markdown
def _md_cell(value: object) -> str:
    text = "" if value is None else str(value)
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: Optional[str] = None) -> str:
    """A GitHub markdown table. ``align``: one of 'l', 'r', 'c' per column (default: first left, rest right)."""
    headers = list(headers)
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    for row in rows:
        cells = list(row)
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells for {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def format_ms(ms: Optional[float]) -> str:
    """Milliseconds with about three significant digits (0.0123, 1.23, 12.3, 123)."""
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return ""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:#.3g}"  # keep trailing zeros: 0.300, not 0.3


def format_ratio(ratio: Optional[float]) -> str:
    """A speed ratio as '2.31x' (blank when missing)."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return ""
    return f"{ratio:.2f}x"


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One-line, bounded description of an exception, fit for a CSV cell and a table."""
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_err(err: object) -> str:
    """A max-abs-error cell ('1.23e-05'); blank when there is none (a CSV cell read back may be '')."""
    if err is None or err == "":
        return ""
    return f"{float(err):.2e}"


def unused_path(path: Path) -> Path:
    """``path``, or ``<stem>_2<suffix>``, ``<stem>_3<suffix>``... if it exists: a second run of the same commit
    keeps the first run's table (the CSV keeps every run's rows anyway)."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def command_text(bench_name: str, argv: Sequence[str]) -> str:
    """The command line that ran a benchmark, as its markdown file records it."""
    return " ".join(["python -m bench", bench_name, *argv])


# ---------------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """One line of the target tables (docs/benchmarks.md): ours must beat ``against`` by ``min_ratio`` in ``mode``.

    The ratio is the baseline's median over ours (> 1: ours is faster), so "<= 1.1x B0 time" is min_ratio 1/1.1
    and "faster than B0" is min_ratio 1 with strict=True.
    """

    mode: str
    against: str
    min_ratio: float
    text: str
    strict: bool = False

    def met(self, ratio: float) -> bool:
        return ratio > self.min_ratio if self.strict else ratio >= self.min_ratio


def faster(mode: str, against: str, times: float) -> Target:
    """Ours at least ``times`` times faster than ``against`` in ``mode``."""
    return Target(mode, against, times, f"{mode} >= {times:g}x faster than {against}")


def at_most(mode: str, against: str, times: float) -> Target:
    """Ours taking at most ``times`` times the time of ``against`` in ``mode``."""
    return Target(mode, against, 1.0 / times, f"{mode} <= {times:g}x {against} time")


def strictly_faster(mode: str, against: str) -> Target:
    """Ours faster than ``against`` in ``mode`` (a tie does not count)."""
    return Target(mode, against, 1.0, f"{mode} faster than {against}", strict=True)


def no_slower(mode: str, against: str) -> Target:
    """Ours no slower than ``against`` in ``mode`` (a tie counts)."""
    return Target(mode, against, 1.0, f"{mode} no slower than {against}")


def add_ratios_and_targets(rows: List[Dict[str, object]], case: "Case", quick: bool) -> None:
    """ratio_vs_B0/B1 (baseline median / this median, per mode) and, on ours rows, the targets and whether met.

    A verdict needs both medians; without one it is 'n/a' (the target text says which time is missing), and a
    quick run's shapes say nothing about the real case, so its verdict is 'n/a (quick shapes)'.
    """
    medians = {(r["provider"], r["mode"]): r["median_ms"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for against in ("B0", "B1"):
            other = medians.get((against, r["mode"]))
            r[f"ratio_vs_{against}"] = other / r["median_ms"] if other and r["median_ms"] > 0 else None
    for r in rows:
        if not str(r["provider"]).startswith("ours:"):
            continue
        targets = [t for t in case.targets if t.mode == r["mode"]]
        if not targets:
            continue
        parts, verdicts = [], []
        for t in targets:
            other = medians.get((t.against, t.mode))
            mine = medians.get((r["provider"], r["mode"])) if r.get("status") == "ok" else None
            if other is None or mine is None or mine <= 0:
                missing = t.against if other is None else r["provider"]
                parts.append(f"{t.text} (n/a: no {missing} time)")
                verdicts.append(None)
                continue
            ratio = other / mine
            parts.append(f"{t.text} ({ratio:.2f}x)")
            verdicts.append(t.met(ratio))
        r["target"] = "; ".join(parts)
        if quick:
            r["target_met"] = "n/a (quick shapes)"
        elif any(v is None for v in verdicts):
            r["target_met"] = "n/a"
        else:
            r["target_met"] = "met" if all(verdicts) else "not met"


# ------------------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True, kw_only=True)
class Case:
    """One benchmark case; a benchmark subclasses it with its shape fields and :meth:`quick`.

    ``name`` is unique among a device type's cases; ``base`` is the name without its dtype tag (the bf16 and fp32
    variants of a shape share it, and with it their data); ``family`` groups cases (``--cases`` accepts it; '' for
    none). ``repeats`` and ``warmup`` are the case's timing defaults (``warmup`` None: the run's default).
    """

    name: str
    base: str
    dtype: torch.dtype
    tickets: int
    sparsity: float
    repeats: int
    family: str = ""
    warmup: Optional[int] = None
    targets: Tuple[Target, ...] = ()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def seed(self) -> int:
        """The seed of the case's data, from its base name: its dtype variants, CPU and GPU runs share data."""
        return zlib.crc32(self.base.encode())

    def quick(self) -> "Case":
        """The same case on tiny shapes with few repeats, for smoke runs of seconds."""
        raise NotImplementedError(f"{type(self).__name__} has no quick variant")


def select_cases(cases: Sequence[Case], names: Optional[str], device_type: str, quick: bool) -> List[Case]:
    """The cases of a run: all of ``cases``, or those named in ``names`` (comma-separated case names, names
    without the dtype tag, or families), in their order; each replaced by its quick variant when ``quick``.

    Unknown names end the program with the list of choices, before anything is written.

    Example:
        >>> [c.name for c in select_cases(cpu_cases(), "inr_u50", "cpu", quick=False)]
        ['inr_u50']
    """
    cases = list(cases)
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {c.name for c in cases} | {c.base for c in cases} | {c.family for c in cases if c.family}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            choices = ", ".join(dict.fromkeys([c.family for c in cases if c.family] + [c.name for c in cases]))
            raise SystemExit(f"unknown case(s) {', '.join(unknown)} for {device_type}; choose from {choices}")
        cases = [c for c in cases if c.name in wanted or c.base in wanted or (c.family and c.family in wanted)]
    return [c.quick() for c in cases] if quick else cases


# -------------------------------------------------------------------------------------------------------- providers
# The float64 check's tolerance per dtype, relative to max |reference|: rounding of the dtype stays well under it
# (fp32 includes TF32 convolutions on a GPU), while a wrong ticket, a dropped mask or a lost bias moves outputs by a
# good fraction of their scale.
TOLERANCE: Dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-2,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


@dataclass
class Provider:
    """One way to compute a case: a baseline (B0, B1, ...), ours, or a preparation step timed on its own.

    ``steps`` maps each mode the provider is timed in to one call of it in that mode (its result is dropped);
    ``output`` computes its forward output on the checked samples, compared with ``references[reference]`` before
    anything is timed (None for a 'prep' provider, which computes no function). Calls run inside ``context()`` (the
    rtl_kernels backend a routed provider uses). ``unavailable`` says why it cannot run here: its rows say so
    instead of vanishing. ``columns``: CSV columns of its own rows (the model benchmark's ``backend``).
    """

    name: str
    kind: str  # 'baseline', 'ours' or 'prep'
    steps: Mapping[str, Callable[[], object]]
    output: Optional[Callable[[], torch.Tensor]] = None
    reference: Optional[str] = None
    context: Callable[[], ContextManager] = contextlib.nullcontext
    unavailable: Optional[str] = None
    columns: Mapping[str, object] = field(default_factory=dict)


def check_provider(
    provider: Provider, references: Mapping[str, torch.Tensor], tolerance: float
) -> Tuple[float, Optional[str]]:
    """Compare a provider's forward output with the float64 reference of the function it computes.

    Args:
        provider: a provider with ``output`` and ``reference``.
        references: float64 outputs by name, each (S, ...) on the checked samples.
        tolerance: the largest max |difference| allowed, relative to max |reference|.

    Returns:
        (max |output - reference|, None) when within tolerance, else (that error, why the provider is refused).

    Raises:
        KeyError: the provider names no known reference. ValueError: its output's shape is not the reference's.

    Example:
        >>> check_provider(p, {"routed": y64}, 1e-2)
        (3.1e-07, None)
    """
    if provider.reference not in references:
        raise KeyError(f"{provider.name}: no float64 reference named {provider.reference!r} ({', '.join(references)})")
    ref = references[provider.reference]
    with provider.context():
        y = provider.output()
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"output of shape {tuple(y.shape)} for a reference of shape {tuple(ref.shape)}")
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if not err <= tolerance * scale:  # also refuses nan
        return err, (
            f"float64 check failed: max abs err {err:.3g} vs {provider.reference} exceeds {tolerance:g} x "
            f"max |{provider.reference}| ({scale:.3g}); not timed"
        )
    return err, None


# -------------------------------------------------------------------------------------------------------- benchmark
@dataclass
class Prepared:
    """What a benchmark builds for one case before anything is timed.

    ``references``: the float64 forward of each function the providers compute, (S, ...) on the checked samples.
    ``columns``: the case's CSV columns beyond those the harness fills (case, dtype, T, sparsity, environment).
    ``check_columns``: added to the rows of checked providers (how many samples the check covered).
    ``enter_mode``: called before a mode's rows are timed (the model benchmark switches train/eval there, outside
    the timed calls).
    """

    providers: List[Provider]
    references: Dict[str, torch.Tensor]
    columns: Dict[str, object]
    check_columns: Dict[str, object] = field(default_factory=dict)
    enter_mode: Optional[Callable[[str], None]] = None


@dataclass(frozen=True)
class Benchmark:
    """One benchmark as the harness runs it.

    ``name`` is its command (``python -m bench NAME``) and the stem of its results (``NAME_<device kind>.csv``).
    ``cases(device_type, args)`` gives every case the run may select from; ``prepare(case, device, args)`` builds a
    case's :class:`Prepared`; ``describe(case)`` is its progress line; ``heading(case_rows)`` the title of its
    table. ``legend``: the lines under the run file's environment saying how to read the tables.
    ``table_columns``: (CSV column, text when blank) shown per provider before the timings. ``skipped(device_type,
    args)``: cases of the device left out of a default run, named in the run file with ``skipped_note``.
    """

    name: str
    title: str
    fields: Sequence[str]
    modes: Tuple[str, ...]
    cases: Callable[[str, argparse.Namespace], List[Case]]
    prepare: Callable[[Case, torch.device, argparse.Namespace], Prepared]
    describe: Callable[[Case], str]
    heading: Callable[[List[Dict[str, object]]], str]
    legend: Sequence[str]
    quick_note: str = "- **quick run: tiny smoke shapes; times say nothing about the real cases, targets not judged.**"
    table_columns: Sequence[Tuple[str, str]] = ()
    tolerance: Mapping[torch.dtype, float] = field(default_factory=lambda: dict(TOLERANCE))
    skipped: Callable[[str, argparse.Namespace], List[str]] = lambda device_type, args: []
    skipped_note: str = ""


def timing_settings(case: Case, args: argparse.Namespace, device: torch.device) -> Tuple[int, int, float]:
    """(repeats, warmup, max_seconds) of a case: the command line's, else the quick run's, else the case's, else
    the device's default."""
    repeats = args.repeats if args.repeats else case.repeats
    if args.warmup is not None:
        warmup = args.warmup
    elif args.quick:
        warmup = 1
    elif case.warmup is not None:
        warmup = case.warmup
    else:
        warmup = 3 if device.type == "cuda" else 2
    max_seconds = args.max_seconds if args.max_seconds is not None else (1.0 if args.quick else 5.0)
    return repeats, warmup, max_seconds


def _print_row(row: Mapping[str, object]) -> None:
    if row.get("status") == "ok":
        err = row.get("max_abs_err")
        print(
            f"  {row['provider']:<12} {row['mode']:<10} {format_ms(row['median_ms']):>8} ms "
            f"(p10 {format_ms(row['p10_ms'])}, p90 {format_ms(row['p90_ms'])}, n={row['repeats']})"
            + (f"  err {err:.2e}" if err is not None else ""),
            flush=True,
        )
    else:
        print(f"  {row['provider']:<12} {row['mode']:<10} {row['status']}: {row.get('error', '')}", flush=True)


def measure_case(
    bench: Benchmark,
    case: Case,
    device: torch.device,
    env: Mapping[str, str],
    run_id: str,
    args: argparse.Namespace,
    label: str = "",
) -> List[Dict[str, object]]:
    """All rows of one case: every provider in every mode it has, each checked against float64 first.

    The check runs for every provider before any timing, so a refused provider gets an ``error`` row per mode and
    is not timed; a provider that raises gets an ``error`` row and the run goes on. Then, mode by mode, every
    provider is timed with :func:`time_fn`, one after the other on the same tensors.

    Returns:
        One dict per (provider, mode) holding the benchmark's CSV fields (and ``ref_max_abs``, the reference's
        scale, whether or not the CSV keeps it).
    """
    import rtl_kernels as rk

    print(f"{label} {case.name}: {bench.describe(case)}".strip(), flush=True)
    gc.collect()  # once per case: the previous case's tensors and graphs go before anything is timed
    prepared = bench.prepare(case, device, args)
    repeats, warmup, max_seconds = timing_settings(case, args, device)
    base = {
        **{k: env.get(k, "") for k in bench.fields if k in env},
        "run_id": run_id,
        "quick": int(bool(args.quick)),
        "case": case.name,
        "dtype": case.dtype_name,
        "T": case.tickets,
        "sparsity": case.sparsity,
        **prepared.columns,
    }
    scales = {key: (ref.abs().max().item() if ref.numel() else 0.0) for key, ref in prepared.references.items()}
    tolerance = bench.tolerance.get(case.dtype, TOLERANCE.get(case.dtype, 1e-2))

    # The check, once per provider and before anything is timed (a training step would move the weights).
    checks: Dict[str, Dict[str, object]] = {}
    for p in prepared.providers:
        if p.unavailable is not None or p.output is None:
            continue
        try:
            err, problem = check_provider(p, prepared.references, tolerance)
        except Exception as exc:
            err, problem = None, "forward: " + error_text(exc)
        checks[p.name] = dict(max_abs_err=err, **prepared.check_columns)
        if problem:
            checks[p.name].update(status="error", error=problem)

    rows: List[Dict[str, object]] = []
    for mode in bench.modes:
        if prepared.enter_mode is not None:
            prepared.enter_mode(mode)
        for p in prepared.providers:
            if mode not in p.steps:
                continue
            row = dict(base, provider=p.name, mode=mode, **p.columns)
            if p.reference is not None:
                row.update(err_reference=p.reference, ref_max_abs=scales.get(p.reference))
            if p.unavailable is not None:
                row.update(status="unavailable", error=p.unavailable)
            elif checks.get(p.name, {}).get("status") == "error":
                row.update(checks[p.name])
            else:
                row.update(checks.get(p.name, {}))
                try:
                    row.update(_timed(p, p.steps[mode], device, warmup, repeats, max_seconds))
                except Exception as exc:
                    row.update(status="error", error=error_text(exc))
            rows.append(row)
            _print_row(row)
    add_ratios_and_targets(rows, case, quick=args.quick)
    prepared = None  # free this case's tensors now (the providers' closures hold them)
    rk.clear_layout_cache()  # the next case's masks are new tensors; drop this case's compiled layouts now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _timed(
    p: Provider, step: Callable[[], object], device: torch.device, warmup: int, repeats: int, max_seconds: float
) -> Dict[str, object]:
    def call() -> None:
        with p.context():
            step()

    t = time_fn(call, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
    return dict(status="ok", median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, repeats=t.repeats)


# --------------------------------------------------------------------------------------------------------- markdown
def mode_cells(row: Optional[Mapping[str, object]]) -> List[str]:
    """The three cells of one mode in a case table: median (p10–p90) ms, ratio vs B0, ratio vs B1."""
    if row is None:
        return ["—", "", ""]
    if row.get("status") != "ok":
        ms = str(row.get("status"))
    else:
        ms = f"{format_ms(row['median_ms'])} ({format_ms(row['p10_ms'])}–{format_ms(row['p90_ms'])})"
    return [ms, format_ratio(row.get("ratio_vs_B0")), format_ratio(row.get("ratio_vs_B1"))]


def _err_cell(row: Mapping[str, object], with_scale: bool) -> str:
    err = format_err(row.get("max_abs_err"))
    if err and row.get("err_reference"):
        err += f" vs {row['err_reference']}"
        if with_scale and row.get("ref_max_abs") not in (None, ""):
            err += f" (max |y| {float(row['ref_max_abs']):.3g})"
    return err


def case_markdown(bench: Benchmark, case_rows: Sequence[Mapping[str, object]]) -> str:
    """One case's table: providers as rows; per mode its ms (p10–p90) and ratios to B0 and B1; the float64 check's
    error; the targets and verdicts where the benchmark has targets. Each distinct failure is noted once below."""
    by = {(r["provider"], r["mode"]): r for r in case_rows}
    with_target = "target" in bench.fields
    table, notes = [], []
    for name in dict.fromkeys(r["provider"] for r in case_rows):
        mode_rows = [by.get((name, m)) for m in bench.modes]
        any_row = next(r for r in mode_rows if r is not None)
        cells = [name, *(any_row.get(column) or blank for column, blank in bench.table_columns)]
        for r in mode_rows:
            cells += mode_cells(r)
        cells.append(_err_cell(any_row, "ref_max_abs" in bench.fields))
        if with_target:
            cells.append(
                "; ".join(
                    f"{r['target']} → {r.get('target_met', '')}" for r in mode_rows if r is not None and r.get("target")
                )
            )
        table.append(cells)
        notes += [f"- {name} {r['mode']}: {r['status']}: {r['error']}" for r in mode_rows if r and r.get("error")]
    headers = ["provider", *(column for column, _ in bench.table_columns)]
    for m in bench.modes:
        headers += [f"{m} ms (p10–p90)", f"{m} vs B0", f"{m} vs B1"]
    headers += ["max abs err"] + (["target"] if with_target else [])
    align = "l" + "l" * len(bench.table_columns) + "rrr" * len(bench.modes) + "r" + ("l" if with_target else "")
    text = bench.heading(list(case_rows)) + "\n\n" + markdown_table(headers, table, align=align)
    if notes:
        text += "\n\n" + "\n".join(dict.fromkeys(notes))
    return text


def masks_text(case_rows: Sequence[Mapping[str, object]], checked_column: str = "", unit: str = "") -> str:
    """The end of a case table's title: mask structure, nominal and measured sparsity, 64x64 block occupancy, dtype
    and, from ``checked_column`` ('done/total'), on how many ``unit`` the float64 check ran."""
    first = case_rows[0]
    occ = first.get("block_occupancy_64")
    text = (
        f"{first['mask_structure']} {float(first['sparsity']):.0%} (measured {float(first['sparsity_measured']):.1%}), "
        f"64x64 block occupancy {'n/a' if occ in (None, '') else f'{float(occ):.1%}'}, {first['dtype']}"
    )
    checked = (
        next((r.get(checked_column) for r in case_rows if r.get(checked_column)), None) if checked_column else None
    )
    if checked:
        done, total = str(checked).split("/")
        text += (
            f"; max abs err on all {total} {unit}" if done == total else f"; max abs err on {done} of {total} {unit}"
        )
    return text


def environment_lines(env: Mapping[str, str], bench_name: str, argv: Sequence[str]) -> List[str]:
    """The run file's lines naming the device, the versions, the revision and the command."""
    cuda = env["device_kind"] == "cuda"
    return [
        f"- device: {env['device']}; threads: {env['threads']}",
        f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env['cuda']}, fp32 matmul precision {env['fp32_matmul_precision']}" if cuda else ""),
        f"- git {env['git_rev']}, {env['timestamp']}",
        f"- command: `{command_text(bench_name, argv)}`",
    ]


def run_markdown(
    bench: Benchmark,
    env: Mapping[str, str],
    argv: Sequence[str],
    all_rows: Sequence[Mapping[str, object]],
    quick: bool,
    skipped: Sequence[str] = (),
) -> str:
    """The run's markdown file: title, environment, how to read the tables, then one table per case."""
    lines = [f"# {bench.title}, {env['device_kind']}", "", *environment_lines(env, bench.name, argv), *bench.legend]
    if quick:
        lines.append(bench.quick_note)
    if skipped:
        lines.append(bench.skipped_note.format(names=", ".join(skipped), cases=",".join(skipped)))
    for case in dict.fromkeys(r["case"] for r in all_rows):
        lines += ["", case_markdown(bench, [r for r in all_rows if r["case"] == case])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- command line
def argument_parser(bench_name: str, description: str, cases_help: str, warmup_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (--device, --quick, --cases, timing, --threads, --results-dir)."""
    ap = argparse.ArgumentParser(
        prog=f"python -m bench {bench_name}", description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run of seconds")
    ap.add_argument("--cases", default=None, help=cases_help)
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed calls per row (default: per case; --max-seconds caps them)"
    )
    ap.add_argument("--warmup", type=int, default=None, help=warmup_help)
    ap.add_argument(
        "--max-seconds", type=float, default=None,
        help="stop a row's timed calls (after 3) once they add up to this; 0 for no cap (default 5, quick 1)",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: all cores, as the targets assume; --quick: 1, because a smoke run must\n"
        "not take cores from someone timing, and oversubscribed threads make tiny ops wait on each other)",
    )  # fmt: skip
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return ap


def parse_run_arguments(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the options of :func:`argument_parser` (and any the benchmark added)."""
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def run_device(args: argparse.Namespace) -> torch.device:
    """The torch device of the run, with the thread count set first (environment() records the count in force)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return device


# ------------------------------------------------------------------------------------------------------- run driver
def run_cases(
    bench: Benchmark,
    cases: Sequence[Case],
    args: argparse.Namespace,
    argv: Sequence[str],
    device: torch.device,
    skipped: Sequence[str] = (),
) -> int:
    """Measure every case, appending its rows to ``<name>_<device kind>.csv`` and rewriting the markdown as it goes.

    Rows are written case by case, so an interrupted run keeps what it measured.

    Returns:
        0.
    """
    results_dir = args.results_dir.resolve()
    csv_path = results_dir / f"{bench.name}_{device.type}.csv"
    check_csv_header(csv_path, bench.fields)  # fail now, not after the run
    env = environment(device, results_dir)
    run_id = uuid.uuid4().hex[:10]
    md_path = unused_path(results_dir / f"{bench.name}_{device.type}_{env['git_rev']}.md")
    note = f"; not in this run: {', '.join(skipped)}" if skipped else ""
    print(
        f"bench {bench.name}: {env['device']} ({env['threads']} threads), torch {env['torch']}, triton "
        f"{env['triton']}, git {env['git_rev']}, {len(cases)} case(s){' [quick]' if args.quick else ''}{note}",
        flush=True,
    )
    all_rows: List[Dict[str, object]] = []
    for i, case in enumerate(cases, 1):
        rows = measure_case(bench, case, device, env, run_id, args, label=f"[{i}/{len(cases)}]")
        append_csv(csv_path, rows, bench.fields)
        all_rows += rows
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(run_markdown(bench, env, argv, all_rows, args.quick, skipped), encoding="utf-8")
    print()
    print(run_markdown(bench, env, argv, all_rows, args.quick, skipped))
    print(f"appended {len(all_rows)} rows to {csv_path}\nwrote {md_path}", flush=True)
    return 0


def main(
    bench: Benchmark,
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    argv: Optional[Sequence[str]] = None,
) -> int:
    """A benchmark's whole run: parse ``argv``, set the device up, select the cases, measure and write them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = run_device(args)
    cases = select_cases(bench.cases(device.type, args), args.cases, device.type, args.quick)
    skipped = [] if args.cases else bench.skipped(device.type, args)
    return run_cases(bench, cases, args, argv, device, skipped)


# ------------------------------------------------------------------------------------------------------- routed ops
# The modes of the op benchmarks, and the rtl backends that count as "ours" on each device type. The triton backend
# also reports itself available on CPU under TRITON_INTERPRET (set by the test suite), but the interpreter exists
# for tests and timing it is meaningless, so the list is fixed per device rather than taken from available_backends.
OP_MODES = ("fwd", "fwd+bwd")
OURS_BY_DEVICE = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}

OpFunction = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class OpInputs:
    """One op case's tensors; every provider reads these same objects.

    Shapes: x (B, ...); weight (N, ...) as the op takes it; bias (C_out,) or None; masks (T, *weight.shape) bool;
    route (B,) int64; grad_y like the output (B, ...); check (S,) int64 indices of the samples the float64 check
    covers, None for all of them.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    masks: torch.Tensor
    route: torch.Tensor
    grad_y: torch.Tensor
    grouping: object  # rtl_kernels.TicketGrouping of route
    sparsity_measured: float
    block_occupancy: Optional[float]
    check: Optional[torch.Tensor] = None

    def checked(self, y: torch.Tensor) -> torch.Tensor:
        """The samples of an output (B, ...) the float64 check covers."""
        return y if self.check is None else y.index_select(0, self.check)


def block_occupancy_64(masks: torch.Tensor) -> Optional[float]:
    """Fraction of (ticket, 64x64 tile) pairs of (T, rows, cols) masks that keep any weight; None (and a printed
    reason) when the layout cannot be compiled here, since a reporting column must not stop the benchmark."""
    from rtl_kernels.formats.block_csr import compile_block_csr

    try:
        return float(compile_block_csr(masks, 64, 64).occupancy)
    except Exception as exc:
        print(f"  block occupancy unavailable: {error_text(exc)}", flush=True)
        return None


def op_inputs(
    case: Case,
    device: torch.device,
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    fan_in: int,
    out_shape: Sequence[int],
    bias_size: Optional[int],
    masks_2d: Callable[[int], torch.Tensor],
) -> OpInputs:
    """Draw an op case's tensors from its seed (x, weight, bias, grad_y, then a balanced shuffled route).

    Args:
        case: the case (its seed, dtype and T).
        device: where the tensors go.
        x_shape / weight_shape / out_shape: x (B, ...), the weight and the output (B, ...).
        fan_in: the weight is scaled by fan_in ** -0.5, which keeps outputs O(1) so absolute errors compare.
        bias_size: the bias's length, None for no bias.
        masks_2d: seed -> (T, weight rows, rest) bool masks on ``device``, viewed as (T, *weight_shape).

    Returns:
        The :class:`OpInputs` (check None: every sample).
    """
    import rtl_kernels as rk

    g = torch.Generator(device="cpu")
    g.manual_seed(case.seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=case.dtype)

    x = rand(*x_shape)
    weight = rand(*weight_shape, scale=fan_in**-0.5)
    bias = rand(bias_size, scale=0.1) if bias_size is not None else None
    grad_y = rand(*out_shape)
    batch, tickets = x_shape[0], case.tickets
    # Balanced route (B/T samples a ticket), shuffled.
    route = (torch.arange(batch) % tickets)[torch.randperm(batch, generator=g)].to(device)
    masks2d = masks_2d(case.seed + 1)
    return OpInputs(
        x=x,
        weight=weight,
        bias=bias,
        masks=masks2d.view(tickets, *weight_shape),
        route=route,
        grad_y=grad_y,
        grouping=rk.group_by_ticket(route, tickets),
        sparsity_measured=mask_sparsity(masks2d),
        block_occupancy=block_occupancy_64(masks2d),
    )


def op_references(inp: OpInputs, f: OpFunction) -> Dict[str, torch.Tensor]:
    """The forward of each function the op providers compute, in float64 on the checked samples.

    ``routed`` applies ``f`` with W * M_t to each sample's own ticket, read from route itself rather than the
    grouping handed to the providers, so a wrong group_by_ticket would show; ``dense`` is ``f`` with W (B0's
    function) and ``mask0`` with W * M_0 (B0m's).

    Returns:
        {"routed", "dense", "mask0"}: (S, ...) float64.
    """
    x = inp.checked(inp.x).double()
    route = inp.checked(inp.route)
    w = inp.weight.double()
    b = None if inp.bias is None else inp.bias.double()
    dense = f(x, w, b)
    routed = torch.full_like(dense, float("nan"))  # a sample no ticket covers would fail the check
    for t in range(inp.masks.shape[0]):
        sel = (route == t).nonzero().flatten()
        if sel.numel():
            routed[sel] = f(x.index_select(0, sel), w * inp.masks[t], b)
    return {"routed": routed, "dense": dense, "mask0": f(x, w * inp.masks[0], b)}


@dataclass(frozen=True)
class OpBaseline:
    """A benchmark's own baseline beside B0, B0m and B1: ``forward(x, W, b)`` of the function ``reference`` names."""

    name: str
    forward: OpFunction
    reference: str = "routed"
    modes: Tuple[str, ...] = OP_MODES
    unavailable: Optional[str] = None


def op_providers(
    inp: OpInputs,
    device: torch.device,
    dtype: torch.dtype,
    dense: OpFunction,
    routed: OpFunction,
    baselines: Sequence[OpBaseline] = (),
) -> List[Provider]:
    """The providers of an op case, all on ``inp``'s tensors.

    B0 ``dense(x, W, b)``; B0m ``dense(x, W * M_0, b)``; B1 ``routed`` on the reference backend; then
    ``baselines``; then ours, ``routed`` on every rtl backend meant for the device; then ``route_prep``
    (group_by_ticket, timed apart: the routed providers get the precomputed grouping, as the layers of a model
    sharing one route do). Modes: ``fwd`` (the plain inputs, so no autograd graph is recorded) and ``fwd+bwd``
    (gradients of x, W and b for the fixed grad_y, via torch.autograd.grad, so no .grad accumulation is timed).
    """
    import rtl_kernels as rk

    # Leaves sharing storage with the plain inputs, for the fwd+bwd mode.
    xg = inp.x.detach().requires_grad_(True)
    wg = inp.weight.detach().requires_grad_(True)
    bg = None if inp.bias is None else inp.bias.detach().requires_grad_(True)
    grad_inputs = (xg, wg) if bg is None else (xg, wg, bg)
    m0 = inp.masks[0]

    def provider(name, kind, forward, reference, modes=OP_MODES, **kwargs) -> Provider:
        steps = {"fwd": lambda: forward(inp.x, inp.weight, inp.bias)}
        if "fwd+bwd" in modes:
            steps["fwd+bwd"] = lambda: torch.autograd.grad(forward(xg, wg, bg), grad_inputs, inp.grad_y)
        output = lambda: inp.checked(forward(inp.x, inp.weight, inp.bias))
        return Provider(name, kind, steps, output=output, reference=reference, **kwargs)

    providers = [
        provider("B0", "baseline", dense, "dense"),
        provider("B0m", "baseline", lambda x, w, b: dense(x, w * m0, b), "mask0"),
        provider("B1", "baseline", routed, "routed", context=lambda: rk.set_backend("reference")),
    ]
    for bl in baselines:
        providers.append(provider(bl.name, "baseline", bl.forward, bl.reference, bl.modes, unavailable=bl.unavailable))
    reasons = rk.unavailable_reasons(device, dtype)
    for name in OURS_BY_DEVICE[device.type]:
        providers.append(
            provider(
                f"ours:{name}",
                "ours",
                routed,
                "routed",
                context=(lambda n=name: rk.set_backend(n)),
                unavailable=reasons.get(name, f"no backend named {name!r}"),
            )
        )
    tickets = inp.masks.shape[0]
    providers.append(
        Provider("route_prep", "prep", {"fwd": lambda: rk.group_by_ticket(route=inp.route, num_tickets=tickets)})
    )
    return providers


def op_legend(baselines: str, computation: str = "computation", subset: str = "") -> List[str]:
    """The legend line of the op benchmarks' run files: ``baselines`` says what the baselines are, ``computation``
    and ``subset`` what the float64 check computed and on which samples."""
    return [
        '- ms: median (p10–p90) of repeated calls after warm-up. "vs B0" / "vs B1": that baseline\'s median over '
        f"this one, same mode (> 1: faster than it).{baselines} Routed providers get a precomputed grouping; its cost "
        f"is the route_prep row. max abs err: forward vs a float64 {computation} of the function the provider "
        f"computes{subset}; a provider beyond its dtype's tolerance is refused, not timed."
    ]
