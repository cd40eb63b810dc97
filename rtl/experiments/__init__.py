"""Experiments that reproduce the paper's protocol (see :mod:`rtl.experiments.protocol`), runnable offline.

``EXPERIMENTS`` maps a name to its description and how to build its task with one of three presets:

- ``quick``: minutes on a 2-core CPU (fewer, larger pruning rounds: a fraction of the remaining weights each);
- ``full``: a GPU's budget, the same kind of schedule, longer;
- ``paper``: the paper's schedule: 4,096 weights removed per round and ticket, the paper's training per round (10
  epochs of the ticket's subset in vision, 10,000 steps for the INR), 10 epochs of joint retraining (vision),
  constant-rate Adam. The paper gives no schedule for the digits; they take its vision schedule with the full
  preset's batch and learning rate (the paper's CIFAR rate, 1e-4 at batch 320 over 50,000 images, would barely
  move a model on 1,437 digits).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

from .speech import SpeechEnvironments
from .tasks import CifarTickets, DigitsClasses, DigitsEnvironments, INRRegions, Settings, Task

__all__ = ["EXPERIMENTS", "PRESETS", "Experiment", "Settings", "build_task"]


@dataclass(frozen=True)
class Experiment:
    """One runnable experiment: its task class, its settings (quick: minutes on a 2-core CPU; full: a GPU's
    budget), and whether it needs data the user provides.

    ``images``: an experiment of several images names them here; `rtl run` then runs the protocol once per image
    (the factory takes ``image=``) and combines the runs (:mod:`rtl.experiments.multi_image`).
    """

    name: str
    description: str
    factory: Callable[..., Task]
    quick: Settings
    full: Settings
    paper: Settings
    needs_data: bool = False
    images: Tuple[str, ...] = ()


_DIGITS_QUICK = Settings(
    batch_size=64,
    lr=2e-3,
    single_epochs=2,
    ticket_steps=30,
    retrain_epochs=8,
    prune_fraction=0.35,
    eval_batch=512,
)
_DIGITS_FULL = Settings(
    batch_size=64,
    lr=1e-3,
    single_epochs=10,
    ticket_steps=200,
    retrain_epochs=30,
    prune_fraction=0.2,
    eval_batch=512,
)
_INR_QUICK = Settings(
    batch_size=512,
    lr=1e-2,
    single_epochs=20,
    ticket_steps=120,
    retrain_epochs=120,
    prune_fraction=0.35,
    eval_batch=4096,
)
_INR_FULL = Settings(
    batch_size=1024,
    lr=1e-2,
    single_epochs=200,
    ticket_steps=2000,
    retrain_epochs=1000,
    prune_fraction=0.2,
    eval_batch=8192,
)
# inr-images, the paper's INR regime (several images, each with more target values than the network has weights):
# 4 colour photographs that ship with scikit-image, 256 x 256 (3 * 65,536 = 196,608 values, 3.6x the 53,888
# prunable weights), 7 regions each. Its full and paper presets are inr-regions'; its quick preset takes batches of
# 1,024 rows (cheaper per pixel than 512 on a CPU) and fewer epochs and steps than inr-regions', as
# its images hold 28 times the pixels.
_INR_IMAGE_SET = ("astronaut", "chelsea", "coffee", "rocket")
_INR_IMAGE_SIZE = 256
_INR_IMAGE_REGIONS = 7
# Its quick rate is half the paper's 0.01: at 0.01 the dense model's sigmoid output saturated on the dark rocket image
# in 8 of 12 batch orders (10.1 dB instead of 29-30), at 0.005 in none of 12.
_INR_IMAGES_QUICK = Settings(
    batch_size=1024,
    lr=5e-3,
    single_epochs=1,
    ticket_steps=60,
    retrain_epochs=6,
    prune_fraction=0.35,
    eval_batch=4096,
)
_CIFAR_QUICK = Settings(
    batch_size=320,
    lr=1e-3,
    single_epochs=1,
    ticket_steps=20,
    retrain_epochs=1,
    prune_fraction=0.35,
    eval_batch=1000,
)
_CIFAR_FULL = Settings(
    batch_size=320,
    lr=1e-4,
    single_epochs=10,
    ticket_steps=1560,
    retrain_epochs=10,
    prune_fraction=0.1,
    eval_batch=1000,
)
_SPEECH_QUICK = Settings(
    batch_size=16,
    lr=2e-3,
    single_epochs=2,
    ticket_steps=30,
    retrain_epochs=8,
    prune_fraction=0.35,
    eval_batch=64,
)
_SPEECH_FULL = Settings(
    batch_size=16,
    lr=1e-3,
    single_epochs=10,
    ticket_steps=200,
    retrain_epochs=40,
    prune_fraction=0.2,
    eval_batch=64,
)

# The paper's schedules: vision (App. A.2-A.3) Adam 1e-4, batch 320, 10 epochs before each pruning of 4,096 weights,
# 10 epochs of joint retraining; INR (App. C.4) Adam 0.01, 10,000 steps before each pruning of 4,096 weights.
_PAPER = dict(prune_count=4096, lr_schedule="constant")
_DIGITS_PAPER = replace(_DIGITS_FULL, single_epochs=10, ticket_epochs=10, retrain_epochs=10, **_PAPER)
_INR_PAPER = replace(_INR_FULL, lr=1e-2, single_epochs=200, ticket_steps=10000, retrain_epochs=1000, **_PAPER)
# speech (App. D.4): Adam 1e-4, 10 epochs of pruning per round and 10 of retraining
_SPEECH_PAPER = replace(_SPEECH_FULL, lr=1e-4, single_epochs=10, ticket_epochs=10, retrain_epochs=10, **_PAPER)
_CIFAR_PAPER = replace(_CIFAR_FULL, lr=1e-4, single_epochs=10, ticket_epochs=10, retrain_epochs=10, **_PAPER)
PRESETS = ("quick", "full", "paper")

EXPERIMENTS: Dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "digits-classes", DigitsClasses.description, DigitsClasses, _DIGITS_QUICK, _DIGITS_FULL, _DIGITS_PAPER
        ),
        Experiment(
            "digits-environments",
            DigitsEnvironments.description,
            DigitsEnvironments,
            _DIGITS_QUICK,
            _DIGITS_FULL,
            _DIGITS_PAPER,
        ),
        Experiment("inr-regions", INRRegions.description, INRRegions, _INR_QUICK, _INR_FULL, _INR_PAPER),
        Experiment(
            "inr-images",
            f"INR of {len(_INR_IMAGE_SET)} scikit-image photographs ({', '.join(_INR_IMAGE_SET)}), each "
            f"{_INR_IMAGE_SIZE}x{_INR_IMAGE_SIZE} with {_INR_IMAGE_REGIONS} regions (tickets), one run per image; "
            "PSNR averaged over the images, S_k vs PSNR per region",
            functools.partial(INRRegions, size=_INR_IMAGE_SIZE, num_regions=_INR_IMAGE_REGIONS),
            _INR_IMAGES_QUICK,
            _INR_FULL,
            _INR_PAPER,
            images=_INR_IMAGE_SET,
        ),
        Experiment(
            "speech-environments",
            SpeechEnvironments.description,
            SpeechEnvironments,
            _SPEECH_QUICK,
            _SPEECH_FULL,
            _SPEECH_PAPER,
        ),
        Experiment(
            "cifar10-classes",
            "CIFAR-10 (local --data-root), one ticket per class, the paper's GhostNet",
            lambda settings, seed, **kw: CifarTickets(settings, seed, dataset="cifar10", **kw),
            _CIFAR_QUICK,
            _CIFAR_FULL,
            _CIFAR_PAPER,
            needs_data=True,
        ),
        Experiment(
            "cifar100-clusters",
            "CIFAR-100 (local --data-root), the paper's 8 text clusters (Table 5), GhostNet",
            lambda settings, seed, **kw: CifarTickets(settings, seed, dataset="cifar100", **kw),
            _CIFAR_QUICK,
            _CIFAR_FULL,
            _CIFAR_PAPER,
            needs_data=True,
        ),
    )
}


def build_task(name: str, preset, seed: int, overrides: Dict = None, **data_kwargs) -> Task:
    """The task of experiment ``name`` with the settings of ``preset`` ("quick", "full" or "paper"; True and False
    mean "quick" and "full"), ``overrides`` replacing fields."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    if isinstance(preset, bool):
        preset = "quick" if preset else "full"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    exp = EXPERIMENTS[name]
    settings = replace(getattr(exp, preset), **(overrides or {}))
    return exp.factory(settings, seed, **data_kwargs)
