"""The ``rtl`` command line: run the paper's protocol on an experiment, rebuild a report, list experiments.

rtl run EXPERIMENT [--sparsities 0.25,0.5,0.75,0.9] [--seed 0] [--device cpu] [--backend auto]
                   [--out DIR] [--quick] [--resume DIR] [--data-root DIR] [--download]
rtl report DIR
rtl list

The benchmarks are not part of the installed package: run them from a checkout with
``python -m bench {linear,conv2d,models,report} [ARGS...]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

DEFAULT_SPARSITIES = "0.25,0.5,0.75,0.9"


#: ``--sparsities collapse``: the grid of the collapse study, up to 98 %.
COLLAPSE_GRID = "0.25,0.5,0.75,0.9,0.95,0.98"


def _parse_sparsities(text: str) -> List[float]:
    if text.strip() == "collapse":
        text = COLLAPSE_GRID
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsities must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--sparsities is empty")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {bad}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--sparsities repeats a value: {values}")
    return sorted(values)


def _parse_seeds(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers >= 0, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtl",
        description="Routing the Lottery: experiments and reports.",
        epilog="The benchmarks live in the source checkout, not in the installed package: run them there with "
        "`python -m bench {linear,conv2d,models,report} [ARGS...]`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment: dense, single-mask IMP, independent models and RTL")
    run.add_argument("experiment", help="experiment name (see `rtl list`)")
    run.add_argument(
        "--sparsities",
        type=_parse_sparsities,
        default=_parse_sparsities(DEFAULT_SPARSITIES),
        help=f"comma-separated target sparsities in [0, 1) (default {DEFAULT_SPARSITIES}); 'collapse' is the collapse "
        f"study's grid {COLLAPSE_GRID}",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--seeds",
        type=_parse_seeds,
        default=None,
        help="run every seed of a comma-separated list (each in OUT/seed<N>, resumable per seed) and write "
        "OUT/aggregate.md: mean ± std per method and the paired difference RTL minus each baseline with its 95 %% "
        "interval",
    )
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--backend", default=None, help="rtl_kernels backend for the routed model (default: automatic)")
    run.add_argument("--out", default=None, help="run directory (default runs/EXPERIMENT-seedN[-quick])")
    run.add_argument(
        "--quick", action="store_true", help="the quick preset: minutes on a 2-core CPU (= --preset quick)"
    )
    run.add_argument(
        "--preset",
        choices=("quick", "full", "paper"),
        default=None,
        help="training settings: quick (CPU minutes), full (a GPU's budget; the default), paper (the paper's "
        "schedule: 4,096 weights per round, its epochs or steps per round, constant-rate Adam)",
    )
    run.add_argument("--resume", metavar="DIR", default=None, help="continue the interrupted run in DIR")
    run.add_argument("--data-root", default=None, help="where CIFAR data lives (cifar experiments)")
    run.add_argument("--download", action="store_true", help="download CIFAR into --data-root if missing")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one training setting (batch_size, lr, single_epochs, ticket_steps, ticket_epochs, "
        "retrain_epochs, prune_fraction, prune_count, eval_batch, lr_schedule=cosine|constant, "
        "granularity=unstructured|vector:V|block:BNxBK|channel); repeatable",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); the embedded experiments' models are tiny, "
        "and on a small or shared CPU one thread is often fastest",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    report = sub.add_parser("report", help="rebuild report.md and the plots of a finished run")
    report.add_argument("run_dir")
    sub.add_parser("list", help="list the experiments")
    return parser


def _parse_overrides(items: List[str]) -> dict:
    from dataclasses import fields

    from .experiments import Settings

    types = {f.name: f.type for f in fields(Settings)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set takes KEY=VALUE with KEY one of {', '.join(types)}, got {item!r}")
        convert = {"int": int, "float": float, "str": str}.get(getattr(types[key], "__name__", types[key]), str)
        try:
            out[key] = convert(value)
        except ValueError:
            raise ValueError(f"--set {key}: {value!r} is not a number") from None
        if key == "granularity":
            from .experiments.tasks import parse_granularity

            parse_granularity(value)
    return out


def _cmd_list() -> int:
    from .experiments import EXPERIMENTS

    width = max(len(n) for n in EXPERIMENTS)
    for name, exp in EXPERIMENTS.items():
        need = " [needs --data-root]" if exp.needs_data else ""
        print(f"{name:<{width}}  {exp.description}{need}")
    return 0


def _preset_suffix(args) -> str:
    return "" if args.preset == "full" else f"-{args.preset}"


def _cmd_run(args) -> int:
    from .experiments.ranks import leave, ranks_from_environment

    if args.quick and args.preset not in (None, "quick"):
        print(f"rtl: --quick is --preset quick; it contradicts --preset {args.preset}", file=sys.stderr)
        return 2
    args.preset = "quick" if args.quick else (args.preset or "full")

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"rtl: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
            return 2
    try:
        # under torchrun: join the other processes (gloo on CPU, nccl with one GPU per process)
        ranks, device = ranks_from_environment(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"rtl: cannot join the other processes: {exc}", file=sys.stderr)
        return 2
    try:
        if args.seeds is None:
            return _run_on_ranks(args, ranks, device)
        return _run_seeds(args, ranks, device)
    except RuntimeError as exc:
        if not _lost_another_rank(ranks, exc):
            raise
        from .state_io import first_line

        print(
            f"rtl run: rank {ranks.rank} of {ranks.world} stopped: another rank failed or lost contact "
            f"({first_line(exc)}); the finished stages are kept (resume with --resume DIR, on any number of processes)",
            file=sys.stderr,
        )
        return 1
    finally:
        leave(ranks)


def _lost_another_rank(ranks, exc: BaseException) -> bool:
    """Whether a collective failed because a peer went away (torch.distributed's errors), in a run of several."""
    import torch.distributed as dist

    return (
        ranks.distributed
        and isinstance(exc, getattr(dist, "DistError", ()))
        or (
            ranks.distributed
            and any(word in str(exc) for word in ("Connection closed", "Connection reset", "gloo", "NCCL"))
        )
    )


def _run_seeds(args, ranks, device: str) -> int:
    """Every seed of ``--seeds`` in OUT/seed<N> (a finished seed is kept, an interrupted one resumed with --resume),
    then the aggregate over the finished seeds."""
    import copy

    from .experiments.aggregate import write_aggregate

    if args.seed != 0:
        print("rtl: give --seed or --seeds, not both", file=sys.stderr)
        return 2
    tag = "-".join(map(str, args.seeds))
    base = args.resume or args.out or os.path.join("runs", f"{args.experiment}-seeds{tag}{_preset_suffix(args)}")
    for seed in args.seeds:
        seed_dir = os.path.join(base, f"seed{seed}")
        if args.resume is not None and os.path.isfile(os.path.join(seed_dir, "metrics.json")):
            if ranks.main:
                print(f"seed {seed}: done earlier ({seed_dir})")
            continue
        one = copy.copy(args)
        one.seed, one.seeds, one.out = seed, None, seed_dir
        one.resume = (
            seed_dir if args.resume is not None and os.path.isfile(os.path.join(seed_dir, "config.json")) else None
        )
        code = _run_on_ranks(one, ranks, device)
        if code != 0:
            return code
    if ranks.main:
        print(f"aggregate: {write_aggregate(base)}")
    return 0


def _run_on_ranks(args, ranks, device: str) -> int:
    import torch

    from . import prune
    from .experiments import EXPERIMENTS, build_task
    from .experiments.protocol import STATE_VERSION, RunStateError, run_protocol
    from .experiments.run_lock import RunLockedError
    from .experiments.report import write_report

    if args.experiment not in EXPERIMENTS:
        print(f"rtl: unknown experiment {args.experiment!r}; known: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    exp = EXPERIMENTS[args.experiment]
    if args.threads is not None:
        if args.threads < 1:
            print(f"rtl: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.backend not in (None, "auto"):
        import rtl_kernels

        known = ("reference", "cpu", "triton", "cuda")
        if args.backend not in known:
            print(f"rtl: unknown backend {args.backend!r}; known: auto, {', '.join(known)}", file=sys.stderr)
            return 2
        reasons = rtl_kernels.unavailable_reasons(torch.device(args.device), torch.float32)
        if reasons.get(args.backend):
            print(f"rtl: backend {args.backend!r} cannot run here: {reasons[args.backend]}", file=sys.stderr)
            return 2
    out = args.resume or args.out or os.path.join("runs", f"{args.experiment}-seed{args.seed}{_preset_suffix(args)}")
    if exp.images and getattr(args, "image", None) is None:  # one run per image in OUT/images/NAME, then combined
        from .experiments.multi_image import run_images

        try:
            overrides = _parse_overrides(args.overrides)
        except ValueError as exc:
            print(f"rtl: {exc}", file=sys.stderr)
            return 2
        return run_images(args, out, overrides, ranks, lambda one: _run_on_ranks(one, ranks, device))
    data_kwargs = {}
    if exp.needs_data:
        data_kwargs = dict(data_root=args.data_root, download=args.download)
    if exp.images:
        data_kwargs["image"] = args.image
    try:
        overrides = _parse_overrides(args.overrides)
        task = build_task(args.experiment, args.preset, args.seed, overrides=overrides, **data_kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"rtl: {exc}", file=sys.stderr)
        return 2
    task.to(device)
    model = task.build_model(args.seed)
    from .convert import convert_

    prunable = prune.prunable_count(convert_(model, 1, filter_fn=task.prunable_filter))
    config = {
        "experiment": args.experiment,
        "description": task.description,
        "kind": task.kind,
        "seed": args.seed,
        "sparsities": args.sparsities,
        "quick": args.preset == "quick",
        "preset": args.preset,
        "overrides": overrides,
        "state_version": STATE_VERSION,
        "num_tickets": task.num_tickets,
        "ticket_names": task.ticket_names,
        "prunable_weights": prunable,
        "settings": vars(task.settings),
        "device": args.device,
        "backend": args.backend or "auto",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"image": args.image, "image_shape": list(task.image_shape)} if exp.images else {}),
    }
    if ranks.main:
        processes = f", {ranks.world} processes" if ranks.distributed else ""
        print(
            f"rtl run {args.experiment}: {task.num_tickets} tickets, {prunable} prunable weights, sparsities "
            f"{args.sparsities}, out {out}{processes}"
        )
    backend = None if args.backend in (None, "auto") else args.backend
    try:
        run_protocol(
            task,
            out,
            args.sparsities,
            args.seed,
            config,
            resume=args.resume is not None,
            backend=backend,
            progress=not args.no_progress,
            device=device,
            ranks=ranks,
        )
    except (RunStateError, RunLockedError) as exc:
        if ranks.main:  # raised on rank 0 and handed to every rank: said once
            print(f"rtl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ranks.main:
            print(
                f"\nrtl: interrupted; every finished stage is saved. Continue with:\n  rtl run {args.experiment} "
                f"--resume {getattr(args, 'parent_out', None) or out} --preset {args.preset}",
                file=sys.stderr,
            )
        return 130
    if ranks.main:
        report = write_report(out)
        print(f"report: {report}")
    return 0


def _cmd_report(args) -> int:
    from .experiments.aggregate import seed_dirs, write_aggregate
    from .experiments.report import write_report

    if not os.path.isfile(os.path.join(args.run_dir, "config.json")) and os.path.isdir(args.run_dir):
        if seed_dirs(args.run_dir):  # a --seeds directory: every seed's report, then the aggregate
            for _, seed_dir in seed_dirs(args.run_dir):
                write_report(seed_dir)
            print(write_aggregate(args.run_dir))
            return 0
    if not os.path.isfile(os.path.join(args.run_dir, "config.json")):
        print(f"rtl: {args.run_dir} is not an rtl run directory (no config.json)", file=sys.stderr)
        return 2
    try:
        print(write_report(args.run_dir))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        from .state_io import first_line

        detail = first_line(exc)
        print(
            f"rtl: cannot report {args.run_dir} ({type(exc).__name__}: {detail}): its config.json or metrics.json "
            f"is damaged or not rtl's; `rtl run EXPERIMENT ... --resume {args.run_dir}` rebuilds metrics.json "
            f"from the saved stages",
            file=sys.stderr,
        )
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``rtl`` console script and ``python -m rtl``."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _cmd_list()
    if args.command == "report":
        return _cmd_report(args)
    return _cmd_run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
