"""Whole-model speed of routed models (inference and one training step) against the same model dense and naive.

Usage::

    python -m bench models [--device cpu|cuda] [--quick] [--cases NAME,...] [--backend auto|cpu|triton|cuda]
                           [--full] [--repeats N] [--out bench/results] [--profile | --memory]

The op benchmarks (bench_linear.py, bench_conv2d.py) time one layer; this one times what a user runs: a model
converted with ``rtl.convert_``, pruned per ticket, called through ``rtl.RoutedModel``, and trained with Adam
wrapped in ``rtl.optim.TicketMaskedOptimizer``. Every provider of a case starts from the same weights and runs on the
very same inputs, route and targets, in this one process:

- B0    the plain dense model (no conversion, no masks): the speed-of-light reference (it computes another
        function), trained with plain Adam;
- B1    the routed model with ``rtl_kernels.set_backend("reference")``: the naive per-ticket loop in every layer;
- ours  the routed model on the automatic backend (provider ``ours:auto``, the ``backend`` column says which one
        it picked), or on each backend named with ``--backend``.

Modes:

- ``infer``: eval mode under ``torch.no_grad()``, one forward of the batch;
- ``train_step``: train mode, ``zero_grad`` + forward + loss + backward + optimizer step (Adam, lr 1e-4: timing does
  not depend on the rate, and small steps keep the activations in the same range over the repeats). The routed
  providers step through TicketMaskedOptimizer, whose exact masking (a snapshot and restore of the weights and Adam
  moments outside the active tickets) is part of what a correct routed training step costs, so it is timed too.

The cases (docs/paper_notes.md) are the paper's models and a torchvision one:

- ``ghostnet``: rtl.models.GhostNet(num_classes=10) at batch 320 on 32x32 inputs, T = 10, converted with its
  ``prunable_filter`` (every conv but the squeeze-and-excitation ones; BN, SE and the classifier dense);
- ``inr``: rtl.models.FourierINR over the 65,536 pixel coordinates of a 256x256 image, T = 10, every Linear routed;
- ``resnet18``: torchvision resnet18(weights=None, num_classes=10) at batch 64, T = 8, every conv routed and the
  classifier ``fc`` dense. 224x224 inputs on GPU; on CPU 64x64 by default, 224x224 with ``--full``: scaling the
  quick 32x32 batch-16 shapes (B1 train step 1.1 s on one core) by pixels and batch, a 224x224 batch-64 training
  step of the naive loop takes minutes on a 2-core CPU, and every row makes at least 3 timed calls after warm-up.

Masks: ``rtl.prune.magnitude_prune_`` from all-ones masks, ticket by ticket, with a random importance drawn per
ticket (so tickets differ, as separate IMP runs would make them) and ``scope="layer"`` (every routed layer at the
nominal sparsity, so "90 %" means the same in every layer). Unstructured at 0, 50, 75, 90 and 95 %; overlapping
tickets (``o50``, ``o90``: unstructured, mean Jaccard 0.8 between tickets, as RTL's own tickets overlap); structured
at 90 % with the pruning layer's groups: ("vector", 8) on both devices, and ("block", 16, 16) on CPU or
("block", 64, 64) on GPU (64x64 blocks are the GPU kernels' tile; on the paper's small layers, 16x16 still leaves
several blocks per weight). A structured request removes whole groups only while it stays within the request, so
layers smaller than one group stay dense: the ``sparsity_measured`` column says what was pruned. The route is
balanced (B / T samples a ticket) and shuffled.

Before timing, every provider's eval-mode forward is checked against float64 (bench/harness.py), once per case on
a subset of the samples (round robin over the tickets, at least one per ticket; ``err_samples`` says how many): for
the routed providers against ``rtl.extract_ticket(model, t)`` (plain torch layers with W * M_t) run on each ticket's
own samples, for B0 against the dense model. The train_step rows repeat the infer rows' error.

Results are appended to ``<out>/models_<cpu|cuda>.csv`` and the run's tables are written to
``<out>/models_<cpu|cuda>_<git rev>.md`` and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import rtl
import rtl.diagnostics
import rtl.optim
import rtl.prune
import rtl_kernels as rk
from rtl.models import FourierINR, GhostNet
from rtl_kernels.backends import select_backend
from rtl_kernels.formats.block_csr import compile_block_csr

from . import harness

MODES = ("infer", "train_step")
FAMILIES = ("ghostnet", "inr", "resnet18")
UNSTRUCTURED_SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)
# Tickets that share most of their kept weights, as RTL's tickets do (mean Jaccard 0.75-0.86 between the tickets of
# the digits runs): unstructured masks at these sparsities synthesised with this mean Jaccard (see
# overlapping_importance), beside the independent random masks above (mean Jaccard 0.05 at 90 %).
OVERLAP_SPARSITIES = (0.5, 0.9)
OVERLAP_JACCARD = 0.8
STRUCTURED_SPARSITY = 0.9
# Structured granularities per device type, as rtl.prune.magnitude_prune_ takes them.
STRUCTURES = {"cpu": (("vector", 8), ("block", 16, 16)), "cuda": (("vector", 8), ("block", 64, 64))}
OURS_CHOICES = ("auto", "cpu", "triton", "cuda")
LEARNING_RATE = 1e-4

FIELDS = [
    "run_id", "timestamp", "device_kind", "device", "torch", "triton", "python", "cuda", "fp32_matmul_precision",
    "threads", "git_rev", "quick", "case", "model", "dtype", "batch", "input_shape", "T", "prunable_weights",
    "sparsity", "sparsity_measured", "mask_structure", "block_occupancy_64", "provider", "backend", "mode",
    "status", "median_ms", "p10_ms", "p90_ms", "repeats", "ratio_vs_B0", "ratio_vs_B1", "max_abs_err",
    "err_reference", "ref_max_abs", "err_samples", "error",
]  # fmt: skip

Granularity = Tuple  # ("unstructured",), ("vector", v) or ("block", bn, bk)


# The float64 check's tolerance for whole models, relative to max |y|: rounding compounds over a model's layers (and
# TF32 convolutions on a GPU), while a wrong ticket moves the outputs by a few percent of their scale or more (the
# INR's sigmoid outputs move least).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}


# --------------------------------------------------------------------------------------------------------- the cases
@dataclass(frozen=True, kw_only=True)
class Case(harness.Case):
    """One model at one batch, T, sparsity and mask structure (``family``: ghostnet, inr or resnet18).

    ``batch`` is the number of samples the route assigns tickets to: images for the image models, coordinate rows
    (``size`` x ``size`` of them) for the INR. ``size`` is the image side. The model targets are read from the
    tables (docs/benchmarks.md), so cases carry none.
    """

    batch: int
    size: int
    granularity: Granularity
    err_samples: int  # samples the float64 error check covers (at least one per ticket)

    @property
    def structure(self) -> str:
        """The mask structure as the tables print it: 'unstructured', 'vector8', 'block16x16' or 'overlap0.8'
        (unstructured tickets with that mean Jaccard)."""
        kind = self.granularity[0]
        if kind == "vector":
            return f"vector{self.granularity[1]}"
        if kind == "block":
            return f"block{self.granularity[1]}x{self.granularity[2]}"
        if kind == "overlap":
            return f"overlap{self.granularity[1]}"
        return kind

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one batch of inputs: (B, 3, size, size), or (rows, 2) coordinates for the INR."""
        if self.family == "inr":
            return (self.batch, 2)
        return (self.batch, 3, self.size, self.size)

    def quick(self) -> "Case":
        """The same model, T, sparsity, structure and dtype on tiny inputs, for smoke runs of seconds.

        GhostNet and ResNet-18 keep their weights (the layers are the model's) on 2 images a ticket at 32x32; the INR
        runs a 16x16 image (256 rows). The error check then covers every sample.

        Example:
            >>> cpu_cases()[0].quick().batch
            20
        """
        if self.family == "inr":
            batch, size = 16 * 16, 16
        else:
            batch, size = 2 * self.tickets, 32
        return replace(self, batch=batch, size=size, repeats=3, warmup=None, err_samples=batch)


def _sparsity_tag(sparsity: float) -> str:
    return str(round(sparsity * 100))


def _family_cases(device_type: str, full: bool) -> List[dict]:
    """Keyword arguments of Case (without name, base, sparsity, granularity, dtype) per family.

    Repeats: the timed calls wanted per row; ``--max-seconds`` (default 5 s) stops a slow provider sooner. The
    error check covers every GhostNet image and every INR row (both float64 references took 2.6 s and 1.3 s on one
    core of the 2-core EPYC) and two images a ticket of ResNet-18 (about 0.3 dense GFLOP an image at 64x64, 3.6 at
    224x224, paid twice: the dense and the per-ticket reference).
    """
    cpu = device_type == "cpu"
    resnet_size = 64 if cpu and not full else 224
    return [
        dict(family="ghostnet", batch=320, size=32, tickets=10, repeats=10 if cpu else 30, err_samples=320),
        dict(family="inr", batch=256 * 256, size=256, tickets=10, repeats=10 if cpu else 30, err_samples=256 * 256),
        dict(family="resnet18", batch=64, size=resnet_size, tickets=8, repeats=5 if cpu else 20, err_samples=16),
    ]


def _cases_for(device_type: str, dtype: torch.dtype, tag: str, full: bool) -> List[Case]:
    cases = []
    masks: List[Tuple[str, float, Granularity]] = [
        (f"u{_sparsity_tag(sp)}", sp, ("unstructured",)) for sp in UNSTRUCTURED_SPARSITIES
    ]
    for gran in STRUCTURES[device_type]:
        label = f"v{gran[1]}" if gran[0] == "vector" else f"b{gran[1]}"
        masks.append((f"{label}_{_sparsity_tag(STRUCTURED_SPARSITY)}", STRUCTURED_SPARSITY, tuple(gran)))
    masks += [(f"o{_sparsity_tag(sp)}", sp, ("overlap", OVERLAP_JACCARD)) for sp in OVERLAP_SPARSITIES]
    for kw in _family_cases(device_type, full):
        for suffix, sp, gran in masks:
            base = f"{kw['family']}_{suffix}"
            name = f"{base}_{tag}" if tag else base
            cases.append(Case(name=name, base=base, sparsity=sp, granularity=gran, dtype=dtype, **kw))
    return cases


def cpu_cases(full: bool = False) -> List[Case]:
    """Every CPU case, fp32.

    Args:
        full: ResNet-18 at 224x224 (the GPU's resolution) instead of 64x64.

    Returns:
        The cases, family by family: 5 unstructured sparsities, then vector8 and block16x16 at 90 %.

    Example:
        >>> [c.name for c in cpu_cases()][:2]
        ['ghostnet_u0', 'ghostnet_u50']
    """
    return _cases_for("cpu", torch.float32, "", full)


def gpu_cases() -> List[Case]:
    """Every GPU case in bf16 and fp32 (names end in _bf16 / _fp32), ResNet-18 at 224x224, blocks 64x64.

    Returns:
        The cases.

    Example:
        >>> gpu_cases()[0].name
        'ghostnet_u0_bf16'
    """
    return _cases_for("cuda", torch.bfloat16, "bf16", True) + _cases_for("cuda", torch.float32, "fp32", True)


def select_cases(device_type: str, names: Optional[str], quick: bool, full: bool = False) -> List[Case]:
    """The cases of a run: all of the device's, or those named (case name, name without dtype, or family).

    Args:
        device_type: 'cpu' or 'cuda'.
        names: comma-separated names from ``--cases``, or None for all.
        quick: shrink every case with :meth:`Case.quick`.
        full: CPU ResNet-18 at 224x224.

    Returns:
        The cases in the device's order. Unknown names end the program with the list of choices.

    Example:
        >>> [c.name for c in select_cases("cpu", "inr_u50", quick=False)]
        ['inr_u50']
    """
    cases = cpu_cases(full) if device_type == "cpu" else gpu_cases()
    return harness.select_cases(cases, names, device_type, quick)


# ------------------------------------------------------------------------------------------------------- the models
def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _dense_model(family: str) -> Tuple[nn.Module, Callable[[str, nn.Module], bool]]:
    """The family's torch model (seeded, so every case of a family starts from the same weights) and the filter
    that chooses the layers to route."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(family))
        if family == "ghostnet":
            model = GhostNet(num_classes=10)
            return model, model.prunable_filter
        if family == "inr":
            model = FourierINR()
            return model, model.prunable_filter
        if family == "resnet18":
            import torchvision  # only this family needs it

            model = torchvision.models.resnet18(weights=None, num_classes=10)
            # The paper keeps the classifier dense; every conv is routed.
            return model, lambda name, module: name != "fc"
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def _perturb_(model: nn.Module, seed: int) -> None:
    """Give every bias and every batch norm's affine parameters and running statistics small random values.

    The models start with zero biases and BN at (weight 1, bias 0, mean 0, var 1); under those a routed path that
    dropped the bias or mishandled what BN sees would still match the reference, so the error check would miss it.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
                if module.weight is not None:
                    module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))


def prune_tickets_(model: nn.Module, num_tickets: int, sparsity: float, granularity: Granularity, seed: int) -> None:
    """Prune each ticket of a converted model to ``sparsity`` in every routed layer, ranking a fresh random
    importance per ticket (the tickets come out different, as separate IMP runs would make them).

    Args:
        model: a model with routed layers whose masks are all ones.
        num_tickets: T.
        sparsity: fraction in [0, 1) of each layer's weights each ticket drops.
        granularity: "unstructured", ("vector", v) or ("block", bn, bk), as rtl.prune.magnitude_prune_ takes it.
        seed: seeds the importance.

    Example:
        >>> prune_tickets_(model, 10, 0.9, ("vector", 8), seed=0)
    """
    if sparsity == 0:
        return
    layers = list(rtl.routed_modules(model))
    g = torch.Generator().manual_seed(seed)
    if granularity[0] == "overlap":
        for name, m in layers:
            importance = overlapping_importance(m.weight.shape, num_tickets, sparsity, granularity[1], g)
            rtl.prune.magnitude_prune_(
                model,
                sparsity,
                scope="layer",
                importance={name: importance.to(m.weight_masks.device)},
                filter_fn=lambda n, _m, name=name: n == name,
            )
        return
    gran = granularity[0] if granularity[0] == "unstructured" else granularity
    for t in range(num_tickets):
        # magnitude_prune_ reads only row t of an importance when it prunes ticket t: one weight-sized draw,
        # expanded to (T, *weight.shape) without copies, keeps ResNet-18's 11M x T scores out of memory.
        importance = {
            name: torch.rand(m.weight.shape, generator=g).to(m.weight_masks.device).expand(num_tickets, *m.weight.shape)
            for name, m in layers
        }
        rtl.prune.magnitude_prune_(model, sparsity, tickets=t, scope="layer", granularity=gran, importance=importance)


def _mean_jaccard_of(mixing: float, sample: torch.Tensor, noise: torch.Tensor, keep: int) -> float:
    """Mean Jaccard between the tickets' top-``keep`` sets of shared * (1 - mixing) + noise_t * mixing."""
    scores = sample * (1 - mixing) + noise * mixing
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept.scatter_(1, scores.topk(keep, dim=1).indices, True)
    inter = kept.float() @ kept.float().t()
    union = 2 * keep - inter
    t = kept.shape[0]
    return float(((inter / union).sum() - t) / (t * (t - 1)))


def overlapping_importance(
    shape, num_tickets: int, sparsity: float, jaccard: float, generator: torch.Generator
) -> torch.Tensor:
    """(T, *shape) importances whose top-(1 - sparsity) sets per ticket have about the given mean Jaccard.

    Each ticket ranks ``shared * (1 - a) + noise_t * a`` (uniform draws): a = 0 gives identical tickets, a = 1
    independent ones. ``a`` is found by bisection on a sample of the layer's positions.

    Args:
        shape: the weight's shape.
        num_tickets: T (>= 2 for a Jaccard to mean anything; T = 1 returns the shared importance).
        sparsity: the fraction each ticket drops.
        jaccard: the wanted mean Jaccard between tickets, in (0, 1).
        generator: the random source.

    Returns:
        (T, *shape) float32.

    Example:
        >>> imp = overlapping_importance((64, 64), 8, 0.9, 0.8, torch.Generator().manual_seed(0))
    """
    numel = 1
    for d in shape:
        numel *= d
    shared = torch.rand(numel, generator=generator)
    noise = torch.rand(num_tickets, numel, generator=generator)
    if num_tickets < 2:
        return shared.view(1, *shape)
    n = min(numel, 20000)
    keep = max(1, round(n * (1 - sparsity)))
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if _mean_jaccard_of(mid, shared[:n], noise[:, :n], keep) > jaccard:
            lo = mid
        else:
            hi = mid
    mixing = (lo + hi) / 2
    return (shared * (1 - mixing) + noise * mixing).view(num_tickets, *shape)


def mean_jaccard(model: nn.Module) -> float:
    """The mean Jaccard between the tickets of a model's routed layers (the paper's S_k averaged over k)."""
    return float(rtl.diagnostics.ticket_similarity_scores(model).mean())


def block_occupancy(model: nn.Module, block: int = 64) -> Optional[float]:
    """Fraction of (ticket, block x block tile) pairs of the routed weights' 2-D views that keep any weight.

    Args:
        model: a model with routed layers.
        block: the tile side.

    Returns:
        Occupied tiles over all tiles of all routed layers (the block work a 64x64 block kernel cannot skip), or
        None when the layout cannot be compiled here.

    Example:
        >>> block_occupancy(model)
        0.97
    """
    occupied = total = 0.0
    try:
        for _, m in rtl.routed_modules(model):
            masks = m.weight_masks.reshape(m.num_tickets, m.weight.shape[0], -1)
            layout = compile_block_csr(masks, block, block)
            tiles = masks.shape[0] * -(-masks.shape[1] // block) * -(-masks.shape[2] // block)
            occupied += layout.occupancy * tiles
            total += tiles
    except Exception as exc:  # a reporting column must not stop the benchmark
        print(f"  block occupancy unavailable: {harness.error_text(exc)}", flush=True)
        return None
    return occupied / total if total else None


@dataclass
class Setup:
    """One case's models and tensors; every provider starts from these same objects (or copies of them).

    Shapes: x (B, 3, H, W) or (B, 2); route (B,) int64; target (B,) int64 labels or (B, 3) RGB for the INR;
    check (S,) int64 indices of the samples the error check covers.
    """

    dense: nn.Module
    routed: nn.Module
    x: torch.Tensor
    route: torch.Tensor
    target: torch.Tensor
    check: torch.Tensor
    sparsity_measured: float
    prunable_weights: int
    block_occupancy: Optional[float]
    jaccard: Optional[float] = None  # mean Jaccard between tickets, for overlapping masks


def check_samples(route: torch.Tensor, num_tickets: int, limit: int) -> torch.Tensor:
    """Indices of the samples the float64 check covers: up to ``limit`` of them, taken round robin over the tickets
    (each ticket's first sample, then each one's second, ...), at least one per ticket present.

    Args:
        route (B,) int64: the case's route.
        num_tickets: T.
        limit: samples wanted.

    Returns:
        (S,) int64 sorted indices on route's device.

    Example:
        >>> check_samples(torch.tensor([1, 0, 1, 1]), 2, 2).tolist()
        [0, 1]
    """
    order = torch.sort(route.cpu(), stable=True).indices
    counts = torch.bincount(route.cpu(), minlength=num_tickets)
    starts = torch.cumsum(counts, 0) - counts
    # Rank of each sample within its ticket; sorting by (rank, ticket) interleaves the tickets.
    rank = torch.empty_like(order)
    rank[order] = torch.arange(route.numel()) - starts[route.cpu()[order]]
    interleaved = torch.argsort(rank * num_tickets + route.cpu(), stable=True)
    count = min(route.numel(), max(int((counts > 0).sum()), limit))
    return torch.sort(interleaved[:count]).values.to(route.device)


def make_setup(case: Case, device: torch.device) -> Setup:
    """Build, convert and prune the case's model and draw its inputs, route and targets (seeded by ``case.base``,
    so the bf16 and fp32 variants and CPU and GPU runs share them).

    Args:
        case: the case.
        device: where the models and tensors live.

    Returns:
        The :class:`Setup`; ``dense`` and ``routed`` hold the same weights.

    Example:
        >>> setup = make_setup(quick_case(cpu_cases()[1]), torch.device("cpu"))
    """
    dense, filter_fn = _dense_model(case.family)
    _perturb_(dense, _seed(case.family) + 1)
    routed = rtl.convert_(copy.deepcopy(dense), case.tickets, filter_fn=filter_fn)
    prune_tickets_(routed, case.tickets, case.sparsity, case.granularity, seed=_seed(case.base) + 2)
    dense.to(device=device, dtype=case.dtype)
    routed.to(device=device, dtype=case.dtype)

    g = torch.Generator().manual_seed(_seed(case.base))
    B, T = case.batch, case.tickets
    if case.family == "inr":
        x = FourierINR.coords(case.size, case.size)
        target = torch.rand(B, 3, generator=g)
    else:
        x = torch.randn(*case.input_shape, generator=g)
        target = torch.randint(0, 10, (B,), generator=g)
    # Balanced (B / T samples a ticket), shuffled.
    route = (torch.arange(B) % T)[torch.randperm(B, generator=g)]
    x = x.to(device=device, dtype=case.dtype)
    target = target.to(device=device, dtype=case.dtype if case.family == "inr" else torch.int64)
    route = route.to(device)
    return Setup(
        dense=dense,
        routed=routed,
        x=x,
        route=route,
        target=target,
        check=check_samples(route, T, case.err_samples),
        sparsity_measured=float(rtl.prune.ticket_sparsity(routed).mean()),
        prunable_weights=rtl.prune.prunable_count(routed),
        block_occupancy=block_occupancy(routed),
        jaccard=mean_jaccard(routed) if case.granularity[0] == "overlap" and case.tickets > 1 else None,
    )


def float64_references(setup: Setup) -> Dict[str, torch.Tensor]:
    """Eval-mode outputs on the checked samples, in float64 from the same values.

    The routed one runs ``rtl.extract_ticket(routed, t)`` (plain torch layers holding W * M_t) on the samples whose
    own route entry is t, so it shares no code with the routed kernels.

    Args:
        setup: the case's setup.

    Returns:
        {"ticket_f64": (S, out...), "dense_f64": (S, out...)} float64 on the setup's device.

    Example:
        >>> refs = float64_references(setup)
    """
    x = setup.x.index_select(0, setup.check).double()
    route = setup.route.index_select(0, setup.check)
    with torch.no_grad():
        dense = copy.deepcopy(setup.dense).double().eval()
        dense_out = dense(x)
        del dense
        ticket_out = torch.empty_like(dense_out)
        for t in torch.unique(route).tolist():
            sel = (route == t).nonzero().flatten()
            plain = rtl.extract_ticket(setup.routed, t).double().eval()
            ticket_out[sel] = plain(x.index_select(0, sel))
            del plain
    return {"ticket_f64": ticket_out, "dense_f64": dense_out}


# ---------------------------------------------------------------------------------------------------- the providers
@dataclass
class Runner:
    """A way to run the case's model: its own copy of the weights, how to call it, and the backend context.

    ``call(x)`` runs the model on x (B, ...) with the case's route where it is routed. The optimizer is built on the
    first training step, so the infer rows run a model without optimizer state.
    """

    name: str
    kind: str  # 'baseline' or 'ours'
    model: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    reference: str  # key of float64_references
    backend: str  # the rtl_kernels backend that runs the routed layers ('' for the plain torch model)
    routed: bool
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    unavailable: Optional[str] = None
    optimizer: Optional[torch.optim.Optimizer] = None


def _backend_name(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a choice resolves to for (device, dtype): itself, or what 'auto' picks ('' when none can)."""
    if choice != "auto":
        return choice
    try:
        with rk.set_backend("auto"):
            return select_backend(device, dtype).name
    except RuntimeError:
        return ""


def make_runners(case: Case, setup: Setup, device: torch.device, ours: Sequence[str]) -> List[Runner]:
    """B0, B1 and one ``ours:<choice>`` runner per backend choice, each on its own deep copy of the weights (a
    training step of one must not move the weights another starts from).

    Args:
        case: the case.
        setup: its models and tensors.
        device: where they run.
        ours: backend choices from ``--backend`` ('auto', 'cpu', 'triton', 'cuda').

    Returns:
        The runners, B0 first.

    Example:
        >>> [r.name for r in make_runners(case, setup, torch.device("cpu"), ["auto"])]
        ['B0', 'B1', 'ours:auto']
    """
    route = setup.route

    def routed_call(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        wrapper = rtl.RoutedModel(model)
        return lambda x: wrapper(x, route)

    dense = copy.deepcopy(setup.dense)
    runners = [Runner("B0", "baseline", dense, dense, "dense_f64", "", routed=False)]
    b1 = copy.deepcopy(setup.routed)
    runners.append(
        Runner("B1", "baseline", b1, routed_call(b1), "ticket_f64", "reference", routed=True,
               context=lambda: rk.set_backend("reference"))
    )  # fmt: skip
    reasons = rk.unavailable_reasons(device, case.dtype)
    for choice in ours:
        model = copy.deepcopy(setup.routed)
        runners.append(
            Runner(
                f"ours:{choice}",
                "ours",
                model,
                routed_call(model),
                "ticket_f64",
                _backend_name(choice, device, case.dtype),
                routed=True,
                context=(lambda c=choice: rk.set_backend(c)),
                unavailable=None if choice == "auto" else reasons.get(choice, f"no backend named {choice!r}"),
            )
        )
    return runners


def _loss(case: Case, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if case.family == "inr":
        return F.mse_loss(out, target)
    return F.cross_entropy(out, target)


def _optimizer(r: Runner) -> torch.optim.Optimizer:
    if r.optimizer is None:
        adam = torch.optim.Adam(r.model.parameters(), lr=LEARNING_RATE)
        # Adam alone would move weights outside the batch's tickets through its moments; the wrapper is what a
        # correct routed training step runs.
        r.optimizer = rtl.optim.TicketMaskedOptimizer(adam, r.model) if r.routed else adam
    return r.optimizer


def _infer(r: Runner, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return r.call(x)


def _train(r: Runner, case: Case, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    opt = _optimizer(r)
    opt.zero_grad(set_to_none=True)
    loss = _loss(case, r.call(x), target)
    loss.backward()
    opt.step()
    return loss.detach()


def infer_step(r: Runner, x: torch.Tensor) -> torch.Tensor:
    """One inference call of a runner under its backend (the model must already be in eval mode).

    Args:
        r: the runner.
        x (B, ...): the inputs.

    Returns:
        The model's output (B, ...).

    Example:
        >>> y = infer_step(runners[0], setup.x)
    """
    with r.context():
        return _infer(r, x)


def train_step(r: Runner, case: Case, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One training step of a runner under its backend (the model must already be in train mode): zero_grad,
    forward, loss, backward, optimizer step.

    Args:
        r: the runner.
        case: its case (chooses the loss: cross entropy on labels, MSE on the INR's RGB).
        x (B, ...): the inputs.
        target (B,) int64 labels or (B, 3) RGB.

    Returns:
        The loss (a detached scalar).

    Example:
        >>> train_step(runners[1], case, setup.x, setup.target)
    """
    with r.context():
        return _train(r, case, x, target)


def _checked_output(r: Runner, setup: Setup) -> torch.Tensor:
    """The eval-mode output (S, ...) on the checked samples, the model's mode restored afterwards."""
    was_training = r.model.training
    r.model.eval()
    try:
        return _infer(r, setup.x).index_select(0, setup.check)
    finally:
        r.model.train(was_training)


def make_providers(case: Case, setup: Setup, runners: Sequence[Runner]) -> List[harness.Provider]:
    """The runners as the harness times them: ``infer`` (a no_grad forward) and ``train_step`` per runner."""
    providers = []
    for r in runners:
        steps = {
            "infer": lambda r=r: _infer(r, setup.x),
            "train_step": lambda r=r: _train(r, case, setup.x, setup.target),
        }
        providers.append(
            harness.Provider(
                r.name, r.kind, steps, output=lambda r=r: _checked_output(r, setup), reference=r.reference,
                context=r.context, unavailable=r.unavailable, columns={"backend": r.backend},
            )
        )  # fmt: skip
    return providers


def prepare(case: Case, device: torch.device, args: argparse.Namespace) -> harness.Prepared:
    """The case's models, inputs, providers (one per runner) and float64 references."""
    setup = make_setup(case, device)
    runners = make_runners(case, setup, device, args.backend)

    def enter_mode(mode: str) -> None:
        for r in runners:
            r.model.train(mode == "train_step")  # set once, outside the timed calls

    jaccard = f" (mean Jaccard {setup.jaccard:.2f})" if setup.jaccard else ""
    return harness.Prepared(
        providers=make_providers(case, setup, runners),
        references=float64_references(setup),
        columns=dict(model=case.family, batch=case.batch, input_shape=_shape_text(case.input_shape),
                     prunable_weights=setup.prunable_weights, sparsity_measured=setup.sparsity_measured,
                     mask_structure=case.structure + jaccard, block_occupancy_64=setup.block_occupancy),
        check_columns={"err_samples": f"{setup.check.numel()}/{case.batch}"},
        enter_mode=enter_mode,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ reporting
def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _model_text(case: Case) -> str:
    if case.family == "ghostnet":
        return "GhostNet (CIFAR, num_classes=10)"
    if case.family == "inr":
        return f"FourierINR over a {case.size}x{case.size} image"
    return "torchvision resnet18 (num_classes=10, fc dense)"


def describe(case: Case) -> str:
    return (
        f"{_model_text(case)}; x {tuple(case.input_shape)}, T={case.tickets}, {case.structure} {case.sparsity:.0%}, "
        f"{case.dtype_name}"
    )


def heading(case_rows: Sequence[Dict[str, object]]) -> str:
    """The title of a case's table, from its rows (as measured or as read back from the CSV)."""
    first = case_rows[0]
    return (
        f"### {first['case']}: {first['model']}, x ({first['input_shape'].replace('x', ', ')}), T={first['T']}, "
        f"{int(first['prunable_weights']):,} routed weights, " + harness.masks_text(case_rows, "err_samples", "samples")
    )


BENCHMARK = harness.Benchmark(
    name="models",
    title="routed model benchmark (inference and one training step)",
    fields=FIELDS,
    modes=MODES,
    cases=lambda device_type, args: cpu_cases(args.full) if device_type == "cpu" else gpu_cases(),
    prepare=prepare,
    describe=describe,
    heading=heading,
    legend=[
        '- ms: median (p10–p90) of repeated calls after warm-up. "vs B0" / "vs B1": that baseline\'s median over '
        "this one, same mode (> 1: faster than it). B0: the plain dense model (no masks), plain Adam; B1: the routed "
        "model on the reference backend (per-ticket loop); ours: the routed model on the backend named. Routed "
        "providers train with Adam inside rtl.optim.TicketMaskedOptimizer. infer: eval mode, no_grad forward; "
        "train_step: train mode, zero_grad + forward + loss + backward + step (Adam, lr 1e-4).",
        "- masks: rtl.prune.magnitude_prune_ per ticket on a random importance (scope='layer'); routes balanced "
        "and shuffled. max abs err: eval-mode forward vs float64, per ticket through rtl.extract_ticket for the "
        "routed providers and the dense model for B0; a provider beyond its dtype's tolerance is refused, not timed.",
    ],  # fmt: skip
    quick_note="- **quick run: tiny smoke shapes; times say nothing about the real cases.**",
    table_columns=(("backend", "torch"),),
    tolerance=TOLERANCE,
)


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line: the harness's options plus --backend, --full, --profile, --memory and --out
    (--results-dir).

    Args:
        argv: the arguments (sys.argv[1:] when None).

    Returns:
        The namespace; ``backend`` is a list of choices.

    Example:
        >>> parse_args(["--quick", "--backend", "auto,cpu"]).backend
        ['auto', 'cpu']
    """
    ap = harness.argument_parser(
        "models",
        __doc__.split("\n\n")[0],
        cases_help="comma-separated case names (GPU: with or without _bf16/_fp32) or families (ghostnet, inr, "
        "resnet18)",
        warmup_help="untimed calls first (default 2 CPU, 3 GPU, 1 quick)",
    )
    ap.add_argument("--out", dest="results_dir", type=Path, default=argparse.SUPPRESS,
                    help="the same as --results-dir")  # fmt: skip
    ap.add_argument(
        "--backend", default="auto",
        help="comma-separated backends for the 'ours' providers: auto (default: what rtl picks), cpu, triton, cuda",
    )  # fmt: skip
    ap.add_argument("--full", action="store_true", help="CPU: ResNet-18 at 224x224 (default 64x64 on CPU)")
    ap.add_argument(
        "--profile", action="store_true",
        help="instead of the timing table: per routed layer, the path taken, its inference time against the\n"
        "same layer of the dense model and its share of the model's time (printed and written to\n"
        "<out>/models_profile_<device>_<git rev>.md; nothing is appended to the CSV)",
    )  # fmt: skip
    ap.add_argument(
        "--memory", action="store_true",
        help="instead of the timing table: the peak resident memory of inference, the dense model against the\n"
        "routed one, each in a fresh process (peak_memory.py; written to <out>/models_memory_<device>_<rev>.md)",
    )  # fmt: skip
    args = harness.parse_run_arguments(ap, argv)
    choices = [c.strip().lower() for c in args.backend.split(",") if c.strip()]
    bad = [c for c in choices if c not in OURS_CHOICES]
    if not choices or bad:
        ap.error(f"--backend {args.backend!r}: choose from {', '.join(OURS_CHOICES)} (B1 is the reference backend)")
    args.backend = list(dict.fromkeys(choices))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench models [ARGS]``: measure every selected case (or profile it, or measure its memory).

    Args:
        argv: command-line arguments (sys.argv[1:] when None).

    Returns:
        0.

    Example:
        >>> main(["--quick", "--cases", "inr_u50", "--out", "/tmp/bench"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = harness.run_device(args)
    cases = select_cases(device.type, args.cases, args.quick, full=args.full)
    if args.profile:
        return profile_cases(cases, device, args, argv)
    if args.memory:
        return memory_cases(cases, device, args, argv)
    return harness.run_cases(BENCHMARK, cases, args, argv, device)


def _side_file(kind: str, device: torch.device, args: argparse.Namespace) -> Tuple[Dict[str, str], Path]:
    """The environment record and the markdown path of a --profile or --memory run."""
    results_dir = args.results_dir.resolve()
    env = harness.environment(device, results_dir)
    return env, harness.unused_path(results_dir / f"models_{kind}_{device.type}_{env['git_rev']}.md")


def _side_header(title: str, env: Dict[str, str], argv: Sequence[str]) -> List[str]:
    return [
        f"# {title}, {env['device_kind']}",
        "",
        f"- device: {env['device']}; threads: {env['threads']}; torch {env['torch']}; git {env['git_rev']}, "
        f"{env['timestamp']}",
        f"- command: `{harness.command_text('models', argv)}`",
    ]


def memory_cases(cases: Sequence[Case], device: torch.device, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--memory``: peak resident memory of inference per case, dense against routed (peak_memory.py).

    Returns:
        0.
    """
    from . import peak_memory

    if device.type != "cpu":
        raise SystemExit("--memory measures host memory: run it with --device cpu")
    env, md_path = _side_file("memory", device, args)
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] memory of {case.name}", flush=True)
        rows.append(
            (case.name, {w: peak_memory.measure(case.name, w, args.quick, env_threads(env)) for w in ("dense", "ours")})
        )
    text = "\n".join(
        _side_header("peak memory of inference, dense against routed", env, argv)
        + [
            "- each model in a fresh process: the case built with the timing runs' seeds, the other model dropped and "
            "the set-up's freed memory returned, then the peak resident set (VmHWM, reset first) over 3 no_grad "
            "calls. loaded: resident set before the calls (the process, torch, the model, its masks and inputs); "
            "working: peak minus loaded. Ours compiles its mask layouts on the first call, inside the measurement.",
            "",
            peak_memory.memory_markdown(rows),
        ]
    )
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {md_path}", flush=True)
    return 0


def env_threads(env: Dict[str, str]) -> int:
    """The run's torch thread count as environment() recorded it."""
    return int(env.get("threads") or torch.get_num_threads())


def profile_cases(cases: Sequence[Case], device: torch.device, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--profile``: for each case, the per-layer inference profile of the routed model on the first ``--backend``
    choice against the dense model (layer_profile.py), printed and written to one markdown file.

    Returns:
        0.
    """
    from . import layer_profile

    env, md_path = _side_file("profile", device, args)
    repeats = args.repeats if args.repeats else (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    parts = _side_header("per-layer inference profile of routed models", env, argv) + [
        f"- ms: median of {repeats} calls per model after {warmup} warm-up calls, the dense and the routed model in "
        "turn, timed by forward hooks on each layer; ours: the routed model on the backend "
        f"{args.backend[0]!r}; dense: the same layer of the dense model. path: what the cpu backend ran (dense: "
        "torch's convolution per mask class; image: a masked weight per image; mixed: the direct sparse kernel for "
        "the sparse tickets and torch's convolution for the dense mask classes).",
    ]
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] profiling {case.name}", flush=True)
        setup = make_setup(case, device)
        dense, routed = setup.dense.eval(), setup.routed.eval()
        wrapper = rtl.RoutedModel(routed)

        def run_dense():
            with torch.no_grad():
                return dense(setup.x)

        def run_routed():
            with rk.set_backend(args.backend[0]), torch.no_grad():
                return wrapper(setup.x, setup.route)

        rows, totals = layer_profile.profile_inference(dense, routed, run_dense, run_routed, repeats, warmup)
        text = layer_profile.profile_markdown(
            f"{case.name}: {_model_text(case)}, T={case.tickets}, {case.structure} {case.sparsity:.0%}", rows, totals
        )
        print(text, flush=True)
        parts += ["", text]
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
        setup = dense = routed = wrapper = None  # free this case's tensors now (the closures above hold them)
        rk.clear_layout_cache()
    print(f"wrote {md_path}", flush=True)
    return 0
