"""The presets say what they do: quick and full prune a fraction of the remaining weights per round with cosine-decayed
Adam; paper follows the paper's schedule (4,096 weights per round, its training per round, its rates, a constant
rate). Checked for every experiment, without building any task's data."""

import math

import pytest

from rtl.experiments import EXPERIMENTS, PRESETS, build_task
from rtl.models import FourierINR, SmallCNN, SpeechUNet

INR = ("inr-regions", "inr-images")


def test_every_experiment_has_every_preset():
    assert PRESETS == ("quick", "full", "paper")
    for name, exp in EXPERIMENTS.items():
        for preset in PRESETS:
            assert getattr(exp, preset).batch_size >= 1, (name, preset)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_quick_and_full_prune_a_fraction_with_a_cosine_rate(name):
    exp = EXPERIMENTS[name]
    for settings in (exp.quick, exp.full):
        assert settings.prune_count == 0 and 0 < settings.prune_fraction < 1
        assert settings.lr_schedule == "cosine"
    # the quick preset is the smaller budget
    assert exp.quick.retrain_epochs <= exp.full.retrain_epochs
    assert exp.quick.ticket_steps <= exp.full.ticket_steps


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_paper_preset_is_the_papers_schedule(name):
    paper = EXPERIMENTS[name].paper
    assert paper.prune_count == 4096 and paper.lr_schedule == "constant"
    if name in INR:  # App. C.4: Adam 0.01, 10,000 steps before each pruning
        assert paper.lr == 0.01 and paper.ticket_steps == 10000 and paper.ticket_epochs == 0
    else:  # vision (A.2-A.3) and speech (D.4): 10 epochs before each pruning, 10 epochs of retraining
        assert paper.ticket_epochs == 10 and paper.single_epochs == 10 and paper.retrain_epochs == 10
    if name.startswith("cifar"):
        assert paper.lr == 1e-4 and paper.batch_size == 320
    if name == "speech-environments":
        assert paper.lr == 1e-4


@pytest.mark.parametrize(
    "model, rounds",
    [(SmallCNN(num_classes=10, in_channels=1), 5), (FourierINR(), 12), (SpeechUNet(), 9)],
    ids=["small-cnn", "inr", "unet"],
)
def test_paper_rounds_to_ninety_percent_as_documented(model, rounds):
    # docs/paper_notes.md, choices 20 and 21: 4,096 weights a round reach 90 % in this many rounds
    prunable = sum(m.weight.numel() for n, m in model.named_modules() if model.prunable_filter(n, m))
    assert math.ceil(0.9 * prunable / 4096) == rounds


def test_build_task_names_its_preset_and_refuses_unknown_ones():
    assert build_task("digits-classes", "paper", 0).settings == EXPERIMENTS["digits-classes"].paper
    assert build_task("digits-classes", True, 0).settings == EXPERIMENTS["digits-classes"].quick
    assert build_task("digits-classes", False, 0).settings == EXPERIMENTS["digits-classes"].full
    task = build_task("digits-classes", "quick", 0, overrides={"lr": 0.5})
    assert task.settings.lr == 0.5 and task.settings.batch_size == EXPERIMENTS["digits-classes"].quick.batch_size
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        build_task("digits-classes", "fast", 0)
    with pytest.raises(ValueError, match="unknown experiment"):
        build_task("mnist", "quick", 0)
