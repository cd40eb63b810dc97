"""``rtl bench``: run one of the benchmark scripts of the rtl source tree with the arguments that follow.

    rtl bench linear [ARGS...]    python bench/bench_linear.py ARGS   (routed_masked_linear vs the baselines)
    rtl bench conv2d [ARGS...]    python bench/bench_conv2d.py ARGS   (routed_masked_conv2d vs the baselines)
    rtl bench models [ARGS...]    python bench/bench_models.py ARGS   (whole routed models vs the baselines)
    rtl bench report [ARGS...]    python bench/report.py ARGS         (summary.md and plots from the CSVs)

``rtl bench TARGET --help`` shows the script's own options. The benchmarks are not part of the installed package:
they live in the ``bench/`` folder beside the ``rtl`` package in the source tree, so this command works from a
checkout (an editable install, ``pip install -e .``, or ``python -m rtl`` run there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["TARGETS", "add_bench_parser", "bench_command", "find_bench_dir", "run_bench"]

# Target -> script in bench/.
TARGETS = {
    "linear": "bench_linear.py",
    "conv2d": "bench_conv2d.py",
    "models": "bench_models.py",
    "report": "report.py",
}


def find_bench_dir(package_dir: Optional[Path] = None) -> Path:
    """The source tree's ``bench/`` folder, found beside the rtl package.

    Args:
        package_dir: the ``rtl`` package folder (default: the one this module lives in).

    Returns:
        The bench folder.

    Raises:
        FileNotFoundError: rtl was installed without its source tree (no ``bench/common.py`` beside the package).

    Example:
        >>> find_bench_dir()
        PosixPath('/home/me/rtl/bench')
    """
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    bench = package_dir.parent / "bench"
    # common.py, which every benchmark imports, tells rtl's bench folder from any other folder named bench.
    if not (bench / "common.py").is_file():
        raise FileNotFoundError(
            f"no benchmark folder at {bench}: the benchmarks live in the rtl source tree (bench/ beside the rtl "
            f"package), not in an installed rtl; clone the repository, install it with `pip install -e .` and run "
            f"`rtl bench` there (or `python bench/<script>.py` in the checkout)"
        )
    return bench


def bench_command(target: str, args: Sequence[str] = (), package_dir: Optional[Path] = None) -> List[str]:
    """The command line that runs one benchmark target with the current Python.

    Args:
        target: one of :data:`TARGETS` ('linear', 'conv2d', 'models', 'report').
        args: arguments handed to the script unchanged.
        package_dir: the ``rtl`` package folder (default: this module's).

    Returns:
        ``[python, path/to/script, *args]``.

    Raises:
        ValueError: unknown target.
        FileNotFoundError: no source tree, or the target's script is missing from it.

    Example:
        >>> bench_command("report", ["--all-runs"])[-2:]
        ['/home/me/rtl/bench/report.py', '--all-runs']
    """
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"unknown benchmark target {target!r}; choose one of {', '.join(TARGETS)}")
    script = find_bench_dir(package_dir) / TARGETS[target]
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing from this source tree, so `rtl bench {target}` cannot run")
    return [sys.executable, str(script), *args]


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the ``rtl`` command line.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``bench`` sub-parser (its namespace gets ``target`` and ``args``; :func:`run_bench` runs it).

    Example:
        >>> parser = argparse.ArgumentParser(prog="rtl")
        >>> _ = add_bench_parser(parser.add_subparsers(dest="command"))
        >>> run_bench(parser.parse_args(["bench", "report", "--all-runs"]))
        0
    """
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark script of the source tree (linear, conv2d, models) or summarise the results (report)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help=f"one of {', '.join(TARGETS)}")
    # REMAINDER: everything after the target, options included, goes to the script (its --help too).
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (rtl bench TARGET --help)")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark script ``args.target`` with ``args.args``; returns its exit status (2 on a bad target).

    The script runs in a child Python, in the current directory (so relative paths in its arguments mean what
    they say), with the source tree on PYTHONPATH so it imports this checkout's rtl_kernels.

    Args:
        args: the namespace of the ``bench`` sub-parser (``target``, ``args``).

    Returns:
        The script's exit status; 2 with a message on stderr when the target is unknown or cannot be found.

    Example:
        >>> run_bench(argparse.Namespace(target="report", args=["--results", "bench/results"]))
        0
    """
    try:
        command = bench_command(args.target, list(args.args or []))
    except (ValueError, FileNotFoundError) as exc:
        print(f"rtl bench: {exc}", file=sys.stderr)
        return 2
    root = str(Path(command[1]).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:  # the child got the interrupt too and stops; no traceback from here
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rtl.bench_cli TARGET [ARGS...]``: the ``rtl bench`` command on its own."""
    parser = argparse.ArgumentParser(prog="rtl")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return run_bench(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
