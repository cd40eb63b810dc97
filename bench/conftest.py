"""Set-up shared by the pytest-benchmark suites under bench/ (test_speed_ops.py, test_speed_models.py).

Run them with ``pytest bench/ --benchmark-only`` (they are not part of ``make test``: the pytest settings in
pyproject.toml collect only tests/). Every case is timed for three providers on the very same tensors: ``B0`` (dense
torch, the unmasked weights), ``B1`` (the routed computation on rtl_kernels' ``reference`` backend, the naive
per-ticket loop) and ``ours`` (the routed computation on the ``auto`` backend). Each benchmark's ``group`` is its
case and mode, so pytest-benchmark's table puts the three providers of one case side by side.

What lives here:

- the environment knobs: ``RTL_BENCH_SMALL=1`` shrinks every shape so a smoke run takes seconds (and times say
  nothing then); ``RTL_BENCH_DEVICE=cpu|cuda`` (default cpu); ``RTL_BENCH_THREADS=N`` (default: all cores, one
  thread for a small run, so a smoke run does not take cores from someone timing);
- the ``speed`` fixture, which warms a provider up, checks its output against B1's where both compute the routed
  function, times it and fills ``benchmark.group`` / ``benchmark.extra_info``;
- the speed-up of ours over B0 and B1: printed as a table at the end of the session and written into each
  benchmark's ``extra_info`` (``ratio_vs_B0``, ``ratio_vs_B1``) when ``--benchmark-json`` / ``--benchmark-save``
  writes a JSON file. The ratios are the baseline's median over the provider's (> 1: faster than the baseline).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, List, Optional

import pytest
import torch

PROVIDERS = ("B0", "B1", "ours")
# The rtl_kernels backend each routed provider runs on; B0 is plain torch and needs none.
PROVIDER_BACKEND = {"B1": "reference", "ours": "auto"}
# Output check of a routed provider against B1, relative to the largest |output|: a row run through a wrong ticket
# is off by O(1) of that, float32 rounding of these shapes by about 1e-6.
REL_TOLERANCE = 1e-3

_RECORDS = pytest.StashKey[List[Dict[str, object]]]()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _env_threads() -> Optional[int]:
    text = os.environ.get("RTL_BENCH_THREADS", "").strip()
    if not text:
        return 1 if _env_flag("RTL_BENCH_SMALL") else None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise pytest.UsageError(f"RTL_BENCH_THREADS must be an int >= 1, got {text!r}")
    return threads


def _env_device() -> torch.device:
    name = os.environ.get("RTL_BENCH_DEVICE", "cpu").strip().lower() or "cpu"
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"RTL_BENCH_DEVICE must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("RTL_BENCH_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def pytest_configure(config):
    config.stash[_RECORDS] = []
    _env_device()  # a bad RTL_BENCH_DEVICE stops the session now, not in the first test
    threads = _env_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def pytest_report_header(config):
    text = f"rtl bench: device {_env_device()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if _env_flag("RTL_BENCH_SMALL"):
        text += " [RTL_BENCH_SMALL: smoke shapes, times say nothing about the real cases]"
    return text


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def small() -> bool:
    """True under RTL_BENCH_SMALL=1: the suites build their cases on tiny shapes."""
    return _env_flag("RTL_BENCH_SMALL")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device of every case (RTL_BENCH_DEVICE, default cpu)."""
    return _env_device()


def unstructured_masks(num_tickets: int, shape, sparsity: float, seed: int, device=None) -> torch.Tensor:
    """(num_tickets, *shape) bool masks, each ticket keeping exactly round((1 - sparsity) * numel) weights at random.

    Tickets are drawn independently (as separate pruning runs would give), so they overlap only by chance.

    Args:
        num_tickets: T.
        shape: the weight's shape.
        sparsity: fraction of each ticket's weights pruned, in [0, 1].
        seed: the masks are drawn on CPU from this seed, so every device gets the same ones.
        device: where the masks go.

    Returns:
        masks (T, *shape) bool.

    Example:
        >>> unstructured_masks(3, (4, 5), 0.5, seed=0).sum((1, 2))
        tensor([10, 10, 10])
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    numel = math.prod(shape)
    keep = int(round((1.0 - sparsity) * numel))
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_tickets, numel, dtype=torch.bool)
    for t in range(num_tickets):
        masks[t, torch.randperm(numel, generator=g)[:keep]] = True
    return masks.view(num_tickets, *shape).to(device)


def balanced_route(batch: int, num_tickets: int, seed: int, device=None) -> torch.Tensor:
    """(batch,) int64 route holding every ticket batch // T or batch // T + 1 times, in random order.

    Balanced so that no ticket's share, and with it the timing, depends on the draw.

    Example:
        >>> torch.bincount(balanced_route(10, 3, seed=0))
        tensor([4, 3, 3])
    """
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(batch, generator=g) % num_tickets).to(device)


@pytest.fixture(scope="session")
def make_masks() -> Callable[..., torch.Tensor]:
    """:func:`unstructured_masks`, for the suites (a conftest cannot be imported by name)."""
    return unstructured_masks


@pytest.fixture(scope="session")
def make_route() -> Callable[..., torch.Tensor]:
    """:func:`balanced_route`, for the suites."""
    return balanced_route


class SpeedRunner:
    """Times one provider of one case with pytest-benchmark and records what the ratio table needs.

    Args:
        config: the pytest config (the records live in its stash).
        small: whether the shapes are the smoke ones (few rounds then).
        device: the case's device.

    Example:
        >>> def test_linear(benchmark, speed):  # ``speed`` is this class, made per test by the fixture
        ...     speed.run(benchmark, lambda: F.linear(x, w), provider="B0", case="linear", mode="fwd", info={})
    """

    def __init__(self, config, small: bool, device: torch.device) -> None:
        self._config = config
        self.small = small
        self.device = device

    def context(self, provider: str):
        """The backend choice a provider runs under (a no-op context for B0).

        Example:
            >>> with speed.context("B1"):  # rtl_kernels.set_backend("reference") inside
            ...     y = rtl_kernels.routed_masked_linear(x, w, masks, route)
        """
        import rtl_kernels

        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        backend = PROVIDER_BACKEND.get(provider)
        return rtl_kernels.set_backend(backend) if backend else contextlib.nullcontext()

    def backend_name(self, provider: str, dtype: torch.dtype) -> str:
        """The rtl_kernels backend that runs the provider's routed ops ('' for B0).

        Example:
            >>> speed.backend_name("ours", torch.float32)  # on a CPU with the extension built
            'cpu'
        """
        from rtl_kernels.backends import get_backend_module, select_backend

        if provider == "B0":
            return ""
        if PROVIDER_BACKEND[provider] == "auto":
            with self.context(provider):
                return select_backend(self.device, dtype).name
        return get_backend_module(PROVIDER_BACKEND[provider]).name

    def run(
        self,
        benchmark,
        step: Callable[[], object],
        *,
        provider: str,
        case: str,
        mode: str,
        info: Dict[str, object],
        dtype: torch.dtype = torch.float32,
        output: Optional[Callable[[], torch.Tensor]] = None,
        reference: Optional[Callable[[], torch.Tensor]] = None,
    ) -> None:
        """Warm up, check, then time ``step`` for one provider; fill the benchmark's group and extra_info.

        Args:
            benchmark: pytest-benchmark's fixture.
            step: one call of the provider in this mode (forward, or forward + backward); run under the
                provider's backend here, so it need not set one.
            provider: 'B0', 'B1' or 'ours'.
            case: the case's name; the group is ``"<case> <mode>"``.
            mode: 'fwd' or 'fwd+bwd'.
            info: the case's metadata (shapes, T, sparsity, ...), copied into extra_info.
            dtype: the case's dtype (which backend ``auto`` picks depends on it).
            output: computes the provider's forward output (B, ...) once, outside the timed region, for the check.
            reference: computes B1's forward output (same shape), the routed function on the reference backend.
                With ``output``, the provider must match it to REL_TOLERANCE of its largest |value|; the max
                difference goes to extra_info as ``max_abs_err_vs_B1``.

        Example:
            >>> speed.run(benchmark, step, provider="ours", case="linear_1024_u90", mode="fwd", info={"T": 8},
            ...           output=forward, reference=forward)
        """
        benchmark.group = f"{case} {mode}"
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(
            provider=provider,
            dtype=str(dtype).replace("torch.", ""),
            case=case,
            mode=mode,
            backend=self.backend_name(provider, dtype),
            device=str(self.device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            small=self.small,
        )
        if output is not None and reference is not None:
            with torch.no_grad():
                with self.context(provider):
                    got = output()
                with self.context("B1"):
                    want = reference()
            err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
            scale = want.double().abs().max().item() if want.numel() else 0.0
            benchmark.extra_info["max_abs_err_vs_B1"] = err
            assert err <= REL_TOLERANCE * max(scale, 1e-12), (
                f"{provider} on {case}: output differs from B1 (reference backend) by {err:.3g}, "
                f"largest |output| {scale:.3g}"
            )

        def timed():
            with self.context(provider):
                step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        # Warm-up outside the timing: layout compilation, allocator growth and thread start-up are paid once by a
        # training loop, not per step (pytest-benchmark's own warm-up is off by default on CPython).
        timed()
        if self.small:
            benchmark.pedantic(timed, rounds=3, warmup_rounds=0, iterations=1)
        else:
            benchmark(timed)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.data:
            self._config.stash[_RECORDS].append(
                dict(group=benchmark.group, case=case, mode=mode, provider=provider, median_s=stats.stats.median)
            )


@pytest.fixture
def speed(request, small, bench_device) -> SpeedRunner:
    """A :class:`SpeedRunner` for this test (see its ``run``)."""
    return SpeedRunner(request.config, small, bench_device)


# --------------------------------------------------------------------------------------------------------- ratios
def speedups(medians: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Ours's speed-up over B0 and B1 from the providers' medians of one group (None where one is missing).

    Example:
        >>> speedups({"B0": 2.0, "B1": 6.0, "ours": 1.0})
        {'ratio_vs_B0': 2.0, 'ratio_vs_B1': 6.0}
    """
    mine = medians.get("ours")
    out: Dict[str, Optional[float]] = {}
    for against in ("B0", "B1"):
        other = medians.get(against)
        out[f"ratio_vs_{against}"] = other / mine if other and mine else None
    return out


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Every benchmark in the saved JSON gets its ratio_vs_B0 / ratio_vs_B1 (baseline median over its own)."""
    by_group: Dict[str, Dict[str, float]] = {}
    for bench in output_json.get("benchmarks", []):
        provider = bench.get("extra_info", {}).get("provider")
        median = bench.get("stats", {}).get("median")
        if provider and median:
            by_group.setdefault(bench.get("group"), {})[provider] = median
    for bench in output_json.get("benchmarks", []):
        medians = by_group.get(bench.get("group"), {})
        median = bench.get("stats", {}).get("median")
        for against in ("B0", "B1"):
            other = medians.get(against)
            bench.setdefault("extra_info", {})[f"ratio_vs_{against}"] = other / median if other and median else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(_RECORDS, [])
    if not records:
        return
    groups: Dict[str, Dict[str, float]] = {}
    for r in records:
        groups.setdefault(r["group"], {})[r["provider"]] = r["median_s"]
    tr = terminalreporter
    tr.write_sep("-", "rtl: speed-up of ours (median of B0 or B1 / median of ours; > 1: ours is faster)")
    width = max(len(g) for g in groups)
    tr.write_line(f"{'case mode':<{width}}  {'B0 ms':>9}  {'B1 ms':>9}  {'ours ms':>9}  {'vs B0':>7}  {'vs B1':>7}")

    def ms(value):
        return f"{value * 1e3:9.3f}" if value else f"{'-':>9}"

    def ratio(value):
        return f"{value:6.2f}x" if value else f"{'-':>7}"

    for group, medians in groups.items():
        r = speedups(medians)
        tr.write_line(
            f"{group:<{width}}  {ms(medians.get('B0'))}  {ms(medians.get('B1'))}  {ms(medians.get('ours'))}  "
            f"{ratio(r['ratio_vs_B0'])}  {ratio(r['ratio_vs_B1'])}"
        )
    if _env_flag("RTL_BENCH_SMALL"):
        tr.write_line("RTL_BENCH_SMALL: smoke shapes; these ratios say nothing about the real cases.")
