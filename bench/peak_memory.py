"""Peak memory of inference, the dense model against the routed one: ``python -m bench models --memory``.

Each model runs in a fresh process (the routed model's compiled layouts and kernel buffers live outside torch's
allocator, so only the whole process's resident set shows them). The process builds the case (same seeds as the
timing runs), keeps the one model it measures, returns what the set-up freed to the system, resets its peak
resident set (Linux /proc/self/clear_refs), records the resident set, runs ``calls`` inference calls and records the
peak. Reported per model: the resident set with the model and inputs
loaded, the peak during inference, and their difference (the working memory of inference: activations, the routed
model's layouts and buffers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

# The child imports the benchmark as ``bench.bench_models``, so it needs the checkout's root on its path.
REPO_ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import ctypes, gc, json, sys
sys.path.insert(0, {root!r})
import torch
from bench import bench_models as bm
import rtl, rtl_kernels as rk
torch.set_num_threads({threads})
case = {{c.name: c for c in bm.select_cases("cpu", None, {quick})}}[{case!r}]
setup = bm.make_setup(case, torch.device("cpu"))
if {which!r} == "dense":
    model = setup.dense.eval()
    del setup.routed
    run = lambda: model(setup.x)
else:
    model = setup.routed.eval()
    del setup.dense
    wrapper = rtl.RoutedModel(model)
    run = lambda: wrapper(setup.x, setup.route)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the set-up freed goes back to the system
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
loaded = status_mb("VmRSS")
with torch.no_grad():
    for _ in range({calls}):
        run()
print(json.dumps({{"loaded_mb": loaded, "peak_mb": status_mb("VmHWM")}}))
"""


def measure(case_name: str, which: str, quick: bool, threads: int, calls: int = 3) -> Dict[str, float]:
    """The resident set (MB) with the model loaded and its peak over ``calls`` inference calls, in a fresh process.

    Args:
        case_name: a bench_models case name.
        which: "dense" (the plain model) or "ours" (the routed model on the automatic backend).
        quick: the case's quick shapes.
        threads: torch threads in the child.
        calls: inference calls.

    Returns:
        {"loaded_mb", "peak_mb"}.
    """
    code = _CHILD.format(root=str(REPO_ROOT), threads=threads, quick=quick, case=case_name, which=which, calls=calls)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {case_name}/{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_markdown(rows) -> str:
    """rows: (case, {"dense": {...}, "ours": {...}}). One table: loaded, peak, working memory, ratios."""
    lines = [
        "| case | dense loaded MB | dense peak MB | ours loaded MB | ours peak MB | peak ours / dense | "
        "working MB dense / ours | working ours / dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, m in rows:
        d, o = m["dense"], m["ours"]
        dw, ow = d["peak_mb"] - d["loaded_mb"], o["peak_mb"] - o["loaded_mb"]
        lines.append(
            f"| {case} | {d['loaded_mb']:.0f} | {d['peak_mb']:.0f} | {o['loaded_mb']:.0f} | "
            f"{o['peak_mb']:.0f} | {o['peak_mb'] / d['peak_mb']:.2f}x | {dw:.0f} / {ow:.0f} | "
            f"{ow / dw:.2f}x |"
            if dw > 0
            else f"| {case} | ... |"
        )
    return "\n".join(lines) + "\n"
