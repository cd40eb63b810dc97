"""How the cpu backend chooses a path for each routed call: every threshold in one place, small pure functions.

The thresholds live in :class:`CpuPolicy`; the functions below take the shapes and densities of one call and a
policy, and return the path. The backend reads :func:`current_policy`, which :func:`use_policy` overrides for the
current thread (tests and benchmarks force a path this way)::

    from rtl_kernels.backends.cpu import policy
    with policy.use_policy(conv_path="sparse"):
        y = rtl_kernels.routed_masked_conv2d(x, w, masks, route, padding=1)

Defaults come from measurements on 2-core AMD EPYC VMs (AVX2 and AVX-512), fp32; the measured figures are in
``bench/results`` (``conv2d_cpu_*.md``, ``linear_cpu_*.md``) and ``docs/cpu_backend.md``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

LINEAR_PATHS = ("sparse", "dense")
CONV_PATHS = ("dense", "image", "mixed")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class CpuPolicy:
    """The cpu backend's thresholds.

    Attributes:
        linear_sparse_max_density: a linear ticket with at least ``small_group_rows`` rows in the call takes the
            sparse kernel under this density (the dense path, MKL on W * M_t, above). Env
            RTL_CPU_SPARSE_MAX_DENSITY.
        small_group_rows, small_group_max_density: tickets with fewer rows fill only part of a 64-row tile, so the
            sparse kernel pays only under the lower density. Env RTL_CPU_SMALL_GROUP_MAX_DENSITY.
        conv_sparse_max_density: a conv ticket takes the direct sparse kernel under this density; denser tickets
            run torch's convolution with W * M_t. Env RTL_CPU_CONV_SPARSE_MAX_DENSITY.
        small_conv_sparse_max_density: the same for small calls (batch x output pixels x weight size up to
            small_conv_macs multiply-adds), where torch's convolution per mask class costs more in set-up than the
            sparse kernel loses to its arithmetic.
        small_conv_macs: see small_conv_sparse_max_density. GhostNet's layers at batch 320 do 1-40 M
            multiply-adds, ResNet-18's 3x3 convs at batch 64 and 64x64 inputs 600 M.
        image_weight_limit: small layers (batch x weight size up to this many values) whose tickets are not all
            sparse run as one grouped convolution (or one batched matmul for 1x1 convs) with a masked weight per
            image instead of one convolution per ticket; so do grouped and depthwise convs, where the sparse
            kernel's copies cost more than the few weights it skips.
        linear_path, conv_path: None (choose), or a path to force where it applies: linear "sparse" | "dense";
            conv "dense" (one convolution per mask class) | "image" | "mixed" (sparse kernel for the tickets
            under conv_sparse_max_density, torch's convolution per mask class for the others).
    """

    linear_sparse_max_density: float = _env_float("RTL_CPU_SPARSE_MAX_DENSITY", 0.6)
    small_group_rows: int = 48
    small_group_max_density: float = _env_float("RTL_CPU_SMALL_GROUP_MAX_DENSITY", 0.2)
    conv_sparse_max_density: float = _env_float("RTL_CPU_CONV_SPARSE_MAX_DENSITY", 0.35)
    small_conv_sparse_max_density: float = 0.6
    small_conv_macs: int = 100_000_000
    image_weight_limit: int = 1 << 20
    linear_path: Optional[str] = None
    conv_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.linear_path not in (None,) + LINEAR_PATHS:
            raise ValueError(f"linear_path must be None or one of {LINEAR_PATHS}, got {self.linear_path!r}")
        if self.conv_path not in (None,) + CONV_PATHS:
            raise ValueError(f"conv_path must be None or one of {CONV_PATHS}, got {self.conv_path!r}")

    @property
    def indexed_max_density(self) -> float:
        """Tickets at or above this density never take a sparse kernel: layouts leave them out."""
        if self.linear_path == "sparse" or self.conv_path == "mixed":
            return 1.01
        return max(
            self.linear_sparse_max_density,
            self.small_group_max_density,
            self.conv_sparse_max_density,
            self.small_conv_sparse_max_density,
        )


_DEFAULT = CpuPolicy()
_local = threading.local()


def current_policy() -> CpuPolicy:
    """The policy in force in this thread."""
    return getattr(_local, "policy", _DEFAULT)


class use_policy:
    """Override some of the policy's fields in this thread, as a context manager.

    Example:
        >>> with use_policy(conv_path="mixed", conv_sparse_max_density=1.01):
        ...     pass  # every conv ticket takes the sparse kernel here
    """

    def __init__(self, **changes) -> None:
        self._policy = dataclasses.replace(current_policy(), **changes)

    def __enter__(self) -> CpuPolicy:
        self._previous = getattr(_local, "policy", None)
        _local.policy = self._policy
        return self._policy

    def __exit__(self, *exc) -> bool:
        if self._previous is None:
            del _local.policy
        else:
            _local.policy = self._previous
        return False


# -- linear --------------------------------------------------------------------------------------------------------
def linear_ticket_is_sparse(density: float, rows: int, policy: CpuPolicy) -> bool:
    """Whether a linear ticket keeping ``density`` of the weight, with ``rows`` rows in the call, takes the
    sparse kernel.

    Example:
        >>> p = CpuPolicy()
        >>> linear_ticket_is_sparse(0.1, 2048, p), linear_ticket_is_sparse(0.5, 32, p)
        (True, False)
    """
    if policy.linear_path is not None:
        return policy.linear_path == "sparse"
    limit = policy.linear_sparse_max_density if rows >= policy.small_group_rows else policy.small_group_max_density
    return density < limit


# -- conv ----------------------------------------------------------------------------------------------------------
def small_conv(batch: int, out_pixels: int, weight_numel: int, policy: CpuPolicy) -> bool:
    """Whether a conv call is small: batch x output pixels x weight size up to ``small_conv_macs``.

    Example:
        >>> small_conv(320, 4, 120 * 40, CpuPolicy()), small_conv(64, 256, 64 * 64 * 9, CpuPolicy())
        (True, False)
    """
    return batch * out_pixels * weight_numel <= policy.small_conv_macs


def conv_ticket_is_sparse(density: float, depthwise: bool, small: bool, policy: CpuPolicy) -> bool:
    """Whether a conv ticket keeping ``density`` of the weight takes the direct sparse kernel on the mixed path.

    Depthwise convs (one input channel per group) always do: their kernel reads x and writes y once, as a dense
    depthwise conv does, at any density.

    Example:
        >>> p = CpuPolicy()
        >>> conv_ticket_is_sparse(0.1, False, False, p), conv_ticket_is_sparse(0.5, False, False, p)
        (True, False)
        >>> conv_ticket_is_sparse(0.5, False, True, p)
        True
    """
    limit = policy.small_conv_sparse_max_density if small else policy.conv_sparse_max_density
    return depthwise or density < limit


def conv_path(
    batch: int,
    out_pixels: int,
    weight_numel: int,
    groups: int,
    depthwise: bool,
    class_densities: Sequence[float],
    policy: CpuPolicy,
) -> str:
    """The path of one routed conv call.

    Args:
        batch: B, the images in the call.
        out_pixels: Ho x Wo.
        weight_numel: the shared weight's size.
        groups: the conv's groups.
        depthwise: one input channel per group.
        class_densities: the density of each mask class present in the batch (tickets with identical masks form
            one class).
        policy: the thresholds.

    Returns:
        "dense": one torch convolution of the whole batch with the one class's masked weight;
        "image": one torch convolution (grouped over the batch) with a masked weight per image;
        "mixed": the sparse kernel for the sparse tickets, one torch convolution per dense class.

    Example:
        >>> p = CpuPolicy()
        >>> conv_path(64, 256, 36864, 1, False, [1.0], p), conv_path(64, 256, 36864, 1, False, [0.1, 0.1], p)
        ('dense', 'mixed')
    """
    if policy.conv_path is not None:
        return policy.conv_path
    small = small_conv(batch, out_pixels, weight_numel, policy)
    sparse = [conv_ticket_is_sparse(d, False, small, policy) for d in class_densities]
    if len(class_densities) == 1 and not sparse[0]:  # one dense mask in the batch: one convolution, as dense
        return "dense"
    if depthwise:
        return "mixed"
    if batch * weight_numel <= policy.image_weight_limit and (groups > 1 or not all(sparse)):
        return "image"
    return "mixed"
