"""Helpers shared by every op benchmark under bench/ (linear now, conv later).

What lives here and why:

- :func:`time_fn`: warm-up, then N individually timed calls; reports the median (robust to the odd slow call on a
  shared 2-core machine) and p10/p90 (the spread, so a reader can tell a real gap from noise). On CUDA each call
  is bracketed by events and synchronised, so the figure is device time, not launch time.
- :func:`environment`: everything docs/benchmarks.md reports next to a figure (device, versions, threads, git
  revision), gathered once per run so every CSV row carries it.
- mask makers: the two mask families the targets are stated for (unstructured, and bn x bk block-structured), with
  an exact number of kept weights (or blocks) per ticket so the nominal sparsity is the real one.
- :func:`append_csv` / :func:`check_csv_header`: results accumulate across runs and machines in one CSV per op and
  device kind; old rows are never rewritten, and a header mismatch is caught before any time is spent measuring.
- :func:`markdown_table`: plain GitHub tables, so results can be committed and read in review.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib.metadata
import math
import platform
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def measure_providers(
    providers,
    base: Dict[str, object],
    modes: Sequence[str],
    time_step: Callable[[Callable[[], None]], Dict[str, object]],
    route_prep: Callable[[], object],
    forward_error: Callable[[object], float],
    fwd_step: Callable[[object], None],
    fwd_bwd_step: Callable[[object], None],
    extra: Optional[Dict[str, object]] = None,
) -> List[Dict[str, object]]:
    """Rows of one case: every provider in every mode it supports (the loop shared by the op benchmarks).

    ``providers`` have ``name``, ``kind`` ('baseline', 'ours' or 'prep'), ``backward``, ``unavailable`` and
    ``err_reference``; the callables take a provider. The forward error is measured once, outside the timed region,
    so a fast wrong answer shows in the same row; a provider that raises gets an error row, the run goes on.
    """
    rows: List[Dict[str, object]] = []
    extra = extra or {}

    def record(provider, mode: str, **values) -> None:
        row = dict(base, provider=provider.name, mode=mode, **values)
        rows.append(row)
        if row.get("status") == "ok":
            err = row.get("max_abs_err")
            print(
                f"  {provider.name:<12} {mode:<8} {format_ms(row['median_ms']):>8} ms "
                f"(p10 {format_ms(row['p10_ms'])}, p90 {format_ms(row['p90_ms'])}, n={row['repeats']})"
                + (f"  err {err:.2e}" if err is not None else ""),
                flush=True,
            )
        else:
            print(f"  {provider.name:<12} {mode:<8} {row['status']}: {row.get('error', '')}", flush=True)

    for p in providers:
        provider_modes = tuple(modes) if p.backward else ("fwd",)
        if p.kind == "prep":
            try:
                record(p, "fwd", **time_step(route_prep))
            except Exception as exc:
                record(p, "fwd", status="error", error=error_text(exc))
            continue
        if p.unavailable is not None:
            for mode in provider_modes:
                record(p, mode, status="unavailable", error=p.unavailable, err_reference=p.err_reference)
            continue
        try:
            err = forward_error(p)
        except Exception as exc:
            for mode in provider_modes:
                record(p, mode, status="error", error="forward: " + error_text(exc), err_reference=p.err_reference)
            continue
        for mode in provider_modes:
            step = (lambda p=p: fwd_step(p)) if mode == "fwd" else (lambda p=p: fwd_bwd_step(p))
            try:
                values = time_step(step)
            except Exception as exc:
                values = dict(status="error", error=error_text(exc))
            record(p, mode, max_abs_err=err, err_reference=p.err_reference, **extra, **values)
    return rows


def add_run_arguments(ap, cases_help: str, warmup_help: str, default_results_dir) -> None:
    """The command-line options every op benchmark takes (--device, --quick, --cases, timing, --results-dir)."""
    from pathlib import Path

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
    ap.add_argument("--results-dir", type=Path, default=default_results_dir)


def parse_run_arguments(ap, argv):
    """Parse and check the options of :func:`add_run_arguments`."""
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def run_device(args):
    """The torch device of the run, with the thread count set first (environment() records the count in force)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return device


# ------------------------------------------------------------------------------------------------- per-case tables
def mode_cells(row: Optional[Mapping[str, object]]) -> List[str]:
    """The three cells of one mode in a case table: median (p10–p90) ms, ratio vs B0, ratio vs B1."""
    if row is None:
        return ["—", "", ""]
    if row.get("status") != "ok":
        ms = str(row.get("status"))
    else:
        ms = f"{format_ms(row['median_ms'])} ({format_ms(row['p10_ms'])}–{format_ms(row['p90_ms'])})"
    return [ms, format_ratio(row.get("ratio_vs_B0")), format_ratio(row.get("ratio_vs_B1"))]


def error_notes(name: str, rows: Iterable[Optional[Mapping[str, object]]]) -> List[str]:
    """One note line per row of ``name`` that failed."""
    return [f"- {name} {r['mode']}: {r['status']}: {r['error']}" for r in rows if r is not None and r.get("error")]


def case_table(
    title: str, headers: Sequence[str], table: Sequence[Sequence[str]], align: str, notes: Sequence[str]
) -> str:
    """A case's markdown: its title, the provider table, then each distinct failure note once."""
    text = title + "\n\n" + markdown_table(headers, table, align=align)
    if notes:
        text += "\n\n" + "\n".join(dict.fromkeys(notes))
    return text


# ------------------------------------------------------------------------------------------------------- run driver
def _unused_path(path: Path) -> Path:
    """``path``, or ``<stem>_2<suffix>``, ``<stem>_3<suffix>``... if it exists: a second run of the same commit
    keeps the first run's table (the CSV keeps every run's rows anyway)."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def run_cases(
    bench: str,
    fields: Sequence[str],
    cases: Sequence,
    measure_case: Callable,
    markdown: Callable,
    args,
    argv: Sequence[str],
    device: torch.device,
    note: str = "",
) -> int:
    """Measure every case, appending its rows to ``<bench>_<device>.csv`` and rewriting the markdown as it goes.

    Rows are written case by case, so an interrupted run keeps what it measured. ``measure_case(case, device,
    env, run_id, args, label=...)`` returns the case's rows; ``markdown(env, argv, rows, quick)`` renders the run.
    """
    results_dir = args.results_dir.resolve()
    csv_path = results_dir / f"{bench}_{device.type}.csv"
    check_csv_header(csv_path, fields)  # fail now, not after the run
    env = environment(device, results_dir)
    run_id = uuid.uuid4().hex[:10]
    md_path = _unused_path(results_dir / f"{bench}_{device.type}_{env['git_rev']}.md")
    print(
        f"bench_{bench}: {env['device']} ({env['threads']} threads), torch {env['torch']}, triton {env['triton']}, "
        f"git {env['git_rev']}, {len(cases)} case(s){' [quick]' if args.quick else ''}{note}",
        flush=True,
    )
    all_rows: List[Dict[str, object]] = []
    for i, case in enumerate(cases, 1):
        rows = measure_case(case, device, env, run_id, args, label=f"[{i}/{len(cases)}]")
        append_csv(csv_path, rows, fields)
        all_rows += rows
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(env, argv, all_rows, args.quick), encoding="utf-8")
    print()
    print(markdown(env, argv, all_rows, args.quick))
    print(f"appended {len(all_rows)} rows to {csv_path}\nwrote {md_path}", flush=True)
    return 0
