"""Loading of the compiled extensions, remembering why one could not be loaded."""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

_results = {}


def load(name: str) -> Tuple[Optional[object], Optional[str]]:
    """Import ``rtl_kernels.<name>`` (``_C`` or ``_C_cuda``); return (module, None) or (None, reason)."""
    if name not in _results:
        try:
            _results[name] = (importlib.import_module(f"rtl_kernels.{name}"), None)
        except Exception as exc:  # not built, or built against another torch
            _results[name] = (None, f"rtl_kernels.{name} not loadable ({type(exc).__name__}: {exc})")
    return _results[name]
