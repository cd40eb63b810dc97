"""Wall time of one `rtl run` on 1 process against N processes (torchrun, gloo on CPU): ``python -m bench processes``.

Each repeat runs the experiment once per process count, in turn, each in a fresh run directory, so that a slow
spell of the machine hits every count; the table gives the median wall time, the speed-up over one process, and
each stage's time read from the runs' logs (where the time goes, and what does not split). Results go to
``bench/results/processes_<device kind>_<git rev>.md``. On a machine with fewer cores than processes x threads the
processes compete for the cores: the run states the core count so the speed-up can be read against it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .harness import DEFAULT_RESULTS_DIR, REPO_ROOT, environment, environment_lines, markdown_table, unused_path

STAGE_LINE = re.compile(r"^\[(?P<stage>[^\]]+)\] (?P<seconds>[0-9.]+) s$")


def run_once(processes: int, experiment: Sequence[str], out: Path, threads: int) -> Dict[str, float]:
    """One `rtl run` on ``processes`` processes of ``threads`` threads each; returns wall seconds and stage times."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    run = ["-m", "rtl", "run", *experiment, "--no-progress", "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *run, "--threads", str(threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *run]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    times = {"wall": wall}
    for line in proc.stdout.splitlines():
        match = STAGE_LINE.match(line.strip())
        if match:
            times[match["stage"]] = float(match["seconds"])
    return times


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench processes", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="digits-classes --quick --sparsities 0.5,0.9", help="rtl run arguments")
    ap.add_argument("--processes", default="1,2", help="process counts to compare (default 1,2)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per process count (default 2)")
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    experiment = args.experiment.split()
    counts = [int(c) for c in args.processes.split(",")]
    env = environment(torch.device("cpu"), args.results_dir)
    runs: Dict[int, List[Dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n in counts:
                times = run_once(n, experiment, Path(tmp) / f"r{repeat}p{n}", args.threads)
                runs[n].append(times)
                print(f"repeat {repeat + 1}/{args.repeats}, {n} process(es): {times['wall']:.1f} s", flush=True)
    median = {n: {k: statistics.median(r[k] for r in runs[n] if k in r) for k in runs[n][0]} for n in counts}
    base = median[counts[0]]["wall"]
    rows = [
        [
            n,
            f"{median[n]['wall']:.1f}",
            f"{base / median[n]['wall']:.2f}x",
            ", ".join(f"{r['wall']:.1f}" for r in runs[n]),
        ]
        for n in counts
    ]
    stages = [k for k in median[counts[0]] if k != "wall"]
    stage_rows = [[stage] + [f"{median[n].get(stage, float('nan')):.1f}" for n in counts] for stage in stages]
    lines = [
        f"# rtl run on 1 and more processes, {env['device_kind']}",
        "",
        *environment_lines(env, "processes", argv),
        f"- cores: {os.cpu_count()}; threads per process: {args.threads}; experiment: `rtl run {args.experiment}`",
        "",
        "Wall time of the whole run (process start to report), median of the repeats:",
        "",
        markdown_table(["processes", "wall s", "speed-up", "each repeat, s"], rows),
        "",
        "Each stage's time (median, s; the stage lines of rank 0's log). Alg. 1 (`rtl_masks`), the independent "
        "models (`multi@`) and Alg. 2 (`rtl@`) are shared out; the other stages run on rank 0 while the others wait.",
        "",
        markdown_table(["stage"] + [f"{n} proc." for n in counts], stage_rows),
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = unused_path(args.results_dir / f"processes_cpu_{env['git_rev']}.md")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
