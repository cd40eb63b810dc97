"""Side-by-side speed of ``rtl_kernels.routed_masked_linear`` against the baselines of docs/benchmarks.md.

Usage::

    python -m bench linear [--device cpu|cuda] [--quick] [--cases NAME,...] [--repeats N]
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

Modes: ``fwd`` and ``fwd+bwd`` (gradients of x, W and b for one fixed random grad_y). Before timing, every
provider's forward is checked against a float64 computation of the same function (bench/harness.py): the routed
function for routed providers, the dense one for B0 and the one-mask one for B0m (B0 and B0m compute other functions;
their error column shows only their rounding).

Results are appended to ``<results-dir>/linear_<cpu|cuda>.csv`` and the run's tables are written to
``<results-dir>/linear_<cpu|cuda>_<git rev>.md`` and printed.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import rtl_kernels as rk

from . import harness
from .harness import OP_MODES as MODES
from .harness import at_most, faster, no_slower, strictly_faster

FIELDS = [
    "run_id", "timestamp", "device_kind", "device", "torch", "triton", "python", "cuda", "fp32_matmul_precision",
    "threads", "git_rev", "quick", "case", "dtype", "B", "N", "K", "T", "sparsity", "sparsity_measured",
    "mask_structure", "block_occupancy_64", "provider", "mode", "status", "median_ms", "p10_ms", "p90_ms",
    "repeats", "ratio_vs_B0", "ratio_vs_B1", "max_abs_err", "err_reference", "target", "target_met", "error",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True, kw_only=True)
class Case(harness.Case):
    """One linear shape: x (rows, k), W (n, k); ``block`` None for unstructured masks, else (block_n, block_k)."""

    rows: int
    n: int
    k: int
    block: Optional[Tuple[int, int]] = None

    @property
    def structure(self) -> str:
        return "unstructured" if self.block is None else f"block{self.block[0]}x{self.block[1]}"

    def quick(self) -> "Case":
        """The same case (T, sparsity, structure, dtype) on a tiny shape, for smoke runs that take seconds.

        Blocks shrink to 16x16 so a 64x48 weight still holds several of them (a 64x64 block would be the whole
        weight). N and K stay multiples of 16 so torch._grouped_mm's 16-byte stride rule holds as on the real shapes.
        """
        return replace(self, rows=96, n=64, k=48, block=None if self.block is None else (16, 16), repeats=3)


def cpu_cases() -> List[Case]:
    """The CPU targets (fp32, docs/benchmarks.md). Repeats are set so the whole run stays well under 10 minutes on 2
    cores: the 2,048-row 1024x1024 cases cost tens to hundreds of ms a call per provider, the others a few ms."""
    f32 = torch.float32
    big = dict(rows=2048, n=1024, k=1024, tickets=8, dtype=f32, repeats=15)
    inr = dict(rows=65536, n=128, k=128, tickets=10, dtype=f32, repeats=20)
    return [
        Case(name="b_1024_u90", base="b_1024_u90", sparsity=0.90,
             targets=(faster("fwd", "B0", 3), faster("fwd", "B5", 2)), **big),
        Case(name="b_1024_u95", base="b_1024_u95", sparsity=0.95, targets=(faster("fwd", "B0", 5),), **big),
        Case(name="b_1024_u50", base="b_1024_u50", sparsity=0.50, targets=(at_most("fwd", "B0", 1.1),), **big),
        Case(name="small_groups_u90", base="small_groups_u90", rows=256, n=1024, k=1024, tickets=8, sparsity=0.90,
             dtype=f32, repeats=40, targets=(faster("fwd", "B0", 1.5),)),
        Case(name="inr_u50", base="inr_u50", sparsity=0.50,
             targets=(at_most("fwd", "B0", 1.2), faster("fwd+bwd", "B1", 1.5)), **inr),
        Case(name="inr_u75", base="inr_u75", sparsity=0.75, targets=(strictly_faster("fwd", "B0"),), **inr),
    ]  # fmt: skip


def gpu_cases() -> List[Case]:
    """The GPU targets (docs/benchmarks.md), each shape in bf16 and fp32.

    The GPU targets do not say forward only, so they are checked in both modes (the CPU ones say forward).
    """
    cases = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        big = dict(rows=4096, n=4096, k=4096, tickets=8, dtype=dtype, repeats=30)
        inr = dict(rows=65536, n=128, k=128, tickets=10, dtype=dtype, repeats=50)

        def regime_a(mode):
            return (at_most(mode, "B0", 1.2), faster(mode, "B1", 3), faster(mode, "B3", 3))

        cases += [
            Case(name=f"b_4096_blk64_90_{tag}", base="b_4096_blk64_90", sparsity=0.90, block=(64, 64),
                 targets=tuple(faster(m, "B0", 5) for m in MODES), **big),
            Case(name=f"b_4096_u90_{tag}", base="b_4096_u90", sparsity=0.90,
                 targets=tuple(no_slower(m, "B0") for m in MODES), **big),
            Case(name=f"inr_u50_{tag}", base="inr_u50", sparsity=0.50,
                 targets=regime_a("fwd") + regime_a("fwd+bwd"), **inr),
            Case(name=f"inr_u75_{tag}", base="inr_u75", sparsity=0.75,
                 targets=regime_a("fwd") + regime_a("fwd+bwd"), **inr),
        ]  # fmt: skip
    return cases


# ------------------------------------------------------------------------------------- inputs and providers
def make_inputs(case: Case, device: torch.device) -> harness.OpInputs:
    """x (B, K), W (N, K), bias (N,), grad_y (B, N), masks (T, N, K), seeded from the shape's base name."""
    B, N, K, T = case.rows, case.n, case.k, case.tickets

    def masks(seed: int) -> torch.Tensor:
        if case.block is None:
            return harness.unstructured_masks(T, N, K, case.sparsity, seed=seed, device=device)
        return harness.block_masks(T, N, K, case.sparsity, *case.block, seed=seed, device=device)

    return harness.op_inputs(case, device, (B, K), (N, K), K, (B, N), N, masks)


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
            harness.error_text(exc, 200)
        )
    return None


def make_providers(inp: harness.OpInputs, device: torch.device, dtype: torch.dtype) -> List[harness.Provider]:
    """B0, B0m, B1, B3, B5, ours and route_prep (harness.op_providers) on the case's tensors."""
    masks, grp = inp.masks, inp.grouping
    perm, offsets = grp.perm, grp.offsets
    # _grouped_mm wants int32 end offsets; converting them is routing prep, done once here, not per call.
    offs32 = offsets[1:].to(torch.int32)
    bounds = offsets.tolist()

    def routed(x, w, b):
        return rk.routed_masked_linear(x, w, masks, inp.route, b, grouping=grp)

    def b3(x, w, b):
        xs = x.index_select(0, perm)
        ys = torch._grouped_mm(xs, (w * masks).transpose(1, 2), offs=offs32)
        # perm is a permutation, so index_copy writes every row of the empty tensor; it is differentiable in ys.
        return ys.new_empty((x.shape[0], w.shape[0])).index_copy(0, perm, ys) + b

    # B5: the CSR weights are built once, outside the timed region (a deployed sparse model would store them).
    csr: Dict[int, torch.Tensor] = {}
    csr_error = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            for t in range(masks.shape[0]):
                if bounds[t + 1] > bounds[t]:
                    csr[t] = (inp.weight * masks[t]).to_sparse_csr()
    except Exception as exc:
        csr_error = "building the CSR weights failed: " + harness.error_text(exc, 200)

    def b5(x, w, b):
        y = x.new_empty((x.shape[0], w.shape[0]))
        for t, w_csr in csr.items():
            rows = perm[bounds[t] : bounds[t + 1]]
            y[rows] = torch.sparse.mm(w_csr, x[rows].t()).t() + b
        return y

    baselines = [
        harness.OpBaseline("B3", b3, unavailable=grouped_mm_unavailable(device, dtype)),
        harness.OpBaseline("B5", b5, modes=("fwd",), unavailable=csr_error),
    ]
    return harness.op_providers(inp, device, dtype, F.linear, routed, baselines)


def prepare(case: Case, device: torch.device, args: argparse.Namespace) -> harness.Prepared:
    """The case's inputs, providers and float64 references."""
    inp = make_inputs(case, device)
    return harness.Prepared(
        providers=make_providers(inp, device, case.dtype),
        references=harness.op_references(inp, F.linear),
        columns=dict(B=case.rows, N=case.n, K=case.k, sparsity_measured=inp.sparsity_measured,
                     mask_structure=case.structure, block_occupancy_64=inp.block_occupancy),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ reporting
def describe(case: Case) -> str:
    return (
        f"B={case.rows}, W {case.n}x{case.k}, T={case.tickets}, {case.structure} {case.sparsity:.0%}, {case.dtype_name}"
    )


def heading(case_rows: Sequence[Dict[str, object]]) -> str:
    """The title of a case's table, from its first row."""
    first = case_rows[0]
    return (
        f"### {first['case']}: B={first['B']}, W {first['N']}x{first['K']} (N x K), T={first['T']}, "
        + harness.masks_text(case_rows)
    )


BENCHMARK = harness.Benchmark(
    name="linear",
    title="routed_masked_linear benchmark",
    fields=FIELDS,
    modes=MODES,
    cases=lambda device_type, args: cpu_cases() if device_type == "cpu" else gpu_cases(),
    prepare=prepare,
    describe=describe,
    heading=heading,
    legend=harness.op_legend(""),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = harness.argument_parser(
        "linear",
        __doc__.split("\n\n")[0],
        cases_help="comma-separated case names (GPU: with or without _bf16/_fp32)",
        warmup_help="untimed calls first (default 2 CPU, 3 GPU, 1 quick)",
    )
    return harness.parse_run_arguments(ap, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench linear [ARGS]``: measure the selected cases, append to the CSV, write the markdown."""
    return harness.main(BENCHMARK, parse_args, argv)
