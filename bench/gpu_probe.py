"""First contact with a GPU: is ``rtl_kernels.routed_masked_linear`` right there, and how fast is it against dense?

Usage::

    python -m bench.gpu_probe [--out DIR] [--backend triton|cuda] [--cases NAME,...] [--dtypes bf16,fp32]
                              [--budget SECONDS] [--dry-run]

For each case and dtype, on the very same tensors (bench_linear's inputs: x, W, bias, masks, a balanced shuffled
route and its precomputed grouping):

- the forward of ours and of dense is checked against float64 on a sample of rows first (bench/harness.py's
  tolerance per dtype); a wrong result is not timed, and its rows say why;
- timed with ``triton.testing.do_bench`` (median and p10-p90 in ms): ``dense`` ``F.linear(x, W, b)`` on the unmasked
  weight; ``ours`` the routed op in eager mode; ``ours:graph`` the same forward captured in a ``torch.cuda.CUDAGraph``
  (warmed up on a side stream, its output checked again after a replay), timed as ``graph.replay()``; then, while the
  time budget lasts, forward+backward of dense and ours (gradients of x, W and b for a fixed grad_y);
- useful TFLOP/s: 2·B·N·K·density (x3 with the backward) over the time, the same numerator for dense and ours, so
  the column reads as the ratio to dense does; density is the kept fraction of the masks.

Results go to ``DIR/gpu_probe.json`` and ``DIR/gpu_probe.md`` (device, versions, one table per backend); a run with
another backend is added beside the ones already there, a run with the same backend replaces its own. Both files
are rewritten after every case, so a run cut short by a timeout still leaves what it measured.

``--dry-run`` needs no GPU: it prints the cases, shapes, FLOPs and the calls it would time, then builds every case
at bench_linear's quick size on CPU in fp32 and checks the op against float64 there.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import rtl_kernels as rk

from . import harness
from .bench_linear import Case as LinearCase
from .bench_linear import make_inputs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("triton", "cuda")
CHECK_ROWS = 512  # rows of the float64 check: enough to meet every ticket, cheap in float64 on 4096x4096
WARMUP_MS, REP_MS = 25, 200  # do_bench's warm-up and measuring time per row
JSON_NAME, MD_NAME = "gpu_probe.json", "gpu_probe.md"
COLUMNS = ["case", "dtype", "provider", "mode", "status", "median_ms", "p10_ms", "p90_ms", "useful_tflops",
           "vs_dense", "max_abs_err", "note"]  # fmt: skip


@dataclass(frozen=True)
class ProbeCase:
    """A linear shape: x (rows, k), W (n, k), masks (tickets, n, k); ``block`` None for unstructured masks."""

    name: str
    rows: int
    n: int
    k: int
    tickets: int
    sparsity: float
    block: Optional[Tuple[int, int]]
    about: str

    def linear_case(self, dtype: torch.dtype, quick: bool = False) -> LinearCase:
        """bench_linear's case for this shape and dtype; both dtypes share the base name, hence the data."""
        tag = next(t for t, d in DTYPES.items() if d == dtype)
        shape = dict(rows=self.rows, n=self.n, k=self.k, block=self.block)
        case = LinearCase(
            name=f"{self.name}_{tag}", base=self.name, dtype=dtype, tickets=self.tickets, sparsity=self.sparsity,
            repeats=1, **shape
        )  # fmt: skip
        return case.quick() if quick else case


def inr_hidden() -> int:
    """The hidden width of rtl.models.FourierINR (its default), the shape of the INR's routed layers."""
    from rtl.models import FourierINR

    return int(inspect.signature(FourierINR.__init__).parameters["hidden"].default)


def probe_cases() -> List[ProbeCase]:
    """Regime B's block-sparse target and the INR layer of regime A (docs/benchmarks.md)."""
    width = inr_hidden()
    return [
        ProbeCase("b4096_blk64_90", 8192, 4096, 4096, 8, 0.90, (64, 64), "4096x4096 layer, 64x64-block masks"),
        ProbeCase(f"inr{width}_u90", 65536, width, width, 6, 0.90, None, "the INR's hidden layer, unstructured"),
    ]


def select(cases: Sequence[ProbeCase], names: Optional[str]) -> List[ProbeCase]:
    """The cases named in a comma-separated list (all when None); raises on an unknown name."""
    if not names:
        return list(cases)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c.name: c for c in cases}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in wanted]


def fwd_flop(case: LinearCase, density: float) -> float:
    """Useful forward FLOPs: 2·B·N·K·density (the backward adds twice that: dx and the kept entries of dW)."""
    return 2.0 * case.rows * case.n * case.k * density


# ------------------------------------------------------------------------------------------------------ one item
@dataclass
class Item:
    """One (case, dtype) on the device: its inputs, float64 references on the checked rows, and the calls timed.

    ``calls`` maps (provider, mode) to a no-argument call; ``refused`` holds why ours is not timed (None: checked);
    ``refs`` the float64 forwards, (S, N) on the checked rows.
    """

    case: LinearCase
    inp: harness.OpInputs
    density: float
    calls: Dict[Tuple[str, str], Callable[[], object]]
    errors: Dict[str, float]
    refused: Optional[str]
    refs: Dict[str, torch.Tensor]
    graph: Optional[object] = None


def _forwards(inp: harness.OpInputs):
    def dense(x, w, b):
        return F.linear(x, w, b)

    def ours(x, w, b):
        return rk.routed_masked_linear(x, w, inp.masks, inp.route, b, grouping=inp.grouping)

    return dense, ours


def _fwd_bwd(forward, inp: harness.OpInputs) -> Callable[[], object]:
    """forward then torch.autograd.grad of x, W and b for the fixed grad_y (nothing accumulates in .grad)."""
    leaves = [t.detach().requires_grad_(True) for t in (inp.x, inp.weight, inp.bias) if t is not None]
    b = leaves[2] if inp.bias is not None else None
    return lambda: torch.autograd.grad(forward(leaves[0], leaves[1], b), leaves, inp.grad_y)


def _check(name: str, output: Callable[[], torch.Tensor], reference: str, refs, dtype) -> Tuple[float, Optional[str]]:
    provider = harness.Provider(name, "baseline" if name == "dense" else "ours", {}, output=output, reference=reference)
    return harness.check_provider(provider, refs, harness.TOLERANCE[dtype])


def prepare(pc: ProbeCase, dtype: torch.dtype, device: torch.device, backend: str, quick: bool = False) -> Item:
    """Build a case's inputs on ``device``, check dense and ours against float64 on CHECK_ROWS sampled rows."""
    case = pc.linear_case(dtype, quick)
    inp = make_inputs(case, device)
    g = torch.Generator().manual_seed(case.seed + 2)
    inp.check = torch.randperm(case.rows, generator=g)[:CHECK_ROWS].sort().values.to(device)
    refs = harness.op_references(inp, F.linear)
    dense, ours = _forwards(inp)
    errors: Dict[str, float] = {}
    errors["dense"], refused = _check("dense", lambda: inp.checked(dense(inp.x, inp.weight, inp.bias)), "dense",
                                      refs, dtype)  # fmt: skip
    if refused is not None:
        raise RuntimeError(f"{case.name}: dense {refused}")  # torch itself wrong: nothing here can be trusted
    refused = rk.unavailable_reasons(device, dtype).get(backend, f"no backend named {backend!r}")
    if refused is not None:
        refused = f"backend {backend} unavailable: {refused}"
    else:
        with rk.set_backend(backend):
            try:
                errors["ours"], refused = _check("ours", lambda: inp.checked(ours(inp.x, inp.weight, inp.bias)),
                                                 "routed", refs, dtype)  # fmt: skip
            except Exception as exc:
                traceback.print_exc()  # the log keeps the whole story of a first failure on new hardware
                refused = f"forward raised {harness.error_text(exc)}"
    calls = {
        ("dense", "fwd"): lambda: dense(inp.x, inp.weight, inp.bias),
        ("ours", "fwd"): lambda: ours(inp.x, inp.weight, inp.bias),
        ("dense", "fwd+bwd"): _fwd_bwd(dense, inp),
        ("ours", "fwd+bwd"): _fwd_bwd(ours, inp),
    }
    return Item(case, inp, 1.0 - inp.sparsity_measured, calls, errors, refused, refs)


def capture_graph(forward: Callable[[], torch.Tensor]) -> Tuple[object, torch.Tensor]:
    """The forward captured in a CUDA graph, after warm-up calls on a side stream (they compile the kernels and fill
    the layout cache, so nothing synchronises during capture). Returns (graph, its static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


def time_ms(fn: Callable[[], object]) -> Tuple[float, float, float]:
    """(median, p10, p90) ms of ``fn`` by triton.testing.do_bench (imported here: the dry run needs no Triton)."""
    from triton.testing import do_bench

    median, p10, p90 = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=[0.5, 0.1, 0.9])
    return float(median), float(p10), float(p90)


def _row(item: Item, provider: str, mode: str, status: str, note: str = "", **values) -> Dict[str, object]:
    row = dict(case=item.case.base, dtype=item.case.dtype_name, provider=provider, mode=mode, status=status,
               median_ms=None, p10_ms=None, p90_ms=None, useful_tflops=None, vs_dense=None,
               max_abs_err=item.errors.get(provider), note=note)  # fmt: skip
    row.update(values)
    return row


def measure(item: Item, provider: str, mode: str, backend: str, dense_ms: Optional[float]) -> Dict[str, object]:
    """Time one (provider, mode) of an item; the row says ms, useful TFLOP/s and dense's time over this one."""
    if provider != "dense" and item.refused is not None:
        return _row(item, provider, mode, "not timed", item.refused)
    try:
        with rk.set_backend(backend):
            if provider == "ours:graph":
                if item.graph is None:
                    item.graph, out = capture_graph(item.calls[("ours", "fwd")])
                    item.graph.replay()
                    err, refused = _check("ours:graph", lambda: item.inp.checked(out), "routed", item.refs,
                                          item.case.dtype)  # fmt: skip
                    item.errors["ours:graph"] = err
                    if refused is not None:
                        item.graph = None
                        return _row(item, provider, mode, "not timed", "graph replay: " + refused)
                median, p10, p90 = time_ms(item.graph.replay)
            else:
                median, p10, p90 = time_ms(item.calls[(provider.split(":")[0], mode)])
    except Exception as exc:
        traceback.print_exc()
        return _row(item, provider, mode, "error", harness.error_text(exc))
    flop = fwd_flop(item.case, item.density) * (3 if mode == "fwd+bwd" else 1)
    tflops = flop / (median * 1e-3) / 1e12
    vs_dense = None if dense_ms is None else dense_ms / median
    return _row(item, provider, mode, "ok", median_ms=median, p10_ms=p10, p90_ms=p90, useful_tflops=tflops,
                vs_dense=vs_dense)  # fmt: skip


# -------------------------------------------------------------------------------------------------------- output
def _cell(value: object, kind: str) -> str:
    if value is None:
        return ""
    if kind == "ms":
        return harness.format_ms(value)
    if kind == "ratio":
        return harness.format_ratio(value)
    if kind == "err":
        return harness.format_err(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_markdown(runs: Sequence[Dict[str, object]]) -> str:
    """gpu_probe.md: per run (backend), its environment and one table row per (case, dtype, provider, mode)."""
    lines = ["# GPU probe: routed_masked_linear against dense", ""]
    lines.append(
        "ms: median (p10–p90) of triton.testing.do_bench. useful TFLOP/s: 2·B·N·K·density (x3 for fwd+bwd) over the "
        "median, the same count for dense, so it reads like the ratio. vs dense: dense's median in the same mode "
        "(eager fwd for the graph) over this one (> 1: faster). max abs err: forward vs float64 on sampled rows."
    )
    for run in runs:
        env = run["environment"]
        lines += ["", f"## backend {run['backend']}: {env.get('device', '')}", ""]
        lines.append(
            f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, python "
            f"{env.get('python')}, fp32 matmul precision {env.get('fp32_matmul_precision')}, git {env.get('git_rev')}, "
            f"{env.get('timestamp')}" + ("" if run.get("finished") else " (cut short: the rows measured so far)")
        )
        for case in run["cases"]:
            lines.append(f"- {case['case']}: {case['shapes']}, density {case['density']:.3f}")
        lines.append("")
        table_rows = []
        for r in run["rows"]:
            ms = _cell(r["median_ms"], "ms")
            if r["median_ms"] is not None:
                ms += f" ({_cell(r['p10_ms'], 'ms')}–{_cell(r['p90_ms'], 'ms')})"
            table_rows.append([r["case"], r["dtype"], r["provider"], r["mode"], ms, _cell(r["useful_tflops"], ""),
                               _cell(r["vs_dense"], "ratio"), _cell(r["max_abs_err"], "err"),
                               r["status"] + (f": {r['note']}" if r["note"] else "")])  # fmt: skip
        lines.append(
            harness.markdown_table(
                ["case", "dtype", "provider", "mode", "ms", "useful TFLOP/s", "vs dense", "max abs err", "status"],
                table_rows,
                align="llllrrrrl",
            )
        )
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, run: Dict[str, object]) -> None:
    """Put ``run`` into out/gpu_probe.json beside the other backends' runs, and rewrite gpu_probe.md from them."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    runs: List[Dict[str, object]] = []
    if path.exists():
        try:
            runs = [r for r in json.loads(path.read_text())["runs"] if r.get("backend") != run["backend"]]
        except (ValueError, KeyError, TypeError):
            runs = []  # an unreadable file from a killed run: this run's results matter more
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (out / MD_NAME).write_text(run_markdown(runs))


# ----------------------------------------------------------------------------------------------------------- runs
def _shapes(case: LinearCase) -> str:
    structure = "unstructured" if case.block is None else f"{case.block[0]}x{case.block[1]}-block"
    return (
        f"x ({case.rows}, {case.k}), W ({case.n}, {case.k}), masks ({case.tickets}, {case.n}, {case.k}) "
        f"{structure} at {case.sparsity:.0%}, route ({case.rows},)"
    )


def dry_run(cases: Sequence[ProbeCase], dtypes: Sequence[str], backend: str) -> int:
    """Print what a GPU run would do, then check every case at its quick size on CPU in fp32; 1 if a check fails."""
    print(f"gpu_probe dry run: backend {backend} on cuda, dtypes {', '.join(dtypes)}")
    for pc in cases:
        case = pc.linear_case(torch.float32)
        dense_flop = 2.0 * case.rows * case.n * case.k
        print(f"\n{pc.name} ({pc.about}): {_shapes(case)}")
        print(f"  FLOPs a forward: dense {dense_flop:.3g}, useful {dense_flop * (1 - pc.sparsity):.3g} (x3 with bwd)")
        print("  timed with triton.testing.do_bench, each dtype:")
        print("    dense      fwd      F.linear(x, W, b)")
        print(f"    ours       fwd      rk.routed_masked_linear(x, W, masks, route, b, grouping=g)  [{backend}]")
        print("    ours:graph fwd      graph.replay() of that forward captured in torch.cuda.CUDAGraph")
        print("    dense/ours fwd+bwd  torch.autograd.grad(forward, (x, W, b), grad_y), while the budget lasts")
    local = next(b for b in ("cpu", "reference") if b in rk.available_backends("cpu", torch.float32))
    print(f"\nfloat64 check at the quick size on CPU, fp32, backend {local}:")
    failed = 0
    for pc in cases:
        item = prepare(pc, torch.float32, torch.device("cpu"), local, quick=True)
        verdict = "ok" if item.refused is None else item.refused
        failed += item.refused is not None
        print(f"  {pc.name}: {_shapes(item.case)}: max abs err {item.errors.get('ours', float('nan')):.2e}, {verdict}")
    return 1 if failed else 0


def gpu_run(
    cases: Sequence[ProbeCase],
    dtypes: Sequence[str],
    backend: str,
    out: Path,
    budget: float,
    device: torch.device = torch.device("cuda"),
    quick: bool = False,
) -> int:
    """Measure every case and dtype; fwd+bwd only while ``budget`` seconds last. Returns 1 if ours was wrong or a
    case could not be set up, else 0.

    ``device`` and ``quick`` (bench_linear's quick sizes) exist for the tests, which run this on CPU.
    """
    deadline = time.monotonic() + budget
    run: Dict[str, object] = dict(backend=backend, environment=harness.environment(device, out), cases=[], rows=[],
                                  finished=False)  # fmt: skip
    print(f"gpu_probe: backend {backend} on {run['environment']['device']}, budget {budget:.0f} s", flush=True)
    items: List[Item] = []
    failed_setup: List[str] = []

    def add(row: Dict[str, object]) -> None:
        run["rows"].append(row)
        print("  " + "  ".join(f"{k}={_cell(row[k], 'err' if k == 'max_abs_err' else '')}" for k in COLUMNS
                               if row[k] not in (None, "")), flush=True)  # fmt: skip

    # Every item's forward first, then the backward passes while time is left: the forward is what the targets ask.
    for pc in cases:
        for tag in dtypes:
            try:
                item = prepare(pc, DTYPES[tag], device, backend, quick)
            except Exception as exc:  # one case that cannot even be set up must not cost the others
                traceback.print_exc()
                failed_setup.append(f"{pc.name}_{tag}")
                add(dict({c: None for c in COLUMNS}, case=pc.name, dtype=str(DTYPES[tag]).replace("torch.", ""),
                         provider="setup", mode="", status="error", note=harness.error_text(exc)))  # fmt: skip
                write_outputs(out, run)
                continue
            items.append(item)
            run["cases"].append(dict(case=f"{pc.name}_{tag}", shapes=_shapes(item.case), density=item.density))
            dense = measure(item, "dense", "fwd", backend, None)
            add(dense)
            for provider in ("ours", "ours:graph"):
                add(measure(item, provider, "fwd", backend, dense["median_ms"]))
            write_outputs(out, run)
    for item in items:
        if time.monotonic() > deadline:
            for provider in ("dense", "ours"):
                add(_row(item, provider, "fwd+bwd", "skipped", "time budget spent"))
            continue
        dense = measure(item, "dense", "fwd+bwd", backend, None)
        add(dense)
        add(measure(item, "ours", "fwd+bwd", backend, dense["median_ms"]))
        write_outputs(out, run)
    run["finished"] = True
    write_outputs(out, run)
    print(f"wrote {out / JSON_NAME} and {out / MD_NAME}")
    return 1 if failed_setup or any(i.refused is not None for i in items) else 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_out"), help="folder of gpu_probe.json/.md (gpu_out)")
    ap.add_argument("--backend", choices=BACKENDS, default="triton", help="the rtl backend timed as ours (triton)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16 and fp32 (default: both)")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds after which fwd+bwd is skipped (100)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the op on CPU; no GPU needed")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.gpu_probe``: 0 when every check passed, 1 when ours was wrong somewhere, 2 for bad usage or
    no CUDA device."""
    args = parse_args(argv)
    try:
        cases = select(probe_cases(), args.cases)
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad or not dtypes:
            raise ValueError(f"unknown dtype(s) {', '.join(bad) or '(none)'}; choose from {', '.join(DTYPES)}")
    except ValueError as exc:
        print(f"gpu_probe: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cases, dtypes, args.backend)
    if not torch.cuda.is_available():
        print(f"gpu_probe: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "--dry-run works without one", file=sys.stderr)  # fmt: skip
        return 2
    return gpu_run(cases, dtypes, args.backend, args.out, args.budget)


if __name__ == "__main__":
    sys.exit(main())
