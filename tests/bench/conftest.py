"""Set-up of the benchmark tests: the checkout's ``bench`` package importable, and a runner of ``python -m bench``.

The benchmarks are not installed with rtl; they are the ``bench`` package at the checkout's root, which is put on
the path here (pytest's importlib mode does not add it).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _run_bench(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` from the checkout's root, as people run it; fails the test on a non-zero exit
    unless ``check`` is False."""
    env = dict(os.environ)
    # The test suite's conftest sets TRITON_INTERPRET for the Triton tests; the benchmark should not inherit it.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, (
            f"python -m bench {' '.join(args)} failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture
def run_bench():
    """:func:`_run_bench`, for the tests (a conftest cannot be imported by name under the importlib mode)."""
    return _run_bench
