"""Backends under test, inputs and the float64 oracles shared by the rtl_kernels tests.

A contract test takes a ``target``: one backend of the registry and the device its tensors live on. Marked
``contract(...)``, it runs once per target, per dtype that target computes in and per case of that target's list
(the Triton interpreter gets a shorter list: it is slow). GPU targets carry the ``gpu`` marker and skip without CUDA.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import zlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import rtl_kernels as rk
from rtl_kernels.backends import BACKEND_NAMES, get_backend_module

LOW_PRECISION = (torch.float16, torch.bfloat16)
# float32 results must be this close to float64, relative to the largest float64 value (at least 1).
FLOAT_TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
_DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# Where each backend of the registry is tested; a backend added to the registry must be added here.
_DEVICES = {"reference": ("cpu",), "cpu": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",)}
assert set(_DEVICES) == set(BACKEND_NAMES), f"backends without a test device: {set(BACKEND_NAMES) ^ set(_DEVICES)}"

# The cpu backend's conv paths (rtl_kernels.backends.cpu.policy), each forced through the public override: "dense"
# runs torch's convolution per mask class; "image" a masked weight per image; "sparse" the direct sparse kernel for
# every ticket; "split" the sparse kernel for tickets under half density and torch's convolution for the others.
CPU_CONV_PATHS = {
    "dense": dict(conv_path="dense"),
    "image": dict(conv_path="image"),
    "sparse": dict(conv_path="mixed", conv_sparse_max_density=1.01),
    "split": dict(conv_path="mixed", conv_sparse_max_density=0.5),
}


def _registry_reason(backend: str, device: str, dtype: torch.dtype = torch.float32) -> Optional[str]:
    try:
        return get_backend_module(backend).unavailable_reason(torch.device(device), dtype)
    except Exception as exc:  # a backend that fails to load is unavailable, as in the registry
        return f"failed to load: {exc}"


@dataclasses.dataclass(frozen=True)
class Target:
    """A backend run on tensors of one device; ``conv_path`` forces one of the cpu backend's conv paths."""

    backend: str
    device: str
    low_precision: tuple = ()
    conv_path: Optional[str] = None

    @property
    def id(self) -> str:
        name = self.backend if self.backend != "triton" else f"triton_{self.device}"
        return name if self.conv_path is None else f"{name}_{self.conv_path}"

    @property
    def interpreted(self) -> bool:
        """Triton on CPU runs under its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)."""
        return self.backend == "triton" and self.device == "cpu"

    @property
    def marks(self) -> list:
        if self.device == "cuda":
            marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
            reason = _registry_reason(self.backend, self.device) if torch.cuda.is_available() else None
        else:
            marks, reason = [], _registry_reason(self.backend, self.device)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=f"{self.backend} on {self.device}: {reason}"))
        return marks

    def as_reference(self) -> "Target":
        """The reference backend on this target's device: torch's own computation, in any dtype."""
        return Target("reference", self.device)

    @contextlib.contextmanager
    def selected(self):
        """Every routed op in the block runs on this target's backend (and forced conv path)."""
        with rk.set_backend(self.backend):
            if self.conv_path is None:
                yield self
                return
            from rtl_kernels.backends.cpu import policy

            with policy.use_policy(**CPU_CONV_PATHS[self.conv_path]):
                yield self

    def put(self, *tensors, dtype: Optional[torch.dtype] = None) -> list:
        """The tensors on this target's device; floating ones in ``dtype`` when given (None stays None)."""
        out = []
        for t in tensors:
            if t is None:
                out.append(None)
            elif t.is_floating_point() and dtype is not None:
                out.append(t.to(device=self.device, dtype=dtype))
            else:
                out.append(t.to(self.device))
        return out


def _low_precision(backend: str, device: str) -> tuple:
    if backend == "reference":
        return ()  # torch's own computation: the yardstick of the low-precision checks, not a subject
    if device == "cuda":
        return LOW_PRECISION
    return tuple(d for d in LOW_PRECISION if _registry_reason(backend, device, d) is None)


TARGETS = [Target(b, d, _low_precision(b, d)) for b in BACKEND_NAMES for d in _DEVICES[b]]
CPU_PATH_TARGETS = [Target("cpu", "cpu", conv_path=path) for path in CPU_CONV_PATHS]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "contract(cases=, interpreted_cases=, cpu_path_cases=, dtypes=, targets=): run once per backend target "
        "(see tests/rtl_kernels/conftest.py)",
    )


def _dtypes_of(target: Target, dtypes) -> tuple:
    if dtypes == "float32":
        return (torch.float32,)
    if dtypes == "all":
        return (torch.float32,) + target.low_precision
    if dtypes == "low":
        return target.low_precision
    return tuple(dtypes)


def pytest_generate_tests(metafunc):
    """Parametrise ``target`` (and ``dtype``, ``case`` when the test takes them) from the ``contract`` marker.

    cases: {id: case} for every target; interpreted_cases: the Triton interpreter's list (default: cases);
    cpu_path_cases: given, the cpu backend also runs with each conv path forced, on that list; dtypes: "float32"
    (default), "all" (float32 and the target's low precisions), "low", or a tuple; targets: a predicate on Target.
    """
    if "target" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("contract")
    opts = dict(marker.kwargs) if marker is not None else {}
    targets = list(TARGETS)
    if "cpu_path_cases" in opts:
        targets += CPU_PATH_TARGETS
    if opts.get("targets") is not None:
        targets = [t for t in targets if opts["targets"](t)]
    names = ["target"] + [n for n in ("dtype", "case") if n in metafunc.fixturenames]
    params = []
    for target in targets:
        dtypes = _dtypes_of(target, opts.get("dtypes", "float32")) if "dtype" in names else (None,)
        if "case" not in names:
            cases = {None: None}
        elif target.conv_path is not None:
            cases = opts["cpu_path_cases"]
        elif target.interpreted:
            cases = opts.get("interpreted_cases", opts["cases"])
        else:
            cases = opts["cases"]
        for dtype in dtypes:
            for case_id, case in cases.items():
                values = [target] + ([dtype] if "dtype" in names else []) + ([case] if "case" in names else [])
                ids = (
                    [target.id]
                    + ([_DTYPE_IDS[dtype]] if "dtype" in names else [])
                    + ([str(case_id)] * (case_id is not None))
                )
                params.append(pytest.param(*values, id="-".join(ids), marks=target.marks))
    metafunc.parametrize(names, params)


# -- inputs ---------------------------------------------------------------------------------------------------------


def make_route(kind: str, batch: int, tickets: int, gen: torch.Generator) -> torch.Tensor:
    """route (B,): "random"; "skewed" (most rows on ticket 0, every 7th on the last); "empty_tickets" (even tickets
    only: the odd ones get no rows); "one_ticket" (every row on the last ticket)."""
    if kind == "random":
        return torch.randint(0, tickets, (batch,), generator=gen)
    if kind == "one_ticket":
        return torch.full((batch,), tickets - 1, dtype=torch.int64)
    if kind == "skewed":
        route = torch.zeros(batch, dtype=torch.int64)
        route[::7] = tickets - 1
        return route
    if kind == "empty_tickets":
        return (torch.randint(0, (tickets + 1) // 2, (batch,), generator=gen) * 2).clamp(max=tickets - 1)
    raise ValueError(kind)


def make_masks(tickets: int, shape: tuple, density, gen: torch.Generator) -> torch.Tensor:
    """bool (T, *shape). density: one for every ticket, a sequence of T, or "blocks" (64x64 blocks of the first two
    dims all kept, all pruned or thinned: the block kernels' full, skipped and partial blocks side by side)."""
    if density == "blocks":
        n, k = shape[0], shape[1]
        grid = torch.rand(tickets, -(-n // 64), -(-k // 64), generator=gen)

        def up(m):
            return m.repeat_interleave(64, 1).repeat_interleave(64, 2)[:, :n, :k]

        thin = torch.rand(tickets, *shape, generator=gen) < 0.5
        return up(grid < 0.6) & ~(up(grid < 0.2) & thin)
    density = torch.as_tensor(density, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
    return torch.rand(tickets, *shape, generator=gen) < density


def _linear_case(batch, n, k, tickets, density, seed=0, dtype=torch.float32, *, routing="random", bias=True):
    """x (B, K), weight (N, K) scaled by 1/sqrt(K), masks (T, N, K), route (B,), bias (N,) or None, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / max(k, 1) ** 0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    masks = make_masks(tickets, (n, k), density, gen)
    route = make_route(routing, batch, tickets, gen)
    return x.to(dtype), w.to(dtype), masks, route, None if b is None else b.to(dtype)


def _conv_case(
    batch,
    c,
    o,
    hw,
    kernel,
    tickets,
    density,
    seed=0,
    dtype=torch.float32,
    *,
    groups=1,
    transposed=False,
    routing="random",
    bias=True,
):
    """x (B, C, H, W), weight (O, C // g, kh, kw) or, transposed, (C, O // g, kh, kw), scaled by 1/sqrt(fan-in),
    masks (T, *weight.shape), route (B,), bias (O,) or None, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    wshape = (c, o // groups, *kernel) if transposed else (o, c // groups, *kernel)
    x = torch.randn(batch, c, *hw, generator=gen, dtype=torch.float64)
    fan_in = wshape[1] * kernel[0] * kernel[1]
    w = torch.randn(*wshape, generator=gen, dtype=torch.float64) / fan_in**0.5
    b = torch.randn(o, generator=gen, dtype=torch.float64) if bias else None
    masks = make_masks(tickets, wshape, density, gen)
    route = make_route(routing, batch, tickets, gen)
    return x.to(dtype), w.to(dtype), masks, route, None if b is None else b.to(dtype)


@pytest.fixture
def linear_case():
    """``linear_case(batch, n, k, tickets, density, seed=0, dtype=float32, *, routing="random", bias=True)
    -> (x, weight, masks, route, bias)``."""
    return _linear_case


@pytest.fixture
def conv_case():
    """``conv_case(batch, c, o, (h, w), (kh, kw), tickets, density, seed=0, dtype=float32, *, groups=1,
    transposed=False, routing="random", bias=True) -> (x, weight, masks, route, bias)``."""
    return _conv_case


@pytest.fixture
def seed(request) -> int:
    """A seed of its own for every test case, the same in every process (str hashing is salted per process)."""
    return zlib.crc32(request.node.name.encode())


# -- float64 oracles ------------------------------------------------------------------------------------------------

Float64 = collections.namedtuple("Float64", "y dx dweight dbias")


def _with_grads(fn, x, weight, bias, grad_y) -> Float64:
    leaves = [
        None if t is None else t.detach().cpu().double().requires_grad_(grad_y is not None) for t in (x, weight, bias)
    ]
    y = fn(*leaves)
    if grad_y is None:
        return Float64(y.detach(), None, None, None)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, grad_y.detach().cpu().double()))
    dx, dw, db = (None if t is None else next(grads) for t in leaves)
    return Float64(y.detach(), dx, dw, db)


def _linear_oracle(x, weight, masks, route, bias, grad_y=None) -> Float64:
    """float64 y[i] = x[i] @ (W * M[route[i]]).T + b, each row with its ticket's masked weight; with grad_y, the
    gradients of (y * grad_y).sum() by autograd. On CPU, whatever the inputs' device."""
    masks, route = masks.cpu(), route.cpu()
    tickets = torch.unique(route).tolist()

    def fn(xd, wd, bd):
        rows = [(route == t).nonzero().flatten() for t in tickets]
        parts = [xd[r] @ (wd * masks[t].double()).T for t, r in zip(tickets, rows)]
        y = xd.new_zeros((xd.shape[0], wd.shape[0]))
        if parts:
            y = y.index_copy(0, torch.cat(rows), torch.cat(parts))
        return y if bd is None else y + bd

    return _with_grads(fn, x, weight, bias, grad_y)


def _conv_oracle(x, weight, masks, route, bias, grad_y=None, *, transposed=False, **geometry) -> Float64:
    """float64 F.conv2d (or F.conv_transpose2d) image by image with that image's masked weight; with grad_y, the
    gradients of (y * grad_y).sum() by autograd. On CPU, whatever the inputs' device."""
    masks, route = masks.cpu(), route.cpu()
    conv = F.conv_transpose2d if transposed else F.conv2d

    def fn(xd, wd, bd):
        images = [conv(xd[i : i + 1], wd * masks[int(route[i])].double(), bd, **geometry) for i in range(len(xd))]
        return torch.cat(images)

    return _with_grads(fn, x, weight, bias, grad_y)


@pytest.fixture
def linear_oracle():
    """``linear_oracle(x, weight, masks, route, bias, grad_y=None) -> Float64(y, dx, dweight, dbias)``."""
    return _linear_oracle


@pytest.fixture
def conv_oracle():
    """``conv_oracle(x, weight, masks, route, bias, grad_y=None, *, transposed=False, **geometry) -> Float64``."""
    return _conv_oracle


def outside_present_masks(masks: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """bool (weight shape): the weights that no ticket present in route keeps (dW must be exactly zero there)."""
    masks, route = masks.cpu(), route.cpu()
    return ~masks[torch.unique(route)].any(0)


def _max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.detach().cpu().double() - exact).abs().max().item() if exact.numel() else 0.0


def _check_float64(got, exact, what: str, torch_low=None) -> None:
    """got against the float64 ``exact``: float32/float64 within FLOAT_TOLERANCE of the largest value; float16 and
    bfloat16 finite and within twice the error of ``torch_low``, torch's own result in that dtype."""
    if exact is None:
        assert got is None, f"{what}: expected None"
        return
    assert tuple(got.shape) == tuple(exact.shape), f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    err = _max_error(got, exact)
    if got.dtype in FLOAT_TOLERANCE:
        scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
        assert err <= FLOAT_TOLERANCE[got.dtype] * scale, f"{what}: error {err:.3g} vs float64 (scale {scale:.3g})"
        return
    assert torch_low is not None, f"{what}: a {got.dtype} result needs torch's own result to compare with"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values in {got.dtype}"
    torch_err = _max_error(torch_low, exact)
    assert err <= 2 * torch_err, f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} in {got.dtype}"


@pytest.fixture
def check_float64():
    """``check_float64(got, exact, what, torch_low=None)``: the per-dtype tolerance of every contract test."""
    return _check_float64


@pytest.fixture
def zero_outside():
    """``zero_outside(masks, route) -> bool mask`` of the weights no present ticket keeps."""
    return outside_present_masks
