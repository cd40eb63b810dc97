"""Side-by-side speed of ``rtl_kernels.routed_masked_linear`` against the baselines of docs/benchmarks.md.

Usage::

    python bench/bench_linear.py [--device cpu|cuda] [--quick] [--cases NAME,...] [--repeats N]
                                 [--results-dir bench/results]

Every provider of a case runs in this one process on the very same tensors (x, W, masks, route, bias and the
backward's grad), so their ratios are not blurred by machine-to-machine or run-to-run drift:

- B0  ``F.linear(x, W, b)``: dense, the speed-of-light reference (it computes the wrong function);
- B0m ``F.linear(x, W * M_0, b)``: one mask multiplied in, what single-mask pruning tools pay;
- B1  the ``reference`` backend: per present ticket, index rows, ``F.linear`` with ``W * M_t``, write back;
- B3  rows in ticket order + ``torch._grouped_mm`` over the stacked ``W * M_t`` (recorded as unavailable where the
  installed torch lacks it for the device and dtype);
- B5  per present ticket ``torch.sparse.mm`` with ``(W * M_t).to_sparse_csr()`` built outside the timed region,
  then a scatter; forward only (a CSR weight has no cheap gradient path in torch);
- ours: every rtl backend meant for the device (``cpu`` on CPU; ``triton`` and ``cuda`` on GPU), recorded as
  unavailable when it cannot run here rather than silently left out.

Routing prep is timed apart (provider ``route_prep``: ``group_by_ticket``): every routed provider (B1, B3, B5, ours)
is handed the same precomputed grouping, as a model whose layers share one route does. Add the route_prep row to a
routed provider's time for the cost of a lone layer.

Modes: ``fwd`` and ``fwd+bwd`` (gradients of x, W and b for one fixed random grad_y, via ``torch.autograd.grad`` so
no ``.grad`` accumulation is timed). The error column is the forward's max |difference| from a float64 computation
of the same function, done once per case: the routed function for routed providers, the dense one for B0 and the
one-mask one for B0m (B0 and B0m compute other functions; their column shows only their rounding).

Results are appended to ``<results-dir>/linear_<cpu|cuda>.csv`` and the run's tables are written to
``<results-dir>/linear_<cpu|cuda>_<git rev>.md`` and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Run as a script (python bench/bench_linear.py), so the sibling module is found through the script's folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import rtl_kernels as rk  # noqa: E402
from rtl_kernels.formats.block_csr import compile_block_csr  # noqa: E402

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "fwd+bwd")
# The rtl backends that count as "ours" on each device type. The triton backend also reports itself available on
# CPU under TRITON_INTERPRET (set by the test suite), but the interpreter exists for tests and timing it is
# meaningless, so the list is fixed per device rather than taken from available_backends.
OURS_BY_DEVICE = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}

FIELDS = [
    "run_id", "timestamp", "device_kind", "device", "torch", "triton", "python", "cuda", "fp32_matmul_precision",
    "threads", "git_rev", "quick", "case", "dtype", "B", "N", "K", "T", "sparsity", "sparsity_measured",
    "mask_structure", "block_occupancy_64", "provider", "mode", "status", "median_ms", "p10_ms", "p90_ms",
    "repeats", "ratio_vs_B0", "ratio_vs_B1", "max_abs_err", "err_reference", "target", "target_met", "error",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the targets
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
    return Target(mode, against, times, f"{mode} >= {times:g}x faster than {against}")


def at_most(mode: str, against: str, times: float) -> Target:
    return Target(mode, against, 1.0 / times, f"{mode} <= {times:g}x {against} time")


def strictly_faster(mode: str, against: str) -> Target:
    return Target(mode, against, 1.0, f"{mode} faster than {against}", strict=True)


# --------------------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One benchmark shape. ``base`` names the shape without its dtype (--cases accepts either name)."""

    name: str
    base: str
    rows: int
    n: int
    k: int
    tickets: int
    sparsity: float
    block: Optional[Tuple[int, int]]  # None: unstructured masks; else (block_n, block_k)
    dtype: torch.dtype
    repeats: int
    targets: Tuple[Target, ...] = field(default=())

    @property
    def structure(self) -> str:
        return "unstructured" if self.block is None else f"block{self.block[0]}x{self.block[1]}"


def cpu_cases() -> List[Case]:
    """The CPU targets (fp32, docs/benchmarks.md). Repeats are set so the whole run stays well under 10 minutes on 2
    cores: the 2,048-row 1024x1024 cases cost tens to hundreds of ms a call per provider, the others a few ms."""
    f32 = torch.float32
    big = dict(rows=2048, n=1024, k=1024, tickets=8, block=None, dtype=f32, repeats=15)
    inr = dict(rows=65536, n=128, k=128, tickets=10, block=None, dtype=f32, repeats=20)
    return [
        Case("b_1024_u90", "b_1024_u90", sparsity=0.90, targets=(faster("fwd", "B0", 3), faster("fwd", "B5", 2)),
             **big),
        Case("b_1024_u95", "b_1024_u95", sparsity=0.95, targets=(faster("fwd", "B0", 5),), **big),
        Case("b_1024_u50", "b_1024_u50", sparsity=0.50, targets=(at_most("fwd", "B0", 1.1),), **big),
        Case("small_groups_u90", "small_groups_u90", rows=256, n=1024, k=1024, tickets=8, sparsity=0.90,
             block=None, dtype=f32, repeats=40, targets=(faster("fwd", "B0", 1.5),)),
        Case("inr_u50", "inr_u50", sparsity=0.50,
             targets=(at_most("fwd", "B0", 1.2), faster("fwd+bwd", "B1", 1.5)), **inr),
        Case("inr_u75", "inr_u75", sparsity=0.75, targets=(strictly_faster("fwd", "B0"),), **inr),
    ]  # fmt: skip


def gpu_cases() -> List[Case]:
    """The GPU targets (docs/benchmarks.md), each shape in bf16 and fp32.

    The GPU targets do not say forward only, so they are checked in both modes (the CPU ones say forward).
    """
    cases = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        big = dict(rows=4096, n=4096, k=4096, tickets=8, dtype=dtype, repeats=30)
        inr = dict(rows=65536, n=128, k=128, tickets=10, block=None, dtype=dtype, repeats=50)

        def regime_a(mode):
            return (at_most(mode, "B0", 1.2), faster(mode, "B1", 3), faster(mode, "B3", 3))

        cases += [
            Case(f"b_4096_blk64_90_{tag}", "b_4096_blk64_90", sparsity=0.90, block=(64, 64),
                 targets=tuple(faster(m, "B0", 5) for m in MODES), **big),
            Case(f"b_4096_u90_{tag}", "b_4096_u90", sparsity=0.90, block=None,
                 targets=tuple(Target(m, "B0", 1.0, f"{m} no slower than B0") for m in MODES), **big),
            Case(f"inr_u50_{tag}", "inr_u50", sparsity=0.50, targets=regime_a("fwd") + regime_a("fwd+bwd"), **inr),
            Case(f"inr_u75_{tag}", "inr_u75", sparsity=0.75, targets=regime_a("fwd") + regime_a("fwd+bwd"), **inr),
        ]  # fmt: skip
    return cases


def quick_case(case: Case) -> Case:
    """The same case (T, sparsity, structure, dtype) on a tiny shape, for smoke runs that take seconds.

    Blocks shrink to 16x16 so a 64x48 weight still holds several of them (a 64x64 block would be the whole weight).
    N and K stay multiples of 16 so torch._grouped_mm's 16-byte stride rule holds as it does on the real shapes.
    """
    return replace(case, rows=96, n=64, k=48, block=None if case.block is None else (16, 16), repeats=3)


def select_cases(device_type: str, names: Optional[str], quick: bool) -> List[Case]:
    cases = cpu_cases() if device_type == "cpu" else gpu_cases()
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {c.name for c in cases} | {c.base for c in cases}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            choices = ", ".join(c.name for c in cases)
            raise SystemExit(f"unknown case(s) {', '.join(unknown)} for {device_type}; choose from {choices}")
        cases = [c for c in cases if c.name in wanted or c.base in wanted]
    return [quick_case(c) for c in cases] if quick else cases


# ------------------------------------------------------------------------------------------------------- the inputs
@dataclass
class Inputs:
    """One case's tensors; every provider reads these same objects."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    masks: torch.Tensor
    route: torch.Tensor
    grad_y: torch.Tensor
    grouping: rk.TicketGrouping
    sparsity_measured: float
    block_occupancy: Optional[float]


def make_inputs(case: Case, device: torch.device) -> Inputs:
    """Seeded from the shape's base name: the bf16 and fp32 variants of a shape (and CPU/GPU runs) share data."""
    seed = zlib.crc32(case.base.encode())
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    B, N, K, T = case.rows, case.n, case.k, case.tickets

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=case.dtype)

    x = rand(B, K)
    weight = rand(N, K, scale=K**-0.5)  # fan-in scaling keeps outputs O(1), so absolute errors are comparable
    bias = rand(N, scale=0.1)
    grad_y = rand(B, N)
    # Balanced route (B/T rows a ticket, as the "32 rows a ticket" target assumes), rows shuffled.
    route = (torch.arange(B) % T)[torch.randperm(B, generator=g)].to(device)
    if case.block is None:
        masks = common.unstructured_masks(T, N, K, case.sparsity, seed=seed + 1, device=device)
    else:
        masks = common.block_masks(T, N, K, case.sparsity, *case.block, seed=seed + 1, device=device)
    try:
        occupancy = float(compile_block_csr(masks, 64, 64).occupancy)
    except Exception as exc:  # a reporting column must not stop the benchmark
        print(f"  block occupancy unavailable: {common.error_text(exc)}", flush=True)
        occupancy = None
    return Inputs(
        x=x,
        weight=weight,
        bias=bias,
        masks=masks,
        route=route,
        grad_y=grad_y,
        grouping=rk.group_by_ticket(route, T),
        sparsity_measured=common.mask_sparsity(masks),
        block_occupancy=occupancy,
    )


def float64_references(inp: Inputs) -> Dict[str, torch.Tensor]:
    """The forward of each function the providers compute, in float64 from the same (possibly bf16) values.

    The routed reference loops over route itself rather than the grouping, so a wrong group_by_ticket would show.
    """
    x, w, b = inp.x.double(), inp.weight.double(), inp.bias.double()
    routed = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    for t in range(inp.masks.shape[0]):
        rows = (inp.route == t).nonzero().flatten()
        if rows.numel():
            routed[rows] = x[rows] @ (w * inp.masks[t]).t() + b
    return {
        "routed": routed,
        "dense": x @ w.t() + b,
        "mask0": x @ (w * inp.masks[0]).t() + b,
    }


# ---------------------------------------------------------------------------------------------------- the providers
@dataclass
class Provider:
    """A way to compute the layer. ``forward(x, W, b)`` closes over the masks, route and grouping."""

    name: str
    kind: str  # 'baseline', 'ours' or 'prep'
    forward: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    err_reference: Optional[str]  # key of float64_references, None when there is no output to check
    backward: bool = True  # whether a fwd+bwd row is measured
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    unavailable: Optional[str] = None


def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why B3 cannot run here (None if it can): probes torch._grouped_mm forward and backward on a tiny problem."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        x = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([4, 8], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        torch.autograd.grad(y, (x, w), torch.randn_like(y))
    except Exception as exc:
        return f"torch._grouped_mm does not run on {device.type}/{str(dtype).replace('torch.', '')}: " + (
            common.error_text(exc, 200)
        )
    return None


def make_providers(inp: Inputs, device: torch.device, dtype: torch.dtype) -> List[Provider]:
    masks, route, grp = inp.masks, inp.route, inp.grouping
    T = masks.shape[0]
    m0 = masks[0]
    perm, offsets = grp.perm, grp.offsets
    # _grouped_mm wants int32 end offsets; converting them is routing prep, done once here, not per call.
    offs32 = offsets[1:].to(torch.int32)
    bounds = offsets.tolist()

    def b0(x, w, b):
        return F.linear(x, w, b)

    def b0m(x, w, b):
        return F.linear(x, w * m0, b)

    def routed(x, w, b):
        return rk.routed_masked_linear(x, w, masks, route, b, grouping=grp)

    def b3(x, w, b):
        xs = x.index_select(0, perm)
        ys = torch._grouped_mm(xs, (w * masks).transpose(1, 2), offs=offs32)
        # perm is a permutation, so index_copy writes every row of the empty tensor; it is differentiable in ys.
        return ys.new_empty((x.shape[0], w.shape[0])).index_copy(0, perm, ys) + b

    providers = [
        Provider("B0", "baseline", b0, "dense"),
        Provider("B0m", "baseline", b0m, "mask0"),
        Provider("B1", "baseline", routed, "routed", context=lambda: rk.set_backend("reference")),
        Provider("B3", "baseline", b3, "routed", unavailable=grouped_mm_unavailable(device, dtype)),
    ]

    # B5: the CSR weights are built once, outside the timed region (a deployed sparse model would store them).
    csr: Dict[int, torch.Tensor] = {}
    csr_error = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            for t in range(T):
                if bounds[t + 1] > bounds[t]:
                    csr[t] = (inp.weight * masks[t]).to_sparse_csr()
    except Exception as exc:
        csr_error = "building the CSR weights failed: " + common.error_text(exc, 200)

    def b5(x, w, b):
        y = x.new_empty((x.shape[0], w.shape[0]))
        for t, w_csr in csr.items():
            rows = perm[bounds[t] : bounds[t + 1]]
            y[rows] = torch.sparse.mm(w_csr, x[rows].t()).t() + b
        return y

    providers.append(Provider("B5", "baseline", b5, "routed", backward=False, unavailable=csr_error))

    reasons = rk.unavailable_reasons(device, dtype)
    for name in OURS_BY_DEVICE[device.type]:
        providers.append(
            Provider(
                f"ours:{name}",
                "ours",
                routed,
                "routed",
                context=(lambda n=name: rk.set_backend(n)),
                unavailable=reasons.get(name, f"no backend named {name!r}"),
            )
        )
    providers.append(Provider("route_prep", "prep", None, None, backward=False))
    return providers


# ---------------------------------------------------------------------------------------------------- measuring
def measure_case(
    case: Case,
    device: torch.device,
    env: Dict[str, str],
    run_id: str,
    args: argparse.Namespace,
    label: str,
) -> List[Dict[str, object]]:
    """All rows of one case: every provider in every mode it supports, plus route_prep."""
    print(
        f"{label} {case.name}: B={case.rows}, W {case.n}x{case.k}, T={case.tickets}, "
        f"{case.structure} {case.sparsity:.0%}, {str(case.dtype).replace('torch.', '')}",
        flush=True,
    )
    gc.collect()  # once per case: the previous case's tensors and graphs go before anything is timed
    inp = make_inputs(case, device)
    refs = float64_references(inp)
    providers = make_providers(inp, device, case.dtype)
    repeats = args.repeats if args.repeats else case.repeats
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if device.type == "cuda" else 2))
    max_seconds = args.max_seconds if args.max_seconds is not None else (1.0 if args.quick else 5.0)

    # Leaves that want gradients, sharing storage with the plain inputs, for the fwd+bwd mode; the fwd mode uses
    # the plain ones so no autograd graph is recorded (as under inference).
    xg = inp.x.detach().requires_grad_(True)
    wg = inp.weight.detach().requires_grad_(True)
    bg = inp.bias.detach().requires_grad_(True)

    base = {
        **{k: env.get(k, "") for k in FIELDS if k in env},
        "run_id": run_id,
        "quick": int(bool(args.quick)),
        "case": case.name,
        "dtype": str(case.dtype).replace("torch.", ""),
        "B": case.rows,
        "N": case.n,
        "K": case.k,
        "T": case.tickets,
        "sparsity": case.sparsity,
        "sparsity_measured": inp.sparsity_measured,
        "mask_structure": case.structure,
        "block_occupancy_64": inp.block_occupancy,
    }

    def timed(fn) -> Dict[str, object]:
        t = common.time_fn(fn, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds)
        return dict(status="ok", median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, repeats=t.repeats)

    def forward_error(p: Provider) -> float:
        with p.context():
            y = p.forward(inp.x, inp.weight, inp.bias)
        return (y.double() - refs[p.err_reference]).abs().max().item()

    def fwd_step(p: Provider) -> None:
        with p.context():
            p.forward(inp.x, inp.weight, inp.bias)

    def fwd_bwd_step(p: Provider) -> None:
        with p.context():
            y = p.forward(xg, wg, bg)
            torch.autograd.grad(y, (xg, wg, bg), inp.grad_y)

    rows = common.measure_providers(
        providers, base, MODES, timed,
        route_prep=lambda: rk.group_by_ticket(route=inp.route, num_tickets=case.tickets),
        forward_error=forward_error, fwd_step=fwd_step, fwd_bwd_step=fwd_bwd_step,
    )  # fmt: skip
    _add_ratios_and_targets(rows, case, quick=args.quick)
    inp = refs = providers = xg = wg = bg = None  # free this case's tensors now (the closures above hold them)
    rk.clear_layout_cache()  # the next case's masks are new tensors; drop this case's compiled layouts now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fmt_err(err) -> str:
    return "" if err is None else f"{err:.2e}"


def _add_ratios_and_targets(rows: List[Dict[str, object]], case: Case, quick: bool) -> None:
    """ratio_vs_B0/B1 (baseline median / this median, per mode) and, on ours rows, the targets and whether met."""
    medians = {(r["provider"], r["mode"]): r["median_ms"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for against in ("B0", "B1"):
            other = medians.get((against, r["mode"]))
            r[f"ratio_vs_{against}"] = other / r["median_ms"] if other and r["median_ms"] > 0 else None
    for r in rows:
        if not r["provider"].startswith("ours:"):
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


# ------------------------------------------------------------------------------------------------------ reporting
def case_markdown(case_rows: List[Dict[str, object]]) -> str:
    """One table for one case: providers as rows, fwd and fwd+bwd columns with ms and ratios."""
    first = case_rows[0]
    occ = first.get("block_occupancy_64")
    title = (
        f"### {first['case']}: B={first['B']}, W {first['N']}x{first['K']} (N x K), T={first['T']}, "
        f"{first['mask_structure']} {float(first['sparsity']):.0%} (measured {float(first['sparsity_measured']):.1%}), "
        f"64x64 block occupancy {'n/a' if occ is None else f'{float(occ):.1%}'}, {first['dtype']}"
    )
    by = {(r["provider"], r["mode"]): r for r in case_rows}
    providers = list(dict.fromkeys(r["provider"] for r in case_rows))
    table, notes = [], []
    for name in providers:
        f, fb = by.get((name, "fwd")), by.get((name, "fwd+bwd"))
        any_row = f or fb
        target = "; ".join(
            f"{r['target']} → {r.get('target_met', '')}" for r in (f, fb) if r is not None and r.get("target")
        )
        err = _fmt_err(any_row.get("max_abs_err"))
        if err and any_row.get("err_reference"):
            err += f" vs {any_row['err_reference']}"
        table.append([name, *common.mode_cells(f), *common.mode_cells(fb), err, target])
        notes += common.error_notes(name, (f, fb))
    headers = ["provider", "fwd ms (p10–p90)", "fwd vs B0", "fwd vs B1", "fwd+bwd ms (p10–p90)",
               "fwd+bwd vs B0", "fwd+bwd vs B1", "max abs err", "target"]  # fmt: skip
    return common.case_table(title, headers, table, "lrrrrrrrl", notes)


def run_markdown(env: Dict[str, str], argv: Sequence[str], all_rows: List[Dict[str, object]], quick: bool) -> str:
    lines = [
        f"# routed_masked_linear benchmark, {env['device_kind']}",
        "",
        f"- device: {env['device']}; threads: {env['threads']}",
        f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env['cuda']}, fp32 matmul precision {env['fp32_matmul_precision']}"
           if env["device_kind"] == "cuda" else ""),
        f"- git {env['git_rev']}, {env['timestamp']}",
        f"- command: `python bench/bench_linear.py {' '.join(argv)}`".rstrip(),
        "- ms: median (p10–p90) of repeated calls after warm-up. \"vs B0\" / \"vs B1\": that baseline's median over "
        "this one, same mode (> 1: faster than it). Routed providers get a precomputed grouping; its cost is the "
        "route_prep row. max abs err: forward vs a float64 computation of the function the provider computes.",
    ]  # fmt: skip
    if quick:
        lines.append("- **quick run: tiny smoke shapes; times say nothing about the real cases, targets not judged.**")
    for case in dict.fromkeys(r["case"] for r in all_rows):
        lines += ["", case_markdown([r for r in all_rows if r["case"] == case])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    common.add_run_arguments(
        ap,
        cases_help="comma-separated case names (GPU: with or without _bf16/_fp32)",
        warmup_help="untimed calls first (default 2 CPU, 3 GPU, 1 quick)",
        default_results_dir=DEFAULT_RESULTS_DIR,
    )
    return common.parse_run_arguments(ap, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.run_device(args)
    cases = select_cases(device.type, args.cases, args.quick)

    return common.run_cases("linear", FIELDS, cases, measure_case, run_markdown, args, argv, device, "")


if __name__ == "__main__":
    sys.exit(main())
