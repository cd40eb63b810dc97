"""Backend registry and choice.

``RTL_BACKEND=auto|reference|cpu|triton|cuda`` sets the process default; :func:`set_default_backend` changes it.
:func:`set_backend` makes a choice for the calling thread (its context: an asyncio task's, or a thread's) alone,
as a call or as a context manager that restores the thread's previous choice; other threads keep theirs. The
gradients of an op run on the backend chosen where its forward ran, whichever thread autograd runs them in.
``auto`` takes the fastest backend that can run on the tensors' device and dtype, and warns once when it has to fall
back from the preferred one. An explicitly chosen backend that cannot run raises, listing every backend's reason.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import threading
import warnings
from typing import Dict, List, Optional

import torch

from .base import Backend

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKEND_NAMES
_MODULES = {name: f"rtl_kernels.backends.{name}" for name in BACKEND_NAMES}
# Preference order of `auto` per device type: hand-written kernels first, the reference loop last.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

_lock = threading.Lock()
_loaded: Dict[str, Backend] = {}
_warned = set()


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name.lower()


_default = [_validate_name(os.environ.get("RTL_BACKEND", "auto") or "auto")]
# The calling context's own choice (None: the process default). A ContextVar, not a global, so that a thread's
# `with set_backend(...)` is invisible to the others and blocks that exit interleaved restore each their own.
_choice: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("rtl_kernels_backend", default=None)


def get_backend_module(name: str) -> Backend:
    """The backend object of that name (imported on first use: ``import rtl_kernels`` stays lean)."""
    name = _validate_name(name)
    with _lock:
        if name not in _loaded:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        return _loaded[name]


def get_backend() -> str:
    """The calling thread's choice: 'auto' or a backend name (the process default unless the thread chose one)."""
    choice = _choice.get()
    return _default[0] if choice is None else choice


def set_default_backend(name: str) -> None:
    """Set the process default: the choice of every thread that has not made its own with :class:`set_backend`.

    Args:
        name: 'auto', 'reference', 'cpu', 'triton' or 'cuda'.
    """
    _default[0] = _validate_name(name)


class set_backend:
    """Choose the backend of every routed op in the calling thread: ``set_backend('cpu')`` or
    ``with set_backend('reference'): ...`` (restores the thread's previous choice on exit). Other threads are not
    affected; :func:`set_default_backend` sets the process-wide default.

    Args:
        name: 'auto', 'reference', 'cpu', 'triton' or 'cuda'.
    """

    def __init__(self, name: str):
        self._token = _choice.set(_validate_name(name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            _choice.reset(self._token)
        except ValueError:  # the block is left in another context than it was entered: clear this one's choice
            _choice.set(None)
        return False


def unavailable_reasons(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """For every backend: None if it can run on (device, dtype), else why not."""
    reasons = {}
    for name in BACKEND_NAMES:
        try:
            reasons[name] = get_backend_module(name).unavailable_reason(torch.device(device), dtype)
        except Exception as exc:  # a backend that fails to import is unavailable, not fatal
            reasons[name] = f"failed to load: {exc}"
    return reasons


def available_backends(device="cpu", dtype: torch.dtype = torch.float32) -> List[str]:
    """Names of the backends that can run on that device and dtype."""
    return [n for n, r in unavailable_reasons(device, dtype).items() if r is None]


def select_backend(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that will run an op on tensors of that device and dtype."""
    choice = get_backend()
    if choice != "auto":
        backend = get_backend_module(choice)
        reason = backend.unavailable_reason(device, dtype)
        if reason is not None:
            listing = "; ".join(f"{n}: {r or 'available'}" for n, r in unavailable_reasons(device, dtype).items())
            raise RuntimeError(
                f"backend {choice!r} cannot run on device {device} with dtype {dtype}: {reason}. "
                f"Backends here: {listing}"
            )
        return backend
    order = _AUTO_ORDER.get(device.type, ("reference",))
    skipped = []
    for name in order:
        try:
            backend = get_backend_module(name)
            reason = backend.unavailable_reason(device, dtype)
        except Exception as exc:
            reason = f"failed to load: {exc}"
        if reason is None:
            if skipped:
                key = (device.type, dtype, name)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"rtl_kernels: auto backend uses {name!r} for {device.type}/{dtype} "
                        f"because {'; '.join(skipped)}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return backend
        skipped.append(f"{name} is unavailable ({reason})")
    raise RuntimeError(f"no rtl_kernels backend can run on {device} with {dtype}: {'; '.join(skipped)}")


def register_autograd_on_forward_backend(op, backward, setup_context) -> None:
    """``op.register_autograd`` with the backward run on the backend choice that was current when the forward ran
    (autograd may run it in another thread, which has its own choice, or after the ``with`` block has closed)."""

    def setup(ctx, inputs, output):
        ctx.rtl_backend = get_backend()
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        with set_backend(ctx.rtl_backend):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)
