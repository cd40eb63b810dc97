"""`rtl run --seeds`: every seed in its own directory, resumable per seed, and the aggregate over the seeds (mean ±
std per method, paired RTL-minus-baseline differences with a 95 % interval)."""

import json
import math

import pytest

from rtl import cli
from rtl.experiments.aggregate import interval95


def test_interval95_is_students_t_over_the_values():
    mean, low, high = interval95([1.0, 2.0, 3.0])
    # sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    assert mean == 2.0 and high - mean == pytest.approx(2.484138, rel=1e-6) and mean - low == pytest.approx(high - mean)
    assert math.isnan(interval95([0.5])[1])


def test_seeds_run_resume_per_seed_and_aggregate(tmp_path, tiny_budget, capsys):
    out = tmp_path / "seeds"
    args = ["run", "digits-environments", "--quick", "--sparsities", "0.5", "--seeds", "0,1"] + tiny_budget
    assert cli.main(args + ["--out", str(out)]) == 0
    for seed in (0, 1):
        assert json.loads((out / f"seed{seed}" / "config.json").read_text())["seed"] == seed
    seed_metrics = [json.loads((out / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["seeds"] == [0, 1]
    rows = aggregate["table"]["0.5"]
    primary, dense = "RTL, oracle environment routing", "dense"
    values = [m["sparsities"]["0.5"]["rtl"]["metrics"]["oracle"]["balanced_accuracy"] for m in seed_metrics]
    dense_values = [m["dense"]["multiclass"]["balanced_accuracy"] for m in seed_metrics]
    assert rows[primary]["mean"] == pytest.approx(sum(values) / 2)
    assert rows[primary]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    diff = [a - b for a, b in zip(values, dense_values)]
    assert rows[dense]["rtl_minus"] == pytest.approx(sum(diff) / 2)
    assert rows[dense]["rtl_minus_low"] <= rows[dense]["rtl_minus"] <= rows[dense]["rtl_minus_high"]
    assert "rtl_minus" not in rows[primary]
    text = (out / "aggregate.md").read_text()
    assert "2 seeds (0, 1)" in text and "| 0.5 | IMP single (C-way classifier) |" in text
    assert (out / "aggregate_vs_sparsity.png").is_file()

    # a seed lost to an interruption is redone on resume; a finished one is kept as it is
    kept = (out / "seed0" / "metrics.json").read_bytes()
    (out / "seed1" / "metrics.json").unlink()
    capsys.readouterr()
    assert cli.main(args + ["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seed 0: done earlier" in printed and "[dense] done earlier, loaded" in printed
    assert (out / "seed0" / "metrics.json").read_bytes() == kept
    assert json.loads((out / "seed1" / "metrics.json").read_text())["sparsities"] == seed_metrics[1]["sparsities"]

    # rtl report on the directory rebuilds every seed's report and the aggregate
    (out / "aggregate.md").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "aggregate.md").is_file()


def test_seed_and_seeds_together_are_refused(tmp_path, tiny_budget, capsys):
    args = ["run", "digits-environments", "--quick", "--seed", "3", "--seeds", "0,1", "--out", str(tmp_path / "x")]
    assert cli.main(args + tiny_budget) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "digits-environments", "--seeds", "1,1"])
