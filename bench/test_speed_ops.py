"""pytest-benchmark suite: the routed ops against dense torch (B0) and the naive per-ticket loop (B1).

Run with ``pytest bench/test_speed_ops.py --benchmark-only`` (``RTL_BENCH_SMALL=1`` for a smoke run of seconds).
For every case and mode the three providers run on the same tensors (x, weight, masks, route, bias, grad_y):

- ``B0``: ``F.linear`` / ``F.conv2d`` with the unmasked weight: dense, the speed-of-light reference (it computes
  another function);
- ``B1``: ``rtl_kernels.routed_masked_linear`` / ``routed_masked_conv2d`` on the ``reference`` backend;
- ``ours``: the same op on the ``auto`` backend (its output is checked against B1's before it is timed).

Modes: ``fwd`` (inputs without gradients, so no graph is recorded) and ``fwd+bwd`` (gradients of x, the weight and
the bias where there is one, for a fixed random grad_y, through ``torch.autograd.grad``). The routed providers are
called as a user calls them, with the route alone, so grouping the batch by ticket is part of their time.

Cases (masks: unstructured, an exact count per ticket; routes: balanced, shuffled):

- ``linear_1024_u90`` / ``linear_1024_u50``: W 1024x1024, 2,048 rows, T = 8, 90 % and 50 % (regime B,
  docs/benchmarks.md);
- ``linear_inr_u50``: the INR MLP's hidden layer, 128x128, 65,536 rows (a 256x256 image), T = 10, 50 % (regime A);
- ``conv_ghost_dw3_u50``: GhostNet's cheap depthwise 3x3 (the most frequent depthwise layer, one per Ghost module;
  here B3's, 36 channels at 8x8), batch 320, T = 10, 50 %;
- ``conv_resnet_c64_14_u90``: a ResNet 3x3 conv, C = 64 at 14x14, batch 32, T = 8, 90 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rtl_kernels as rk  # noqa: E402

MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("B0", "B1", "ours")


@dataclass(frozen=True)
class LinearCase:
    """A routed linear layer: x (rows, k), weight (n, k), T tickets at one sparsity."""

    name: str
    rows: int
    n: int
    k: int
    tickets: int
    sparsity: float

    def shrunk(self) -> "LinearCase":
        """The same T and sparsity on a smoke shape (32 rows a ticket, W at most 64x48)."""
        return LinearCase(self.name, 32 * self.tickets, min(self.n, 64), min(self.k, 48), self.tickets, self.sparsity)


@dataclass(frozen=True)
class ConvCase:
    """A routed conv2d layer: x (batch, c_in, size, size), a square kernel, T tickets at one sparsity."""

    name: str
    layer: str
    batch: int
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int
    padding: int
    groups: int
    bias: bool
    tickets: int
    sparsity: float

    def shrunk(self) -> "ConvCase":
        """The same layer kind (kernel, stride, padding, depthwise or not, T, sparsity), 2 images a ticket, at most
        16 input / 8 output channels (8 for a depthwise one) and 8x8 pixels."""
        c_in, c_out, groups = min(self.c_in, 16), min(self.c_out, 8), self.groups
        if groups > 1:  # depthwise stays depthwise
            c_in = c_out = groups = min(self.c_in, 8)
        return ConvCase(self.name, self.layer, 2 * self.tickets, c_in, c_out, min(self.size, 8), self.kernel,
                        self.stride, self.padding, groups, self.bias, self.tickets, self.sparsity)  # fmt: skip


CASES: List[object] = [
    LinearCase("linear_1024_u90", rows=2048, n=1024, k=1024, tickets=8, sparsity=0.9),
    LinearCase("linear_1024_u50", rows=2048, n=1024, k=1024, tickets=8, sparsity=0.5),
    LinearCase("linear_inr_u50", rows=65536, n=128, k=128, tickets=10, sparsity=0.5),
    ConvCase("conv_ghost_dw3_u50", "GhostNet B3 ghost cheap depthwise 3x3, 36 channels", batch=320, c_in=36,
             c_out=36, size=8, kernel=3, stride=1, padding=1, groups=36, bias=False, tickets=10, sparsity=0.5),
    ConvCase("conv_resnet_c64_14_u90", "ResNet 3x3 conv, C=64 at 14x14", batch=32, c_in=64, c_out=64, size=14,
             kernel=3, stride=1, padding=1, groups=1, bias=False, tickets=8, sparsity=0.9),
]  # fmt: skip


@dataclass
class OpInputs:
    """One case's tensors, shared by its three providers, and the two functions they compute."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    masks: torch.Tensor
    route: torch.Tensor
    grad_y: torch.Tensor
    dense: Callable[..., torch.Tensor]  # (x, weight, bias) -> y: B0
    routed: Callable[..., torch.Tensor]  # (x, weight, bias) -> y: B1 and ours
    info: Dict[str, object]


def _linear_inputs(case: LinearCase, device, make_masks, make_route) -> OpInputs:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.rows, case.k, generator=g)
    weight = torch.randn(case.n, case.k, generator=g) / math.sqrt(case.k)
    bias = torch.randn(case.n, generator=g)
    grad_y = torch.randn(case.rows, case.n, generator=g)
    masks = make_masks(case.tickets, (case.n, case.k), case.sparsity, seed=2, device=device)
    route = make_route(case.rows, case.tickets, seed=3, device=device)

    def routed(x, w, b):
        return rk.routed_masked_linear(x, w, masks, route, b)

    info = dict(op="routed_masked_linear", B=case.rows, N=case.n, K=case.k)
    return OpInputs(x.to(device), weight.to(device), bias.to(device), masks, route, grad_y.to(device), F.linear,
                    routed, info)  # fmt: skip


def _conv_inputs(case: ConvCase, device, make_masks, make_route) -> OpInputs:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, case.c_in, case.size, case.size, generator=g).to(device)
    w_shape = (case.c_out, case.c_in // case.groups, case.kernel, case.kernel)
    weight = (torch.randn(w_shape, generator=g) / math.sqrt(math.prod(w_shape[1:]))).to(device)
    bias = torch.randn(case.c_out, generator=g).to(device) if case.bias else None
    masks = make_masks(case.tickets, w_shape, case.sparsity, seed=2, device=device)
    route = make_route(case.batch, case.tickets, seed=3, device=device)
    geometry = dict(stride=case.stride, padding=case.padding, groups=case.groups)

    def dense(x, w, b):
        return F.conv2d(x, w, b, **geometry)

    def routed(x, w, b):
        return rk.routed_masked_conv2d(x, w, masks, route, b, **geometry)

    out_shape = dense(x[:1], weight, bias).shape[1:]
    grad_y = torch.randn(case.batch, *out_shape, generator=g).to(device)
    info = dict(op="routed_masked_conv2d", layer=case.layer, B=case.batch, C_in=case.c_in, C_out=case.c_out,
                H=case.size, W=case.size, kernel=case.kernel, stride=case.stride, padding=case.padding,
                groups=case.groups, bias=case.bias)  # fmt: skip
    return OpInputs(x, weight, bias, masks, route, grad_y, dense, routed, info)


# One case at a time: the tests are ordered case by case, so the three providers (and both modes) of a case reuse
# its tensors, and the previous case's are dropped before the next is built.
_CACHE: Dict[Tuple, OpInputs] = {}


def _inputs(case, small: bool, device, make_masks, make_route) -> OpInputs:
    key = (case.name, small, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        rk.clear_layout_cache()  # the previous case's compiled mask layouts go with its masks
        shape = case.shrunk() if small else case
        build = _linear_inputs if isinstance(case, LinearCase) else _conv_inputs
        inp = build(shape, device, make_masks, make_route)
        inp.info.update(
            T=shape.tickets,
            sparsity=shape.sparsity,
            sparsity_measured=1.0 - inp.masks.float().mean().item(),
            mask_structure="unstructured",
            route="balanced",
        )
        _CACHE[key] = inp
    return _CACHE[key]


PARAMS = [(case, mode, provider) for case in CASES for mode in MODES for provider in PROVIDERS]


@pytest.mark.parametrize("case,mode,provider", PARAMS, ids=[f"{c.name}-{m}-{p}" for c, m, p in PARAMS])
def test_op_speed(benchmark, speed, make_masks, make_route, case, mode, provider):
    """Time one provider of one op case in one mode; ours is first checked against B1."""
    inp = _inputs(case, speed.small, speed.device, make_masks, make_route)
    fn = inp.dense if provider == "B0" else inp.routed
    if mode == "fwd":

        def step():
            return fn(inp.x, inp.weight, inp.bias)

    else:
        # Leaves sharing storage with the plain inputs: the fwd mode keeps using those, so it records no graph.
        leaves = [inp.x.detach().requires_grad_(True), inp.weight.detach().requires_grad_(True)]
        if inp.bias is not None:
            leaves.append(inp.bias.detach().requires_grad_(True))

        def step():
            y = fn(*leaves, *([] if inp.bias is not None else [None]))
            return torch.autograd.grad(y, leaves, inp.grad_y)

    check = provider == "ours"
    speed.run(
        benchmark,
        step,
        provider=provider,
        case=case.name,
        mode=mode,
        info=dict(inp.info),
        dtype=inp.x.dtype,
        output=(lambda: inp.routed(inp.x, inp.weight, inp.bias)) if check else None,
        reference=(lambda: inp.routed(inp.x, inp.weight, inp.bias)) if check else None,
    )
