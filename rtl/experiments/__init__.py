"""Experiments that reproduce the paper's protocol (see :mod:`rtl.experiments.protocol`), runnable offline.

``EXPERIMENTS`` maps a name to its description and how to build its task with the quick or full settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict

from .tasks import CifarTickets, DigitsClasses, DigitsEnvironments, INRRegions, Settings, Task

__all__ = ["EXPERIMENTS", "Experiment", "Settings", "build_task"]


@dataclass(frozen=True)
class Experiment:
    """One runnable experiment: its task class, its settings (quick: minutes on a 2-core CPU; full: a GPU's
    budget), and whether it needs data the user provides."""

    name: str
    description: str
    factory: Callable[..., Task]
    quick: Settings
    full: Settings
    needs_data: bool = False


_DIGITS_QUICK = Settings(
    batch_size=64,
    lr=2e-3,
    dense_epochs=12,
    single_epochs=2,
    ticket_steps=30,
    retrain_epochs=8,
    prune_fraction=0.35,
    eval_batch=512,
)
_DIGITS_FULL = Settings(
    batch_size=64,
    lr=1e-3,
    dense_epochs=40,
    single_epochs=10,
    ticket_steps=200,
    retrain_epochs=30,
    prune_fraction=0.2,
    eval_batch=512,
)
_INR_QUICK = Settings(
    batch_size=512,
    lr=1e-2,
    dense_epochs=150,
    single_epochs=20,
    ticket_steps=120,
    retrain_epochs=120,
    prune_fraction=0.35,
    eval_batch=4096,
)
_INR_FULL = Settings(
    batch_size=1024,
    lr=1e-2,
    dense_epochs=2000,
    single_epochs=200,
    ticket_steps=2000,
    retrain_epochs=1000,
    prune_fraction=0.2,
    eval_batch=8192,
)
_CIFAR_QUICK = Settings(
    batch_size=320,
    lr=1e-3,
    dense_epochs=2,
    single_epochs=1,
    ticket_steps=20,
    retrain_epochs=1,
    prune_fraction=0.35,
    eval_batch=1000,
)
# the paper's schedule (App. A.2-A.3): Adam 1e-4, batch 320, 10 epochs of pruning and 10 of joint retraining
_CIFAR_FULL = Settings(
    batch_size=320,
    lr=1e-4,
    dense_epochs=20,
    single_epochs=10,
    ticket_steps=1560,
    retrain_epochs=10,
    prune_fraction=0.1,
    eval_batch=1000,
)

EXPERIMENTS: Dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("digits-classes", DigitsClasses.description, DigitsClasses, _DIGITS_QUICK, _DIGITS_FULL),
        Experiment(
            "digits-environments", DigitsEnvironments.description, DigitsEnvironments, _DIGITS_QUICK, _DIGITS_FULL
        ),
        Experiment("inr-regions", INRRegions.description, INRRegions, _INR_QUICK, _INR_FULL),
        Experiment(
            "cifar10-classes",
            "CIFAR-10 (local --data-root), one ticket per class, the paper's GhostNet",
            lambda settings, seed, **kw: CifarTickets(settings, seed, dataset="cifar10", **kw),
            _CIFAR_QUICK,
            _CIFAR_FULL,
            needs_data=True,
        ),
        Experiment(
            "cifar100-clusters",
            "CIFAR-100 (local --data-root), the paper's 8 text clusters (Table 5), GhostNet",
            lambda settings, seed, **kw: CifarTickets(settings, seed, dataset="cifar100", **kw),
            _CIFAR_QUICK,
            _CIFAR_FULL,
            needs_data=True,
        ),
    )
}


def build_task(name: str, quick: bool, seed: int, overrides: Dict = None, **data_kwargs) -> Task:
    """The task of experiment ``name`` with its quick or full settings (``overrides`` replaces fields)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    settings = replace(exp.quick if quick else exp.full, **(overrides or {}))
    return exp.factory(settings, seed, **data_kwargs)
