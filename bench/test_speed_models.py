"""pytest-benchmark suite: whole routed models against the dense model (B0) and the naive per-ticket loop (B1).

Run with ``pytest bench/test_speed_models.py --benchmark-only`` (``RTL_BENCH_SMALL=1`` for a smoke run of seconds).
Each case builds one model, copies it as the dense B0 model (same weights), converts the original with
:func:`rtl.convert_` and gives every routed layer random unstructured masks with exactly the case's sparsity per
ticket and per layer. The three providers then run on the same input and route:

- ``B0``: the dense copy, ``model(x)`` (it computes another function: no masks);
- ``B1``: ``rtl.RoutedModel(model)(x, route)`` with the ``reference`` backend (per-ticket loop in every layer);
- ``ours``: the same routed call on the ``auto`` backend (its output is checked against B1's before it is timed).

Modes: ``fwd`` (eval mode under ``torch.no_grad``: inference) and ``fwd+bwd`` (train mode, gradients of every
parameter for a fixed random grad of the output through ``torch.autograd.grad``). The routed call groups the
batch by ticket once per call and shares it between layers, so that cost is in ours and B1.

Cases (routes balanced and shuffled):

- ``ghostnet_u50`` / ``ghostnet_u90``: the paper's GhostNet on 32x32 CIFAR images, batch 320, T = 10 (one ticket
  per CIFAR-10 class), its pruning scope (every conv but SE) routed; inference;
- ``inr_u50``: the paper's Fourier-feature INR MLP (all five Linear layers routed) over 65,536 pixel rows (a 256x256
  image), T = 10, 50 %; inference and a training step;
- ``resnet18_u90``: torchvision's resnet18 (10 classes, classifier kept dense) at 64x64, batch 16, T = 8, 90 %;
  inference and a training step (skipped without torchvision).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rtl  # noqa: E402
import rtl_kernels as rk  # noqa: E402

PROVIDERS = ("B0", "B1", "ours")


@dataclass(frozen=True)
class ModelCase:
    """One model at one batch, T and sparsity; ``modes`` are the modes timed for it."""

    name: str
    model: str  # 'ghostnet', 'inr' or 'resnet18'
    batch: int
    size: int  # image side (ignored by the INR, whose rows are pixels)
    tickets: int
    sparsity: float
    modes: Tuple[str, ...]
    small_batch: int
    small_size: int


CASES: List[ModelCase] = [
    ModelCase("ghostnet_u50", "ghostnet", batch=320, size=32, tickets=10, sparsity=0.5, modes=("fwd",),
              small_batch=20, small_size=32),
    ModelCase("ghostnet_u90", "ghostnet", batch=320, size=32, tickets=10, sparsity=0.9, modes=("fwd",),
              small_batch=20, small_size=32),
    ModelCase("inr_u50", "inr", batch=65536, size=0, tickets=10, sparsity=0.5, modes=("fwd", "fwd+bwd"),
              small_batch=320, small_size=0),
    ModelCase("resnet18_u90", "resnet18", batch=16, size=64, tickets=8, sparsity=0.9, modes=("fwd", "fwd+bwd"),
              small_batch=8, small_size=32),
]  # fmt: skip


@dataclass
class ModelInputs:
    """One case's dense model, routed model, input, route and output grad, shared by its providers."""

    dense: nn.Module
    routed: rtl.RoutedModel
    x: torch.Tensor
    route: torch.Tensor
    grad_out: torch.Tensor
    info: Dict[str, object]


def _build(name: str) -> Tuple[nn.Module, Optional[Callable[[str, nn.Module], bool]]]:
    """The model (seeded weights) and its pruning scope as a convert_ filter."""
    torch.manual_seed(0)
    if name == "ghostnet":
        from rtl.models import GhostNet

        model = GhostNet(num_classes=10)
        return model, model.prunable_filter
    if name == "inr":
        from rtl.models import FourierINR

        model = FourierINR()
        return model, model.prunable_filter
    torchvision = pytest.importorskip("torchvision")
    # The classifier stays dense, as the paper keeps its classifiers dense.
    return torchvision.models.resnet18(num_classes=10), (lambda name, module: name != "fc")


def _model_inputs(case: ModelCase, small: bool, device, make_masks, make_route) -> ModelInputs:
    batch = case.small_batch if small else case.batch
    size = case.small_size if small else case.size
    model, filter_fn = _build(case.model)
    dense = copy.deepcopy(model).to(device)
    rtl.convert_(model, case.tickets, filter_fn=filter_fn)
    model.to(device)
    layers = list(rtl.routed_modules(model))
    kept = total = 0
    for i, (_, layer) in enumerate(layers):
        masks = make_masks(case.tickets, tuple(layer.weight.shape), case.sparsity, seed=100 + i, device=device)
        layer.weight_masks.copy_(masks)
        kept += int(masks.sum())
        total += masks.numel()
    g = torch.Generator().manual_seed(1)
    if case.model == "inr":
        x = torch.rand(batch, 2, generator=g) * 2 - 1  # pixel coordinates in [-1, 1]^2
    else:
        x = torch.randn(batch, 3, size, size, generator=g)
    x = x.to(device)
    route = make_route(batch, case.tickets, seed=3, device=device)
    with torch.no_grad():
        out_shape = dense.eval()(x[:1]).shape[1:]
    grad_out = torch.randn(batch, *out_shape, generator=g).to(device)
    info = dict(
        model=case.model,
        B=batch,
        input_shape="x".join(str(d) for d in x.shape[1:]),
        T=case.tickets,
        sparsity=case.sparsity,
        sparsity_measured=1.0 - kept / total,
        routed_layers=len(layers),
        routed_weights=sum(layer.weight.numel() for _, layer in layers),
        mask_structure="unstructured, per layer",
        route="balanced",
    )
    return ModelInputs(dense, rtl.RoutedModel(model), x, route, grad_out, info)


# One case at a time (the tests run case by case): its providers and modes share the models and tensors.
_CACHE: Dict[Tuple, ModelInputs] = {}


def _inputs(case: ModelCase, small: bool, device, make_masks, make_route) -> ModelInputs:
    key = (case.name, small, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        rk.clear_layout_cache()
        _CACHE[key] = _model_inputs(case, small, device, make_masks, make_route)
    return _CACHE[key]


PARAMS = [(case, mode, provider) for case in CASES for mode in case.modes for provider in PROVIDERS]


@pytest.mark.parametrize("case,mode,provider", PARAMS, ids=[f"{c.name}-{m}-{p}" for c, m, p in PARAMS])
def test_model_speed(benchmark, speed, make_masks, make_route, case, mode, provider):
    """Time one provider of one model case in one mode; ours is first checked against B1."""
    inp = _inputs(case, speed.small, speed.device, make_masks, make_route)
    train = mode == "fwd+bwd"
    inp.dense.train(train)
    inp.routed.train(train)

    def forward():
        return inp.dense(inp.x) if provider == "B0" else inp.routed(inp.x, inp.route)

    if train:
        params = [p for p in (inp.dense if provider == "B0" else inp.routed).parameters() if p.requires_grad]

        def step():
            return torch.autograd.grad(forward(), params, inp.grad_out)

    else:

        def step():
            with torch.no_grad():
                return forward()

    def routed_output():
        # In eval mode, so batch norm neither uses nor updates batch statistics during the check.
        was_training = inp.routed.training
        inp.routed.eval()
        try:
            return inp.routed(inp.x, inp.route)
        finally:
            inp.routed.train(was_training)

    check = provider == "ours"
    speed.run(
        benchmark,
        step,
        provider=provider,
        case=case.name,
        mode=mode,
        info=dict(inp.info),
        dtype=inp.x.dtype,
        output=routed_output if check else None,
        reference=routed_output if check else None,
    )
