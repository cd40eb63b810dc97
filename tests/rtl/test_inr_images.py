"""`rtl run inr-images`: several images, one run each, combined (the paper's INR regime); and Spearman's ρ between a
ticket's mask similarity S_k and its own metric."""

import functools
import json
import math
import shutil
import statistics
from dataclasses import replace

import pytest

from rtl import cli, prune
from rtl.convert import convert_
from rtl.experiments import EXPERIMENTS, build_task, protocol
from rtl.experiments.aggregate import write_aggregate
from rtl.experiments.similarity_vs_performance import report_lines, spearman, ticket_spearman
from rtl.experiments.tasks import INRRegions


def test_the_images_are_capacity_limited_with_6_to_8_regions():
    exp = EXPERIMENTS["inr-images"]
    assert len(exp.images) >= 4
    # the full and paper presets are the single-image INR's
    assert exp.full == EXPERIMENTS["inr-regions"].full and exp.paper == EXPERIMENTS["inr-regions"].paper
    for name in exp.images:
        task = build_task("inr-images", "quick", 0, image=name)
        h, w, channels = task.image_shape
        prunable = prune.prunable_count(convert_(task.build_model(0), 1, filter_fn=task.prunable_filter))
        assert prunable == 53_888  # the paper's INR
        # the network cannot store the image: clearly more target values than weights (the paper's regime)
        assert channels * h * w >= 2 * prunable, (name, task.image_shape)
        assert 6 <= task.num_tickets <= 8 and all(task.subset_size(t) > 0 for t in range(task.num_tickets))
        assert name in task.description and f"{h}x{w}" in task.description


def test_spearman_on_known_ranks():
    up = [0.1, 0.4, 0.2, 0.9, 0.5]
    assert spearman(up, [2.0 * v + 1 for v in up]) == {"rho": pytest.approx(1.0), "p": pytest.approx(0.0), "n": 5}
    assert spearman(up, [10.0 - v**3 for v in up])["rho"] == pytest.approx(-1.0)  # monotone, not linear
    # a pair with NaN is left out; fewer than 3 pairs or a constant side: undefined
    assert spearman(up + [float("nan")], up + [1.0])["n"] == 5
    assert spearman([1.0, 2.0], [1.0, 2.0])["rho"] is None
    assert spearman(up, [3.0] * 5) == {"rho": None, "p": None, "n": 5}
    with pytest.raises(ValueError):
        spearman([1.0], [1.0, 2.0])


def _entry(similarity, values, kind):
    metrics = {
        "inr": {"image": {"psnr": 0.0, "psnr_per_region": values}},
        "detector": {"detectors": {"per_ticket": {"balanced_accuracy": values}}},
        "classifier": {"oracle": {}},  # no per-ticket accuracy
    }[kind]
    return {"rtl": {"similarity": similarity, "metrics": metrics}}


def test_ticket_spearman_and_its_report_section():
    sim = [0.5, 0.7, 0.6, 0.8]
    sparsities = {"0.9": _entry(sim, [4.0, 2.0, 3.0, 1.0], "inr"), "0.5": _entry(sim, [1.0, 3.0, 2.0, 4.0], "inr")}
    table = ticket_spearman("inr", sparsities)
    assert list(table) == ["0.5", "0.9"]  # by sparsity
    assert table["0.5"]["rho"] == pytest.approx(1.0) and table["0.9"]["rho"] == pytest.approx(-1.0)
    lines = report_lines("inr", sparsities)
    assert "## Ticket similarity vs ticket performance" in lines
    assert "| 0.5 | 4 | 1.00 | 0.000 |" in lines and "| 0.9 | 4 | -1.00 | 0.000 |" in lines
    detector = {"0.5": _entry(sim, [0.9, 0.9, 0.9, 0.9], "detector")}
    assert "| 0.5 | 4 | — | — |" in report_lines("detector", detector)
    # an experiment without per-ticket values gets no section
    assert report_lines("classifier", {"0.5": _entry(sim, None, "classifier")}) == []


@pytest.fixture
def small_images(monkeypatch):
    """inr-images on 2 small images (32 x 32, 4 regions), so that a whole multi-image run takes seconds."""
    names = ("astronaut", "coffee")
    small = replace(
        EXPERIMENTS["inr-images"], images=names, factory=functools.partial(INRRegions, size=32, num_regions=4)
    )
    monkeypatch.setitem(EXPERIMENTS, "inr-images", small)
    return names


def _json(path):
    return json.loads(path.read_text())


def _run(args):
    return cli.main(["run", "inr-images", "--quick", "--sparsities", "0.5", "--seed", "1"] + args)


def test_a_run_per_image_then_their_combination(small_images, tmp_path, tiny_budget):
    out = tmp_path / "run"
    assert _run(["--out", str(out)] + tiny_budget) == 0
    runs = []
    for name in small_images:
        folder = out / "images" / name
        for file in ("config.json", "metrics.json", "report.md"):
            assert (folder / file).is_file(), (name, file)
        config = _json(folder / "config.json")
        assert config["image"] == name and config["image_shape"] == [32, 32, 3] and config["num_tickets"] == 4
        # every experiment's single-run report has the S_k vs metric section
        assert "## Ticket similarity vs ticket performance" in (folder / "report.md").read_text()
        runs.append(_json(folder / "metrics.json"))
    combined = _json(out / "metrics.json")
    mean = lambda values: statistics.fmean(values)  # noqa: E731
    assert combined["dense"]["image"]["psnr"] == pytest.approx(mean([m["dense"]["image"]["psnr"] for m in runs]))
    for method in ("rtl", "single", "multi"):
        entries = [m["sparsities"]["0.5"][method] for m in runs]
        got = combined["sparsities"]["0.5"][method]
        # the paper's Table 2 average: each image's PSNR, averaged over the images
        assert got["metrics"]["image"]["psnr"] == pytest.approx(mean([e["metrics"]["image"]["psnr"] for e in entries]))
        assert got["metrics"]["image"]["psnr_per_image"] == [e["metrics"]["image"]["psnr"] for e in entries]
        assert got["metrics"]["image"]["psnr_per_region"] == sum(
            (e["metrics"]["image"]["psnr_per_region"] for e in entries), []
        )
        for field, value in entries[0]["counts"].items():  # counts: the mean over the images; per ticket: pooled
            values = [e["counts"][field] for e in entries]
            assert got["counts"][field] == (sum(values, []) if isinstance(value, list) else pytest.approx(mean(values)))
        assert got["budget"]["steps"] == sum(e["budget"]["steps"] for e in entries)
    rtl = combined["sparsities"]["0.5"]["rtl"]
    assert rtl["similarity"] == sum((m["sparsities"]["0.5"]["rtl"]["similarity"] for m in runs), [])
    region = combined["per_region"]["0.5"]
    assert region["pooled"] == spearman(rtl["similarity"], rtl["metrics"]["image"]["psnr_per_region"])
    assert region["pooled"]["n"] == 8 and set(region["per_image"]) == set(small_images)
    config = _json(out / "config.json")
    assert config["images"] == list(small_images) and config["kind"] == "inr" and config["num_tickets"] == 8

    report = (out / "report.md").read_text()
    for section in ("## PSNR averaged over the images", "## Per image", "## Per region: mask similarity vs PSNR"):
        assert section in report
    assert "| 0.5 | **mean** |" in report and "[report](images/astronaut/report.md)" in report
    assert (out / "similarity_vs_psnr.png").is_file() and (out / "psnr_vs_sparsity.png").is_file()
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0 and "## Per image" in (out / "report.md").read_text()

    # the --seeds aggregate reads a combined run as it reads any run
    for seed in (0, 1):
        shutil.copytree(out, tmp_path / "seeds" / f"seed{seed}")
    write_aggregate(str(tmp_path / "seeds"))
    table = _json(tmp_path / "seeds" / "aggregate.json")["table"]["0.5"]
    assert table["RTL (region routing)"]["mean"] == pytest.approx(rtl["metrics"]["image"]["psnr"])
    assert table["dense"]["mean"] == pytest.approx(combined["dense"]["image"]["psnr"])


def test_an_interrupted_multi_image_run_resumes(small_images, tmp_path, monkeypatch, capsys, tiny_budget):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(["--out", str(whole)] + tiny_budget) == 0

    real_save = protocol.StageStore.save

    def save_then_stop(self, stage, data):  # the second image stops after its masks
        real_save(self, stage, data)
        if stage == "rtl_masks" and self.out_dir.endswith(small_images[1]):
            raise KeyboardInterrupt

    monkeypatch.setattr(protocol.StageStore, "save", save_then_stop)
    assert _run(["--out", str(part)] + tiny_budget) == 130
    assert f"--resume {part} " in capsys.readouterr().err  # the whole run's directory, not the image's
    assert (part / "images" / small_images[0] / "metrics.json").is_file()
    assert not (part / "images" / small_images[1] / "metrics.json").exists() and not (part / "metrics.json").exists()
    monkeypatch.setattr(protocol.StageStore, "save", real_save)

    # a run in the directory is refused without --resume, and so is a resume with another configuration
    assert _run(["--out", str(part)] + tiny_budget) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["run", "inr-images", "--quick", "--sparsities", "0.6", "--resume", str(part)] + tiny_budget) == 2
    assert "another configuration" in capsys.readouterr().err

    assert _run(["--resume", str(part)] + tiny_budget) == 0
    printed = capsys.readouterr().out
    assert f"image {small_images[0]}: done earlier" in printed and "[rtl_masks] done earlier, loaded" in printed
    without_timing = lambda m: {k: v for k, v in m.items() if k not in ("speed", "environment")}  # noqa: E731
    assert without_timing(_json(part / "metrics.json")) == without_timing(_json(whole / "metrics.json"))
    for name in small_images:
        resumed, uninterrupted = (_json(d / "images" / name / "metrics.json") for d in (part, whole))
        assert without_timing(resumed) == without_timing(uninterrupted)
    assert not math.isnan(_json(part / "metrics.json")["sparsities"]["0.5"]["rtl"]["metrics"]["image"]["psnr"])
