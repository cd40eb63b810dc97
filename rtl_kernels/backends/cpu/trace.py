"""What the cpu backend did in each routed call, for the profiler (``python -m bench models --profile``) and the tests.

Off by default, and then a call pays one thread-local lookup::

    from rtl_kernels.backends.cpu import trace
    with trace.record_calls() as calls:
        model(x)
    calls[0]  # {'op': 'conv2d_forward', 'path': 'mixed', 'sparse_tickets': 8, 'dense_classes': 0, ...}
"""

from __future__ import annotations

import threading
from typing import List

_local = threading.local()


class record_calls:
    """Collect one dict per routed call made by this thread inside the block (nested blocks each get all)."""

    def __enter__(self) -> List[dict]:
        self.calls: List[dict] = []
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self.calls)
        return self.calls

    def __exit__(self, *exc) -> bool:
        _local.stack.remove(self.calls)
        return False


def active() -> bool:
    """Whether a record_calls block is open in this thread."""
    return bool(getattr(_local, "stack", None))


def record(**info) -> None:
    """Append info to every open record_calls block of this thread."""
    for calls in getattr(_local, "stack", ()):
        calls.append(dict(info))
