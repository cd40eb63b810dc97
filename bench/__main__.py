"""``python -m bench {linear,conv2d,models,report} [ARGS...]``, run from the root of the rtl checkout.

    python -m bench linear [ARGS...]    routed_masked_linear against the baselines (bench_linear.py)
    python -m bench conv2d [ARGS...]    routed_masked_conv2d / conv_transpose2d against the baselines (bench_conv2d.py)
    python -m bench models [ARGS...]    whole routed models against the baselines (bench_models.py)
    python -m bench processes [ARGS...] one rtl run on 1 and on N processes, wall time (bench_processes.py)
    python -m bench report [ARGS...]    summary.md and plots from the results' CSVs (report.py)

``python -m bench TARGET --help`` shows a target's options. The benchmarks are not part of the installed rtl
package: they live in this folder of the source tree, beside ``rtl`` and ``rtl_kernels``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# Target -> module of this package.
TARGETS = {
    "linear": "bench_linear",
    "conv2d": "bench_conv2d",
    "models": "bench_models",
    "processes": "bench_processes",
    "report": "report",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the target named by the first argument with the arguments that follow; 2 for a missing or unknown one.

    Example:
        >>> main(["report", "--results", "bench/results"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    target, rest = argv[0], argv[1:]
    if target not in TARGETS:
        print(f"python -m bench: unknown target {target!r}; choose one of {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"{__package__ or 'bench'}.{TARGETS[target]}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
