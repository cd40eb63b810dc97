"""An experiment of several images, the paper's INR regime: one image at a time, PSNR averaged over the images.

The paper fits its INR to 10 ADE20K images, one at a time (one ticket per semantic region of the image), and reports
the PSNR averaged over the images (Table 2) and, per region, how its mask similarity S_k goes with its PSNR. An
:class:`~rtl.experiments.Experiment` with ``images`` runs the protocol once per image, each image its own task,
θ0, stages and report, and then combines them. A run directory OUT holds:

- ``OUT/config.json``: the run's configuration with its ``images`` (compared on ``--resume``); completed, once the
  images are done, with what the images' runs tell (kind, tickets, prunable weights);
- ``OUT/images/<name>/``: one ordinary run per image (config.json, stages/, metrics.json, report.md), resumable on
  its own; on ``--resume`` a finished image is kept as it is and an interrupted one continues;
- ``OUT/metrics.json``: the combination, in the schema of one run of its kind, so that the ``--seeds`` aggregate
  (:mod:`rtl.experiments.aggregate`) reads it unchanged: every method's PSNR is the mean over the images of the
  image's PSNR (the paper's average), its per-region PSNRs, S_k and per-ticket counts the images' lists one after
  the other, its other counts the mean over the images and its budget their sum; and what is extra: ``images``,
  ``psnr_per_image`` next to every mean, and ``per_region``, Spearman's ρ between S_k and PSNR per image and pooled
  over every (image, region) pair;
- ``OUT/report.md`` and its plots.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

from ..state_io import atomic_json
from .report import headline_metric, method_rows, write_report_file
from .similarity_vs_performance import spearman

__all__ = ["IMAGES_DIR", "combine", "image_dir", "run_images", "write_images_report"]

#: The folder of OUT that holds one run directory per image.
IMAGES_DIR = "images"

# what a resumed run must share with the run it continues (the images' own stores compare the rest)
_RESUME_KEYS = ("experiment", "seed", "sparsities", "preset", "overrides", "state_version", "images")


def image_dir(out_dir: str, name: str) -> str:
    """The run directory of image ``name`` in the run directory ``out_dir``."""
    return os.path.join(out_dir, IMAGES_DIR, name)


def _take_directory(out_dir: str, config: Dict, resume: bool) -> None:
    """Write the run's config.json, or check on resume that ``out_dir`` holds a run of the same configuration.

    Raises:
        RunStateError: nothing to resume, another configuration, or a run in ``out_dir`` when not resuming.
    """
    from .protocol import RunStateError, check_resumable

    path = os.path.join(out_dir, "config.json")
    if resume:
        check_resumable(out_dir, config, _RESUME_KEYS)
        return
    images = os.path.join(out_dir, IMAGES_DIR)
    if os.path.isfile(path) or (os.path.isdir(images) and os.listdir(images)):
        raise RunStateError(
            f"{out_dir} already holds a run: pass --resume {out_dir} to continue it, or choose another --out"
        )
    os.makedirs(out_dir, exist_ok=True)
    atomic_json(config, path)


def run_images(args, out_dir: str, overrides: Dict, ranks, run_one: Callable[[object], int]) -> int:
    """`rtl run` of an experiment with images: the protocol once per image, then :func:`combine` and the report.

    Args:
        args: the parsed `rtl run` arguments (experiment, preset, seed, sparsities, resume, ...).
        out_dir: the run directory OUT.
        overrides: the parsed ``--set`` overrides.
        ranks: the run's processes (:class:`rtl.experiments.ranks.Ranks`); rank 0 writes the run's own files.
        run_one: ``run_one(args of one image) -> exit code``: one ordinary run (the cli's), given args with
            ``image``, ``out`` (``OUT/images/<name>``), ``resume`` and ``parent_out`` (OUT, for messages) set.

    Returns:
        The exit code: 0, 2 for a directory that cannot be used, or the first failing image's code (130 when
        interrupted: ``--resume OUT`` continues).
    """
    from . import EXPERIMENTS
    from .protocol import STATE_VERSION, RunStateError

    exp = EXPERIMENTS[args.experiment]
    config = {
        "experiment": args.experiment,
        "description": exp.description,
        "images": list(exp.images),
        "seed": args.seed,
        "sparsities": args.sparsities,
        "quick": args.preset == "quick",
        "preset": args.preset,
        "overrides": overrides,
        "state_version": STATE_VERSION,
        "settings": vars(replace(getattr(exp, args.preset), **overrides)),
        "device": args.device,
        "backend": args.backend or "auto",
    }
    resume = args.resume is not None
    try:
        ranks.from_main(lambda: _take_directory(out_dir, config, resume))
    except RunStateError as exc:
        if ranks.main:  # raised on rank 0 and handed to every rank: said once
            print(f"rtl: {exc}", file=sys.stderr)
        return 2
    for index, name in enumerate(exp.images):
        folder = image_dir(out_dir, name)
        if resume and os.path.isfile(os.path.join(folder, "metrics.json")):
            if ranks.main:
                print(f"image {name}: done earlier ({folder})")
            continue
        if ranks.main:
            print(f"image {name} ({index + 1} of {len(exp.images)})")
        one = copy.copy(args)
        one.image, one.out, one.parent_out = name, folder, out_dir
        one.resume = folder if resume and os.path.isfile(os.path.join(folder, "config.json")) else None
        code = run_one(one)
        if code != 0:
            return code
    if ranks.main:
        combine(out_dir)
        print(f"report: {write_images_report(out_dir)}")
    return 0


# -- the combination ------------------------------------------------------------------------------------------------


def _load(folder: str, name: str) -> Dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no {name}: that image's run has not finished (resume the run with --resume)")
    with open(path) as fh:
        return json.load(fh)


def _counts(per_image: Sequence[Dict]) -> Dict:
    """Parameter counts over the images: lists (per ticket) one after the other, numbers the mean over the images."""
    out = {}
    for field, first in per_image[0].items():
        values = [c[field] for c in per_image]
        out[field] = [x for v in values for x in v] if isinstance(first, list) else statistics.fmean(values)
    return out


def _method(entries: Sequence[Dict]) -> Dict:
    """One method's combination at one sparsity from every image's ``metrics["sparsities"][key][method]``."""
    images = [e["metrics"]["image"] for e in entries]
    out = {
        "metrics": {
            "image": {
                "psnr": statistics.fmean(i["psnr"] for i in images),  # the paper's average over the images
                "psnr_per_image": [i["psnr"] for i in images],
                "psnr_per_region": [v for i in images for v in i["psnr_per_region"]],
            }
        },
        "counts": _counts([e["counts"] for e in entries]),
        "budget": {k: sum(e["budget"][k] for e in entries) for k in ("steps", "samples")},
    }
    for field in ("similarity", "similarity_chance_corrected"):  # RTL's, per ticket: the images' tickets in turn
        if field in entries[0]:
            out[field] = [v for e in entries for v in e[field]]
    return out


def _per_region(names: Sequence[str], entries: Sequence[Dict]) -> Dict:
    """Spearman's ρ between RTL's S_k and the region's PSNR: per image, pooled over every (image, region) pair, and
    the mean of the images' ρ (what is left when each image's own PSNR level, which the pooled ρ also ranks, is
    taken out)."""
    per_image = {
        name: spearman(e["rtl"]["similarity"], e["rtl"]["metrics"]["image"]["psnr_per_region"])
        for name, e in zip(names, entries)
    }
    pooled = spearman(
        [v for e in entries for v in e["rtl"]["similarity"]],
        [v for e in entries for v in e["rtl"]["metrics"]["image"]["psnr_per_region"]],
    )
    rhos = [s["rho"] for s in per_image.values() if s["rho"] is not None]
    return {"pooled": pooled, "per_image": per_image, "mean_per_image_rho": statistics.fmean(rhos) if rhos else None}


def combine(out_dir: str) -> Dict:
    """Combine the finished images' runs of ``out_dir`` into ``OUT/metrics.json`` (and complete OUT/config.json).

    Returns:
        The combined metrics (see the module's docstring).

    Raises:
        ValueError: an image's run has not finished, or the images' runs disagree (kind, sparsities).
    """
    config = _load(out_dir, "config.json")
    names = list(config["images"])
    configs = [_load(image_dir(out_dir, n), "config.json") for n in names]
    runs = [_load(image_dir(out_dir, n), "metrics.json") for n in names]
    kinds = {c["kind"] for c in configs}
    keys = sorted(runs[0]["sparsities"], key=float)
    if len(kinds) != 1 or any(sorted(m["sparsities"], key=float) != keys for m in runs):
        raise ValueError(f"the images' runs under {out_dir} disagree on their kind or sparsities")
    images = []
    for name, cfg in zip(names, configs):
        shape = cfg.get("image_shape") or []  # (H, W, 3)
        values = 1
        for side in shape:
            values *= side
        images.append(
            {
                "name": name,
                "dir": os.path.join(IMAGES_DIR, name),
                "description": cfg["description"],
                "shape": shape,
                "num_tickets": cfg["num_tickets"],
                "ticket_names": cfg["ticket_names"],
                "prunable_weights": cfg["prunable_weights"],
                # what the network must fit: 3 x H x W colour values, against its prunable weights
                "target_values": values if shape else None,
            }
        )
    dense = [m["dense"]["image"] for m in runs]
    metrics: Dict = {
        "images": images,
        "dense": {
            "image": {
                "psnr": statistics.fmean(d["psnr"] for d in dense),
                "psnr_per_image": [d["psnr"] for d in dense],
                "psnr_per_region": [v for d in dense for v in d["psnr_per_region"]],
            }
        },
        "dense_budget": {k: sum(m["dense_budget"][k] for m in runs) for k in ("steps", "samples")},
        "sparsities": {
            key: {
                method: _method([m["sparsities"][key][method] for m in runs]) for method in ("rtl", "single", "multi")
            }
            for key in keys
        },
        "per_region": {key: _per_region(names, [m["sparsities"][key] for m in runs]) for key in keys},
        "environment": runs[0]["environment"],
    }
    config.update(
        kind=kinds.pop(),
        num_tickets=sum(im["num_tickets"] for im in images),
        ticket_names=[f"{im['name']}/{t}" for im in images for t in im["ticket_names"]],
        prunable_weights=images[0]["prunable_weights"],
    )
    atomic_json(config, os.path.join(out_dir, "config.json"))
    atomic_json(metrics, os.path.join(out_dir, "metrics.json"))
    return metrics


# -- the report -------------------------------------------------------------------------------------------------------


def _f(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_images_report(run_dir: str) -> str:
    """Write ``report.md`` and the plots of a combined run (:func:`combine` done); returns the report's path."""
    config = _load(run_dir, "config.json")
    metrics = _load(run_dir, "metrics.json")
    kind = config["kind"]
    label, unit = headline_metric(kind)
    keys = sorted(metrics["sparsities"], key=float)
    images = metrics["images"]
    names = [im["name"] for im in images]
    preset = config.get("preset") or ("quick" if config["quick"] else "full")
    env = metrics["environment"]
    lines = [
        f"# rtl run: {config['experiment']}",
        "",
        config["description"],
        "",
        f"- seed {config['seed']}, sparsities {', '.join(keys)}, {preset} settings, {len(images)} images, each run on "
        f"its own (its own task, stages and report under `{IMAGES_DIR}/`)",
        f"- machine: {env['machine']}, {env['threads']} threads, torch {env['torch']}, rtl_kernels backend "
        f"{env['backend']}",
        f"- prunable weights: {config['prunable_weights']:,}",
        "",
        "Every image has more target values (3 colours x H x W pixels) than the network has prunable weights, as the "
        "paper's ADE20K images have: the network cannot store the image, the tickets compete for capacity.",
        "",
        "| image | size | regions | target values | values per weight | run |",
        "|:---|---:|---:|---:|---:|:---|",
    ]
    for im in images:
        size = "x".join(str(s) for s in im["shape"][:2]) or "?"
        ratio = _f(im["target_values"] / im["prunable_weights"]) if im["target_values"] else "—"
        target = f"{im['target_values']:,}" if im["target_values"] else "—"
        report = os.path.join(im["dir"], "report.md")
        lines.append(f"| {im['name']} | {size} | {im['num_tickets']} | {target} | {ratio} | [report]({report}) |")

    dense = metrics["dense"]["image"]
    lines += [
        "",
        f"## {label} averaged over the images (the paper's Table 2 view)",
        "",
        f"Each image's {label} over all its pixels, averaged over the {len(images)} images. Dense model (no "
        f"pruning): {dense['psnr']:.2f} {unit}. Stored weights: the mean over the images (RTL: the union of its "
        "tickets' masks; independent models: their sum; single model: one mask).",
        "",
        f"| sparsity | method | mean {label} ({unit}) | stored weights |",
        "|---:|:---|---:|---:|",
    ]
    for key in keys:
        for name, m, count in method_rows(kind, metrics["sparsities"][key]):
            lines.append(f"| {key} | {name} | {m['psnr']:.2f} | {int(round(count)):,} |")

    methods = [name for name, _, _ in method_rows(kind, metrics["sparsities"][keys[0]])]
    lines += [
        "",
        "## Per image",
        "",
        f"{label} ({unit}) of every image; the mean row is the table above.",
        "",
        "| sparsity | image | dense | " + " | ".join(methods) + " |",
        "|---:|:---|---:|" + "---:|" * len(methods),
    ]
    for key in keys:
        per_method = [m["psnr_per_image"] for _, m, _ in method_rows(kind, metrics["sparsities"][key])]
        for i, name in enumerate(names):
            cells = " | ".join(f"{values[i]:.2f}" for values in per_method)
            lines.append(f"| {key} | {name} | {dense['psnr_per_image'][i]:.2f} | {cells} |")
        cells = " | ".join(f"**{statistics.fmean(values):.2f}**" for values in per_method)
        lines.append(f"| {key} | **mean** | **{dense['psnr']:.2f}** | {cells} |")

    lines += [
        "",
        "## Per region: mask similarity vs PSNR",
        "",
        "Spearman's rank correlation ρ between each RTL region ticket's S_k (mean Jaccard of its mask to the other "
        "tickets of its image) and the region's PSNR after joint retraining: pooled over every (image, region) pair "
        "(the paper: ρ ≈ 0.98 across 15 regions at 50 % sparsity), per image, and the mean of the images' ρ. The "
        "pooled ρ also ranks the images' own PSNR levels against their S_k levels; the per-image ρ compare regions "
        "of one image only, from a handful of tickets each (coarse steps). p: scipy's two-sided p-value; —: ρ "
        "undefined.",
        "",
        "| sparsity | pooled ρ | pairs | p | " + " | ".join(f"{n} ρ" for n in names) + " | mean of the images' ρ |",
        "|---:|---:|---:|---:|" + "---:|" * (len(names) + 1),
    ]
    for key in keys:
        region = metrics["per_region"][key]
        pooled = region["pooled"]
        per_image = " | ".join(_f(region["per_image"][n]["rho"]) for n in names)
        lines.append(
            f"| {key} | {_f(pooled['rho'])} | {pooled['n']} | {_f(pooled['p'], 3)} | {per_image} | "
            f"{_f(region['mean_per_image_rho'])} |"
        )

    return write_report_file(run_dir, lines, _plots(run_dir, config, metrics, keys, names, label, unit))


def _plots(run_dir, config, metrics, keys, names, label, unit) -> List[tuple]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still has every number
        return []
    kind = config["kind"]
    made = []
    xs = [float(k) for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods: Dict[str, List[float]] = {}
    for key in keys:
        for name, m, _ in method_rows(kind, metrics["sparsities"][key]):
            methods.setdefault(name, []).append(m["psnr"])
    for name, ys in methods.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(metrics["dense"]["image"]["psnr"], color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (fraction of prunable weights removed, per mask)")
    ax.set_ylabel(f"mean {label} over the images ({unit})")
    ax.set_title(f"{config['experiment']}: {label} averaged over {len(names)} images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "psnr_vs_sparsity.png"), dpi=120)
    plt.close(fig)
    made.append(("psnr_vs_sparsity.png", f"mean {label} over the images vs sparsity per method"))

    # one panel per sparsity, every (image, region) a point, coloured by image
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.6), squeeze=False)
    counts = [im["num_tickets"] for im in metrics["images"]]
    for ax, key in zip(axes[0], keys):
        rtl = metrics["sparsities"][key]["rtl"]
        sims, values = rtl["similarity"], rtl["metrics"]["image"]["psnr_per_region"]
        start = 0
        for name, n in zip(names, counts):
            ax.scatter(sims[start : start + n], values[start : start + n], s=18, label=name)
            start += n
        rho = metrics["per_region"][key]["pooled"]["rho"]
        ax.set_title(f"sparsity {key}: pooled ρ = {_f(rho)}", fontsize=9)
        ax.set_xlabel("S_k (mean Jaccard to the image's other tickets)", fontsize=8)
    axes[0][0].set_ylabel(f"region {label} ({unit})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "similarity_vs_psnr.png"), dpi=120)
    plt.close(fig)
    made.append(("similarity_vs_psnr.png", "per region: RTL's S_k vs the region's PSNR, every image"))
    return made
