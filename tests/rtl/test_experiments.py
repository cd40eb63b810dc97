"""`rtl run` / `rtl report` / `rtl list` end to end on tiny budgets: reports, resume, bad input, CIFAR loaders."""

import json
import os

import pytest
import torch

from rtl import cli
from rtl.experiments import protocol


def _run(args):
    return cli.main(["run"] + args)


def _without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in ("speed", "environment")}


@pytest.mark.parametrize("experiment", ["digits-classes", "digits-environments", "inr-regions"])
def test_embedded_experiment_end_to_end(experiment, tmp_path, tiny_budget):
    out = tmp_path / "run"
    assert _run([experiment, "--quick", "--sparsities", "0.3,0.6", "--out", str(out)] + tiny_budget) == 0
    for name in (
        "config.json",
        "metrics.json",
        "report.md",
        "accuracy_vs_sparsity.png",
        "similarity_vs_sparsity.png",
        "jaccard_matrix.png",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| sparsity | method |" in report and "RTL" in report and "IMP single" in report and "IMP multi" in report
    assert "## Inference speed of the routed model" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sparsities"]) == {"0.3", "0.6"}
    entry = metrics["sparsities"]["0.6"]
    config = json.loads((out / "config.json").read_text())
    # every ticket hits the target exactly: each mask keeps round((1 - s) * prunable) weights
    kept = round(0.4 * config["prunable_weights"])
    assert entry["rtl"]["counts"]["per_ticket"] == [kept] * config["num_tickets"]
    single = entry["single"]["counts"]  # the INR baseline's first layer also reads the region embedding
    assert single["single"] == round(0.4 * single["prunable"])
    assert kept <= entry["rtl"]["counts"]["union"] <= entry["rtl"]["counts"]["sum"]
    assert len(entry["rtl"]["jaccard"]) == config["num_tickets"]
    # equal budgets: every method's final training took the same steps and samples
    budgets = [metrics["dense_budget"]] + [entry[m]["budget"] for m in ("rtl", "single", "multi")]
    assert budgets[0]["steps"] > 0 and all(b == budgets[0] for b in budgets), budgets
    # the collapse study over the run's sparsities, with its verdict in the report
    assert metrics["collapse"]["sparsities"] == [0.3, 0.6] and len(metrics["collapse"]["history"]) == 2
    assert "## Collapse study" in report and "Verdict:" in report and "## Training budget" in report
    # the report can be rebuilt from the run directory alone
    os.remove(out / "report.md")
    assert cli.main(["report", str(out)]) == 0 and (out / "report.md").is_file()


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch, tiny_budget):
    args = ["digits-environments", "--quick", "--sparsities", "0.5", "--seed", "3"] + tiny_budget
    assert _run(args + ["--out", str(tmp_path / "whole")]) == 0

    real_save = protocol.StageStore.save

    def save_then_stop(self, stage, data):
        real_save(self, stage, data)
        if stage == "rtl_masks":
            raise KeyboardInterrupt

    monkeypatch.setattr(protocol.StageStore, "save", save_then_stop)
    part = tmp_path / "part"
    assert _run(args + ["--out", str(part)]) == 130
    assert not (part / "metrics.json").exists()
    monkeypatch.setattr(protocol.StageStore, "save", real_save)
    assert _run(args + ["--resume", str(part)]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((part / "metrics.json").read_text())
    assert _without_timing(resumed) == _without_timing(whole)


def test_bad_inputs(tmp_path, capsys):
    assert _run(["no-such-experiment"]) == 2
    assert "known: digits-classes, digits-environments, inr-regions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["digits-classes", "--sparsities", "0.5,1.0"])
    assert "sparsities must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["digits-classes", "--sparsities", "-0.1"])
    assert _run(["cifar10-classes", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "--download" in err
    assert _run(["digits-classes", "--set", "epochs=3"]) == 2
    assert "KEY one of" in capsys.readouterr().err
    assert _run(["digits-classes", "--set", "granularity=diagonal"]) == 2
    assert "granularity must be" in capsys.readouterr().err
    assert _run(["digits-classes", "--backend", "magic"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_resume_refuses_foreign_corrupt_and_mismatched_runs(tmp_path, capsys, tiny_budget):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert _run(["digits-classes", "--resume", str(foreign)] + tiny_budget) == 2
    assert "not an rtl run directory" in capsys.readouterr().err

    run = tmp_path / "run"
    args = ["digits-classes", "--quick", "--sparsities", "0.5"] + tiny_budget
    assert _run(args + ["--out", str(run)]) == 0
    assert _run(args + ["--out", str(run)]) == 2  # an existing run is never overwritten
    assert "--resume" in capsys.readouterr().err

    stage = run / "stages" / "rtl_masks.pt"
    stage.write_bytes(b"not a checkpoint")
    before = {p: p.read_bytes() for p in (run / "stages").rglob("*") if p.is_file()}
    metrics_before = (run / "metrics.json").read_bytes()
    assert _run(args + ["--resume", str(run)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (run / "stages").rglob("*") if p.is_file()} == before
    assert (run / "metrics.json").read_bytes() == metrics_before

    assert _run(["digits-classes", "--quick", "--sparsities", "0.25", "--resume", str(run)] + tiny_budget) == 2
    assert "another configuration" in capsys.readouterr().err


def test_list_names_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits-classes", "digits-environments", "inr-regions", "cifar10-classes", "cifar100-clusters"):
        assert name in out


@pytest.mark.parametrize(
    "experiment, fixture", [("cifar10-classes", "cifar10_root"), ("cifar100-clusters", "cifar100_root")]
)
def test_cifar_experiments_on_format_exact_files(experiment, fixture, tmp_path, request, tiny_budget):
    root, _ = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    assert (
        _run(
            [
                experiment,
                "--quick",
                "--sparsities",
                "0.5",
                "--data-root",
                str(root),
                "--out",
                str(out),
                "--set",
                "eval_batch=8",
            ]
            + tiny_budget
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["prunable_weights"] == 125832  # the paper's GhostNet
    assert config["num_tickets"] == (10 if experiment == "cifar10-classes" else 8)
    assert (out / "report.md").is_file()


def test_interrupted_mask_extraction_resumes_from_its_last_round(tmp_path, monkeypatch, tiny_budget):
    """An interruption inside Alg. 1 loses at most the round in progress, and the resumed masks are identical."""
    from rtl import iterative_pruning as imp_module

    args = ["digits-classes", "--quick", "--sparsities", "0.6", "--seed", "1"] + tiny_budget
    assert _run(args + ["--out", str(tmp_path / "whole")]) == 0

    real_run = imp_module.IMP.run
    calls = {"rounds": 0}

    def stop_after_two_rounds(self):
        def callback(imp, entry):
            calls["rounds"] += 1
            if calls["rounds"] == 2:
                raise KeyboardInterrupt

        self.callbacks = tuple(self.callbacks) + (callback,)
        return real_run(self)

    monkeypatch.setattr(imp_module.IMP, "run", stop_after_two_rounds)
    part = tmp_path / "part"
    assert _run(args + ["--out", str(part)]) == 130
    assert any((part / "stages").rglob("imp_checkpoint.pt"))
    monkeypatch.setattr(imp_module.IMP, "run", real_run)
    assert _run(args + ["--resume", str(part)]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((part / "metrics.json").read_text())
    assert _without_timing(resumed) == _without_timing(whole)
    rounds = json.loads((part / "logs" / "rtl_masks_rounds.json").read_text())
    # Alg. 1 runs each ticket on its own: every ticket's rounds count from 0, none lost or repeated by the resume
    per_ticket = {}
    for r in rounds:
        per_ticket.setdefault((r["target"], r["ticket"]), []).append(r["round"])
    assert len(per_ticket) == 10 and all(v == list(range(len(v))) and len(v) >= 1 for v in per_ticket.values())


def test_structured_masks_run_and_stay_structured(tmp_path, tiny_budget):
    out = tmp_path / "run"
    assert (
        _run(
            ["digits-classes", "--quick", "--sparsities", "0.5", "--out", str(out), "--set", "granularity=vector:4"]
            + tiny_budget
        )
        == 0
    )
    masks = torch.load(out / "stages" / "rtl_masks.pt", weights_only=True)["data"]["masks"]["0.5"]
    for name, m in masks.items():
        rows = m.flatten(2)  # (T, O, rest): runs of 4 along each row are all kept or all pruned
        full = rows.shape[-1] // 4 * 4
        runs = rows[..., :full].reshape(*rows.shape[:2], -1, 4)
        assert torch.all(runs.all(-1) | ~runs.any(-1)), name


def test_the_single_model_is_scored_under_the_tickets_detector_protocol_too():
    """Like-for-like: the single C-way model also gets one-vs-rest detector metrics (its class probability >= 0.5),
    beside its C-way argmax; a perfect model scores 1 under both, and a model that never commits to a class
    (uniform probabilities) fires no detector."""
    from rtl.experiments import build_task

    task = build_task("digits-classes", "quick", 0)
    seen = [0]

    def perfect(x):  # the test set arrives in order, batch after batch
        labels = task.y_test[seen[0] : seen[0] + x.shape[0]]
        seen[0] += x.shape[0]
        return 10 * torch.nn.functional.one_hot(labels, task.num_classes).float()

    metrics = task.evaluate_single(perfect)
    assert seen[0] == task.y_test.shape[0]
    assert metrics["multiclass"]["balanced_accuracy"] == 1.0
    assert metrics["detectors"]["balanced_accuracy"] == 1.0 and len(metrics["detectors"]["per_ticket"]["recall"]) == 10
    uniform = task.evaluate_single(lambda x: torch.zeros(x.shape[0], task.num_classes))
    assert uniform["detectors"]["recall"] == 0.0


def test_collapse_study_flags_a_similarity_jump_with_a_metric_drop():
    """A ticket whose mask moves away from the others (S_k falls) while its metric drops is flagged at that
    sparsity; the others, steady, are not; the study's history has the global and per-layer scores."""
    from rtl.experiments.collapse import collapse_study

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 20, 30, generator=gen) < 0.5
    steady = base.expand(3, -1, -1).clone()
    moved = steady.clone()
    moved[2] = ~base[0]  # ticket 2 keeps the weights the others prune
    masks = {"0.5": {"layer": steady}, "0.9": {"layer": moved}}
    metrics = {
        "0.5": {"detectors": {"per_ticket": {"balanced_accuracy": [0.9, 0.9, 0.9]}}},
        "0.9": {"detectors": {"per_ticket": {"balanced_accuracy": [0.89, 0.9, 0.6]}}},
    }
    study = collapse_study("detector", masks, metrics)
    assert study["sparsities"] == [0.5, 0.9]
    assert [(f["sparsity"], f["ticket"]) for f in study["flagged"]] == [(0.9, 2)]
    assert study["flagged"][0]["metric_change"] == pytest.approx(-0.3)
    assert "layer" in study["history"][1]["layer_scores"] and len(study["history"][1]["scores"]) == 3
