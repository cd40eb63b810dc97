"""Side-by-side speed of ``rtl_kernels.routed_masked_conv2d`` / ``routed_masked_conv_transpose2d`` against baselines.

Usage::

    python -m bench conv2d [--device cpu|cuda] [--quick] [--cases NAME,...] [--repeats N]
                           [--results-dir bench/results]

The conv counterpart of bench_linear.py (same providers where they apply, same CSV style, same tables, the same
harness). Every provider of a case runs in this one process on the very same tensors (x, W, masks, route, bias and
the backward's grad):

- B0  ``F.conv2d`` / ``F.conv_transpose2d`` with the unmasked W: dense, the speed-of-light reference (it computes
  the wrong function);
- B0m the same with ``W * M_0``: one mask multiplied in, what single-mask pruning tools (and the paper) pay;
- B1  the ``reference`` backend: per present ticket, select its images, conv with ``W * M_t``, write back;
- ours: every rtl backend meant for the device (``cpu`` on CPU; ``triton`` and ``cuda`` on GPU), recorded as
  unavailable when it cannot run here rather than silently left out.

There is no grouped-GEMM (B3) or CSR (B5) baseline for convolutions: torch has neither for conv.

Routing prep is timed apart (provider ``route_prep``: ``group_by_ticket``); the routed providers (B1, ours) are handed
the same precomputed grouping, as a model whose layers share one route is.

Modes: ``fwd`` and ``fwd+bwd`` (gradients of x, W and, where the layer has one, the bias, for one fixed random
grad_y). Before timing, every provider's forward is checked against a float64 computation done image by image
(grouped by the image's own route entry, not by the grouping handed to the providers): the routed function for
routed providers, the dense one for B0, the one-mask one for B0m. For the large cases the float64 check covers a
subset of the images (at least one per ticket present; the row's ``err_images`` column and the table say how many).

The cases are the layers of the paper's models at its batch sizes and ticket counts (docs/paper_notes.md):
GhostNet on 32x32 CIFAR at batch 320, T = 10; the speech U-Net at T = 3 (batch 4, the 626-frame input cut to 64
frequency bins after the first conv so a run stays short); ResNet-style 3x3 convs at batch 32, T = 8. All masks are
unstructured; the paper-scale cases at 50 % (regime A), the ResNet ones at 50 % and 90 % (regime B).

Results are appended to ``<results-dir>/conv2d_<cpu|cuda>.csv`` and the run's tables are written to
``<results-dir>/conv2d_<cpu|cuda>_<git rev>.md`` and printed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import rtl_kernels as rk

from . import harness
from .harness import OP_MODES as MODES
from .harness import Target, at_most, faster, no_slower

# Budget of the float64 error check per case, in dense forward GFLOP (it runs three functions on the chosen images).
REFERENCE_GFLOP_BUDGET = 4.0

FIELDS = [
    "run_id", "timestamp", "device_kind", "device", "torch", "triton", "python", "cuda", "fp32_matmul_precision",
    "threads", "git_rev", "quick", "case", "layer", "op", "dtype", "B", "C_in", "C_out", "H", "W", "Ho", "Wo",
    "kernel", "stride", "padding", "output_padding", "groups", "bias", "gflop_fwd", "T", "sparsity",
    "sparsity_measured", "mask_structure", "block_occupancy_64", "provider", "mode", "status", "median_ms", "p10_ms",
    "p90_ms", "repeats", "ratio_vs_B0", "ratio_vs_B1", "max_abs_err", "err_reference", "err_images", "target",
    "target_met", "error",
]  # fmt: skip

Pair = Tuple[int, int]


# --------------------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True, kw_only=True)
class Case(harness.Case):
    """One conv layer at one batch, T and sparsity (``family``: ghostnet, unet or resnet).

    For ``conv_transpose2d`` the weight is (C_in, C_out / groups, kh, kw), as F.conv_transpose2d wants; otherwise
    (C_out, C_in / groups, kh, kw). H x W is the input's size.
    """

    layer: str  # what the layer is in its model, for the tables
    op: str  # 'conv2d' or 'conv_transpose2d'
    batch: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: Pair
    stride: Pair
    padding: Pair
    groups: int
    bias: bool
    output_padding: Pair = (0, 0)

    @property
    def structure(self) -> str:
        return "unstructured"

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        if self.op == "conv_transpose2d":
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def out_size(self) -> Pair:
        kh, kw = self.kernel
        if self.op == "conv_transpose2d":
            return (
                (self.h - 1) * self.stride[0] - 2 * self.padding[0] + kh + self.output_padding[0],
                (self.w - 1) * self.stride[1] - 2 * self.padding[1] + kw + self.output_padding[1],
            )
        return (
            (self.h + 2 * self.padding[0] - kh) // self.stride[0] + 1,
            (self.w + 2 * self.padding[1] - kw) // self.stride[1] + 1,
        )

    def gflop_per_image(self) -> float:
        """Dense forward multiply-adds x 2 for one image (for a transposed conv: per input pixel, not output)."""
        weights = 1
        for d in self.weight_shape:
            weights *= d
        pixels = self.h * self.w if self.op == "conv_transpose2d" else self.out_size[0] * self.out_size[1]
        return 2.0 * weights * pixels / 1e9

    @property
    def gflop(self) -> float:
        return self.gflop_per_image() * self.batch

    def quick(self) -> "Case":
        """The same layer kind (op, kernel, stride, padding, output padding, depthwise or not, bias, T, sparsity) on
        tiny sizes: at most 16 input / 8 output channels, 12x12 input, 2 images a ticket."""
        c_in = min(self.c_in, 16)
        c_out = min(self.c_out, 8)
        groups = self.groups
        if groups > 1:  # depthwise stays depthwise
            c_in = c_out = groups = min(self.c_in, 8)
        return replace(
            self, batch=2 * self.tickets, c_in=c_in, c_out=c_out, groups=groups, h=min(self.h, 12),
            w=min(self.w, 12), repeats=3, warmup=None,
        )  # fmt: skip


def _geometry_text(case: Case) -> str:
    def pair(p: Pair) -> str:
        return str(p[0]) if p[0] == p[1] else f"({p[0]},{p[1]})"

    text = f"{case.kernel[0]}x{case.kernel[1]}, stride {pair(case.stride)}, pad {pair(case.padding)}"
    if case.output_padding != (0, 0):
        text += f", output_padding {pair(case.output_padding)}"
    if case.groups > 1:
        text += f", groups {case.groups}"
    return text


def _layers(dtype: torch.dtype) -> List[Tuple[str, dict]]:
    """The layer shapes (name without sparsity, keyword arguments of Case without name/base/sparsity/targets).

    GhostNet on CIFAR (paper Table 4; ratio-2 ghost modules, cheap dw 3x3): 32x32 input, the stem halves it to 16x16,
    bottleneck 2 to 8x8, bottleneck 4 (5x5 dw stride 2) to 4x4, bottleneck 6 to 2x2. Chosen: the stem; B1's
    primary 1x1; B3's primary 1x1 and its cheap depthwise 3x3; B4's 5x5 stride-2 depthwise; the 1x1 80->184 after
    the last stage. Batch 320, T = 10 (one ticket per CIFAR-10 class), no bias (BN follows).

    U-Net (App. D.2): [B, 2, 626, 513] STFT input, encoder channels 12, 12, 12, 24, 48 with stride (1, 2), decoder
    48->12 among its transposed convs. Scaled down: batch 4, 128 frequency bins into the first conv (64 after it),
    all 626 frames kept. Chosen: the first 3x5 conv 2->12, a 3x3 encoder conv 12->24, the decoder's transposed 3x3
    48->12, which doubles the frequency axis back (output_padding (0, 1)). With bias. T = 3 (acoustic scenes).

    ResNet 3x3 (stride 1, pad 1, no bias) at batch 32, T = 8: C = 64 at 56x56 and C = 256 at 14x14 (7.4 dense
    GFLOP each), C = 256 at 56x56 (118 GFLOP; see cpu_cases for which of its cases the default CPU run keeps).
    """
    ghost = dict(family="ghostnet", op="conv2d", batch=320, tickets=10, bias=False, dtype=dtype, groups=1)
    unet = dict(family="unet", batch=4, tickets=3, bias=True, dtype=dtype, groups=1)
    resnet = dict(family="resnet", op="conv2d", batch=32, tickets=8, bias=False, dtype=dtype, groups=1,
                  kernel=(3, 3), stride=(1, 1), padding=(1, 1))  # fmt: skip
    return [
        ("ghost_stem", dict(ghost, layer="GhostNet stem conv 3->16", c_in=3, c_out=16, h=32, w=32,
                            kernel=(3, 3), stride=(2, 2), padding=(1, 1), repeats=30)),
        ("ghost_b1_primary", dict(ghost, layer="GhostNet B1 ghost primary 1x1 16->8", c_in=16, c_out=8, h=16,
                                  w=16, kernel=(1, 1), stride=(1, 1), padding=(0, 0), repeats=30)),
        ("ghost_b3_primary", dict(ghost, layer="GhostNet B3 ghost primary 1x1 24->36", c_in=24, c_out=36, h=8,
                                  w=8, kernel=(1, 1), stride=(1, 1), padding=(0, 0), repeats=30)),
        ("ghost_b3_cheap_dw3", dict(ghost, layer="GhostNet B3 ghost cheap depthwise 3x3, 36 channels", c_in=36,
                                    c_out=36, h=8, w=8, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=36,
                                    repeats=30)),
        ("ghost_b4_dw5_s2", dict(ghost, layer="GhostNet B4 depthwise 5x5 stride 2, 72 channels", c_in=72, c_out=72,
                                 h=8, w=8, kernel=(5, 5), stride=(2, 2), padding=(2, 2), groups=72, repeats=30)),
        ("ghost_conv_80_184", dict(ghost, layer="GhostNet 1x1 80->184 after the last stage", c_in=80, c_out=184,
                                   h=2, w=2, kernel=(1, 1), stride=(1, 1), padding=(0, 0), repeats=30)),
        ("unet_enc1_3x5", dict(unet, layer="U-Net first encoder conv 3x5 2->12", op="conv2d", c_in=2, c_out=12,
                               h=626, w=128, kernel=(3, 5), stride=(1, 2), padding=(1, 2), repeats=20)),
        ("unet_enc_12_24", dict(unet, layer="U-Net encoder conv 3x3 12->24", op="conv2d", c_in=12, c_out=24,
                                h=626, w=64, kernel=(3, 3), stride=(1, 2), padding=(1, 1), repeats=15)),
        ("unet_dec_48_12", dict(unet, layer="U-Net decoder transposed conv 3x3 48->12", op="conv_transpose2d",
                                c_in=48, c_out=12, h=626, w=32, kernel=(3, 3), stride=(1, 2), padding=(1, 1),
                                output_padding=(0, 1), repeats=15)),
        ("resnet_c64_56", dict(resnet, layer="ResNet 3x3 conv, C=64 at 56x56", c_in=64, c_out=64, h=56, w=56,
                               repeats=5)),
        ("resnet_c256_14", dict(resnet, layer="ResNet 3x3 conv, C=256 at 14x14", c_in=256, c_out=256, h=14, w=14,
                                repeats=5)),
        ("resnet_c256_56", dict(resnet, layer="ResNet 3x3 conv, C=256 at 56x56", c_in=256, c_out=256, h=56, w=56,
                                repeats=3, warmup=1)),
    ]  # fmt: skip


def _all_cases(dtype: torch.dtype, tag: str, targets: Callable[[str, float], Tuple[Target, ...]]) -> List[Case]:
    cases = []
    for base_layer, kw in _layers(dtype):
        sparsities = (0.5, 0.9) if kw["family"] == "resnet" else (0.5,)
        if base_layer == "resnet_c256_14":  # the layer with a 95 % target
            sparsities += (0.95,)
        for sp in sparsities:
            base = f"{base_layer}_u{round(sp * 100)}"
            name = f"{base}_{tag}" if tag else base
            cases.append(Case(name=name, base=base, sparsity=sp, targets=targets(base, sp), **kw))
    return cases


# The default CPU run leaves these out: one fwd+bwd call of the C = 256, 56x56 layer costs seconds per provider on
# 2 cores, and only its 90 % case carries a target. Run them with --cases.
CPU_OPT_IN = ("resnet_c256_56_u50",)


def _cpu_targets(base: str, sparsity: float) -> Tuple[Target, ...]:
    """The CPU targets: regime A (GhostNet, U-Net) at 50 %: fwd+bwd >= 1.5x faster than B1 and fwd within 1.3x of
    B0; regime B (ResNet 3x3, C = 256): at 14x14 fwd >= 3x faster than B0 at 90 % and >= 4x at 95 %, at 56x56 >= 2x
    at 90 %. Other cases are reported only."""
    if base.startswith(("ghost_", "unet_")) and sparsity == 0.5:
        return (at_most("fwd", "B0", 1.3), faster("fwd+bwd", "B1", 1.5))
    if base.startswith("resnet_c256_14") and sparsity in (0.9, 0.95):
        return (faster("fwd", "B0", 3 if sparsity == 0.9 else 4),)
    if base.startswith("resnet_c256_56") and sparsity == 0.9:
        return (faster("fwd", "B0", 2),)
    return ()


def _gpu_targets(base: str, sparsity: float) -> Tuple[Target, ...]:
    """The GPU targets of docs/benchmarks.md carried over to convs: the regime A shapes (GhostNet, U-Net) <= 1.2x
    B0 time and >= 3x faster than B1 in both modes; unstructured 90 % (ResNet C = 256) no slower than B0."""
    if base.startswith(("ghost_", "unet_")):
        return tuple(t for m in MODES for t in (at_most(m, "B0", 1.2), faster(m, "B1", 3)))
    if base.startswith("resnet_c256_") and sparsity == 0.9:
        return tuple(no_slower(m, "B0") for m in MODES)
    return ()


def cpu_cases(include_opt_in: bool = False) -> List[Case]:
    """Every CPU case, fp32; those of CPU_OPT_IN only with ``include_opt_in`` (a run that names its cases)."""
    cases = _all_cases(torch.float32, "", _cpu_targets)
    return cases if include_opt_in else [c for c in cases if c.name not in CPU_OPT_IN]


def gpu_cases() -> List[Case]:
    """Every case in bf16 and fp32 (the GPU has time for the big ResNet layer at both sparsities)."""
    cases = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cases += [replace(c, repeats=max(c.repeats, 20), warmup=None)
                  for c in _all_cases(dtype, tag, _gpu_targets)]  # fmt: skip
    return cases


def selectable_cases(device_type: str, args: argparse.Namespace) -> List[Case]:
    """The cases a run selects from: on CPU the opt-in ones too when --cases names cases."""
    return cpu_cases(include_opt_in=bool(args.cases)) if device_type == "cpu" else gpu_cases()


# ------------------------------------------------------------------------------------- inputs and providers
def make_inputs(case: Case, device: torch.device) -> harness.OpInputs:
    """x (B, C_in, H, W), W as the op takes it, bias (C_out,) or None, grad_y (B, C_out, Ho, Wo), masks (T, *W)
    with one mask row per weight row (the first dim of W), the rest flattened: an exact kept count per ticket."""
    wshape = case.weight_shape
    fan_in = wshape[1] * wshape[2] * wshape[3]
    if case.op == "conv_transpose2d":  # each output pixel sums over C_in x (taps hitting it), about C_in * kh*kw/s
        fan_in = wshape[0] * wshape[2] * wshape[3]
    cols = wshape[1] * wshape[2] * wshape[3]

    def masks(seed: int) -> torch.Tensor:
        return harness.unstructured_masks(case.tickets, wshape[0], cols, case.sparsity, seed=seed, device=device)

    x_shape = (case.batch, case.c_in, case.h, case.w)
    out_shape = (case.batch, case.c_out, *case.out_size)
    inp = harness.op_inputs(case, device, x_shape, wshape, fan_in, out_shape, case.c_out if case.bias else None, masks)
    inp.check = reference_images(case, inp.route)
    return inp


def conv_fn(case: Case) -> harness.OpFunction:
    """The case's plain torch conv, ``f(x, W, b)``, for the dense baselines and the float64 reference."""
    if case.op == "conv_transpose2d":
        return lambda x, w, b: F.conv_transpose2d(
            x, w, b, stride=case.stride, padding=case.padding, output_padding=case.output_padding, groups=case.groups
        )
    return lambda x, w, b: F.conv2d(x, w, b, stride=case.stride, padding=case.padding, groups=case.groups)


def reference_images(case: Case, route: torch.Tensor) -> torch.Tensor:
    """Indices of the images the float64 check covers: all if they fit REFERENCE_GFLOP_BUDGET, else as many as fit
    taken round-robin over the tickets (first image of each ticket, then the second, ...), at least one a ticket."""
    per_ticket = [(route == t).nonzero().flatten().tolist() for t in range(case.tickets)]
    order = [imgs[i] for i in range(max(map(len, per_ticket))) for imgs in per_ticket if i < len(imgs)]
    present = sum(1 for imgs in per_ticket if imgs)
    fit = int(REFERENCE_GFLOP_BUDGET // max(3 * case.gflop_per_image(), 1e-12))
    count = min(len(order), max(present, fit))
    return torch.tensor(sorted(order[:count]), dtype=torch.long, device=route.device)


def make_providers(case: Case, inp: harness.OpInputs, device: torch.device) -> List[harness.Provider]:
    """B0, B0m, B1, ours and route_prep (harness.op_providers) on the case's tensors."""
    masks, route, grp = inp.masks, inp.route, inp.grouping
    if case.op == "conv_transpose2d":

        def routed(x, w, b):
            return rk.routed_masked_conv_transpose2d(
                x, w, masks, route, b, stride=case.stride, padding=case.padding,
                output_padding=case.output_padding, groups=case.groups, grouping=grp,
            )  # fmt: skip

    else:

        def routed(x, w, b):
            return rk.routed_masked_conv2d(
                x, w, masks, route, b, stride=case.stride, padding=case.padding, groups=case.groups, grouping=grp
            )

    return harness.op_providers(inp, device, case.dtype, conv_fn(case), routed)


def _pair_text(p: Pair) -> str:
    return f"{p[0]}x{p[1]}"


def prepare(case: Case, device: torch.device, args: argparse.Namespace) -> harness.Prepared:
    """The case's inputs, providers and float64 references (on the images reference_images picks)."""
    inp = make_inputs(case, device)
    ho, wo = case.out_size
    columns = dict(
        layer=case.layer, op=case.op, B=case.batch, C_in=case.c_in, C_out=case.c_out, H=case.h, W=case.w, Ho=ho,
        Wo=wo, kernel=_pair_text(case.kernel), stride=_pair_text(case.stride), padding=_pair_text(case.padding),
        output_padding=_pair_text(case.output_padding), groups=case.groups, bias=int(case.bias),
        gflop_fwd=case.gflop, sparsity_measured=inp.sparsity_measured, mask_structure=case.structure,
        block_occupancy_64=inp.block_occupancy,
    )  # fmt: skip
    return harness.Prepared(
        providers=make_providers(case, inp, device),
        references=harness.op_references(inp, conv_fn(case)),
        columns=columns,
        check_columns={"err_images": f"{inp.check.numel()}/{case.batch}"},
    )


# ------------------------------------------------------------------------------------------------------ reporting
def describe(case: Case) -> str:
    ho, wo = case.out_size
    return (
        f"{case.layer}; x ({case.batch}, {case.c_in}, {case.h}, {case.w}) -> ({case.batch}, {case.c_out}, {ho}, "
        f"{wo}), {_geometry_text(case)}, T={case.tickets}, {case.structure} {case.sparsity:.0%}, {case.dtype_name}, "
        f"{case.gflop:.3g} dense GFLOP"
    )


def heading(case_rows: Sequence[Dict[str, object]]) -> str:
    """The title of a case's table, from its first row (and the images its float64 check covered)."""
    first = case_rows[0]
    geometry = f"{first['kernel']} kernel, stride {first['stride']}, pad {first['padding']}"
    if first.get("output_padding") not in (None, "", "0x0"):
        geometry += f", output_padding {first['output_padding']}"
    if int(first.get("groups") or 1) > 1:
        geometry += f", groups {first['groups']}"
    return (
        f"### {first['case']}: {first['layer']} ({first['op']}); x ({first['B']}, {first['C_in']}, {first['H']}, "
        f"{first['W']}) -> ({first['B']}, {first['C_out']}, {first['Ho']}, {first['Wo']}), {geometry}, "
        f"{'bias' if int(first.get('bias') or 0) else 'no bias'}, {float(first['gflop_fwd']):.3g} dense GFLOP; "
        f"T={first['T']}, " + harness.masks_text(case_rows, "err_images", "images")
    )


BENCHMARK = harness.Benchmark(
    name="conv2d",
    title="routed_masked_conv2d / routed_masked_conv_transpose2d benchmark",
    fields=FIELDS,
    modes=MODES,
    cases=selectable_cases,
    prepare=prepare,
    describe=describe,
    heading=heading,
    legend=harness.op_legend(
        " B0: F.conv2d / F.conv_transpose2d with the unmasked W; B0m: with W * M_0; B1: the reference backend "
        "(per-ticket loop).",
        "per-image computation",
        " (on a subset of the images where the case heading says so)",
    ),
    skipped=lambda device_type, args: list(CPU_OPT_IN) if device_type == "cpu" else [],
    skipped_note="- skipped in this default run (one fwd+bwd call of C = 256 at 56x56 costs seconds per provider on "
    "this machine): {names}; run them with `--cases {cases}`.",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = harness.argument_parser(
        "conv2d",
        __doc__.split("\n\n")[0],
        cases_help=(
            "comma-separated case names (GPU: with or without _bf16/_fp32) or families (ghostnet, unet, resnet);\n"
            f"on CPU this also reaches the cases the default run leaves out ({', '.join(CPU_OPT_IN)})"
        ),
        warmup_help="untimed calls first (default 2 CPU (1 for the C = 256, 56x56 layer), 3 GPU, 1 quick)",
    )
    return harness.parse_run_arguments(ap, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench conv2d [ARGS]``: measure the selected cases, append to the CSV, write the markdown."""
    return harness.main(BENCHMARK, parse_args, argv)
