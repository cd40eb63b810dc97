"""bench/report.py on small synthetic CSVs, and the checkout's entry point ``python -m bench``.

The CSVs are written in a temporary folder: two devices, each with two runs (the newer one written first in the
file, so "latest" has to come from the timestamps), a --quick run that must be left out by default, and a models
CSV with most columns missing (no run id, no timestamp, no ratio columns) whose ratios must be computed from the
medians.
"""

import csv
from pathlib import Path

import pytest

from bench import __main__ as entry
from bench import report

FIELDS = ["run_id", "timestamp", "device_kind", "device", "torch", "threads", "git_rev", "quick", "case", "T",
          "sparsity", "mask_structure", "provider", "mode", "status", "median_ms", "ratio_vs_B0", "ratio_vs_B1",
          "target_met"]  # fmt: skip


def _rows(run_id, stamp, device, kind, rev, medians, quick=0, cases=(("c_u50", 0.5), ("c_u90", 0.9))):
    """Rows of one run: medians maps provider -> median ms (the same for every case and mode)."""
    out = []
    for case, sparsity in cases:
        for mode in ("fwd", "fwd+bwd"):
            for provider, median in medians.items():
                out.append(dict(
                    run_id=run_id, timestamp=stamp, device_kind=kind, device=device, torch="2.99.0", threads=2,
                    git_rev=rev, quick=quick, case=case, T=8, sparsity=sparsity, mask_structure="unstructured",
                    provider=provider, mode=mode, status="ok", median_ms=median,
                    ratio_vs_B0=medians["B0"] / median, ratio_vs_B1=medians["B1"] / median,
                    target_met="met" if provider.startswith("ours") and mode == "fwd" else "",
                ))  # fmt: skip
    return out


def _write(path: Path, rows, fields=FIELDS):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def results(tmp_path):
    """A results folder: CPU-X (linear: 2 runs), GPU-Y (linear: 1 run + 1 quick run), CPU-X models (no run ids)."""
    d = tmp_path / "results"
    d.mkdir()
    new = _rows(
        "new", "2026-01-02T09:00:00+00:00", "CPU-X", "cpu", "bbbbbbb", {"B0": 10.0, "B1": 30.0, "ours:cpu": 5.0}
    )
    old = _rows(
        "old",
        "2026-01-01T09:00:00+00:00",
        "CPU-X",
        "cpu",
        "aaaaaaa",
        {"B0": 10.0, "B1": 30.0, "ours:cpu": 20.0},
        cases=(("c_u50", 0.5), ("c_u90", 0.9), ("c_gone_u75", 0.75)),
    )
    _write(d / "linear_cpu.csv", new + old)  # newest first in the file: latest must come from the timestamps
    gpu = _rows("g1", "2026-01-01T08:00:00+00:00", "GPU-Y", "cuda", "ccccccc",
                {"B0": 4.0, "B1": 16.0, "ours:triton": 1.0, "ours:cuda": 2.0})  # fmt: skip
    quick = _rows("g2", "2026-01-03T08:00:00+00:00", "GPU-Y", "cuda", "ddddddd",
                  {"B0": 4.0, "B1": 16.0, "ours:triton": 400.0, "ours:cuda": 400.0}, quick=1)  # fmt: skip
    _write(d / "linear_cuda.csv", gpu + quick)
    # The models CSV as another benchmark might write it: no run id, timestamp, ratios, status, T or target.
    models = _rows("", "", "CPU-X", "cpu", "bbbbbbb", {"B0": 8.0, "B1": 12.0, "ours:auto": 4.0},
                   cases=(("net_u50", 0.5),))  # fmt: skip
    for r in models:
        r["mode"] = {"fwd": "infer", "fwd+bwd": "train_step"}[r["mode"]]
    _write(d / "models_cpu.csv", models, ["device", "torch", "git_rev", "case", "sparsity", "provider", "mode",
                                          "median_ms"])  # fmt: skip
    (d / "notes.csv").write_text("a,b\n1,2\n")
    return d


def _section(text: str, device: str, op: str) -> str:
    """The part of summary.md under '## device' / '### op'."""
    after_device = text.split(f"\n## {device}\n", 1)[1].split("\n## ", 1)[0]
    return after_device.split(f"\n### {op}\n", 1)[1].split("\n### ", 1)[0]


def test_latest_run_per_device_and_op_and_its_ratios(results, tmp_path):
    out = tmp_path / "out"
    summary = report.write_report(results, out)
    assert summary == out / "summary.md"
    text = summary.read_text()

    cpu = _section(text, "CPU-X", "linear")
    assert "git bbbbbbb" in cpu and "run new" in cpu and "torch 2.99.0" in cpu
    assert "aaaaaaa" not in cpu and "run old" not in cpu
    # B0 10 ms, B1 30 ms, ours 5 ms: 2x faster than B0, 6x faster than B1.
    assert "| c_u90 | fwd | 8 | 90% | 10.0 | 30.0 | 5.00 | 2.00x | 6.00x | met |" in cpu
    assert "| c_u50 | fwd+bwd | 8 | 50% | 10.0 | 30.0 | 5.00 | 2.00x | 6.00x |  |" in cpu
    assert "0.50x" not in cpu  # the old run's ratio
    assert "cases only in older runs (see --all-runs): c_gone_u75" in cpu

    gpu = _section(text, "GPU-Y", "linear")
    assert "git ccccccc" in gpu and "ddddddd" not in gpu  # the later run is a quick one: left out
    assert "| ours:triton ms | ours:triton vs B0 | ours:triton vs B1 | ours:cuda ms |" in gpu
    assert "| c_u50 | fwd | 8 | 50% | 4.00 | 16.0 | 1.00 | 4.00x | 16.00x | 2.00 | 2.00x | 8.00x |" in gpu
    assert "1 of them" in text

    models = _section(text, "CPU-X", "models")  # ratios computed from the medians
    assert "| net_u50 | infer | 50% | 8.00 | 12.0 | 4.00 | 2.00x | 3.00x |" in models
    assert "| net_u50 | train_step | 50% | 8.00 | 12.0 | 4.00 | 2.00x | 3.00x |" in models

    assert "notes.csv: no `provider` column" in text
    assert text.index("## CPU-X") < text.index("## GPU-Y")
    cpu_block = text.split("## CPU-X", 1)[1].split("## GPU-Y", 1)[0]
    assert cpu_block.index("### linear") < cpu_block.index("### models")


def test_plots_exist_and_output_is_deterministic(results, tmp_path):
    out = tmp_path / "out"
    report.write_report(results, out)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["linear_cpu-x_speedup.png", "linear_gpu-y_speedup.png", "models_cpu-x_speedup.png"]
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in (out / "summary.md").read_text()
    first = {p.name: p.read_bytes() for p in [out / "summary.md", *(out / "plots").iterdir()]}
    report.write_report(results, out)
    second = {p.name: p.read_bytes() for p in [out / "summary.md", *(out / "plots").iterdir()]}
    assert first == second


def test_all_runs_and_include_quick(results, tmp_path):
    text = report.write_report(results, tmp_path / "a", all_runs=True).read_text()
    cpu = _section(text, "CPU-X", "linear")
    assert cpu.index("run old") < cpu.index("run new")  # oldest first
    assert "| c_u90 | fwd | 8 | 90% | 10.0 | 30.0 | 20.0 | 0.50x | 1.50x | met |" in cpu
    assert "| c_gone_u75 | fwd |" in cpu
    assert "ddddddd" not in text

    text = report.write_report(results, tmp_path / "b", include_quick=True).read_text()
    gpu = _section(text, "GPU-Y", "linear")
    assert "git ddddddd" in gpu and "quick run: smoke shapes" in gpu
    assert "0.01x" in gpu  # 4 ms over 400 ms


def test_speedups_prefer_the_csv_ratio_and_skip_failed_rows():
    rows = [
        dict(case="c", mode="fwd", provider="B0", median_ms="10", _line="1"),
        dict(case="c", mode="fwd", provider="B1", median_ms="40", _line="2"),
        dict(case="c", mode="fwd", provider="ours:cpu", median_ms="5", ratio_vs_B0="2.5", _line="3"),
        dict(case="c", mode="fwd", provider="ours:cuda", status="unavailable", median_ms="", _line="4"),
    ]
    run = report.Run(op="linear", device="d", run_id="r", rows=rows)
    figures = report.speedups(run)
    assert figures[("c", "fwd", "ours:cpu")]["ratio_vs_B0"] == 2.5  # as written in the CSV
    assert figures[("c", "fwd", "ours:cpu")]["ratio_vs_B1"] == pytest.approx(8.0)  # computed: 40 / 5
    assert figures[("c", "fwd", "ours:cuda")] == {"median_ms": None, "ratio_vs_B0": None, "ratio_vs_B1": None}
    table = report.run_table(run)
    assert "| c | fwd |  | 10.0 | 40.0 | 5.00 | 2.50x | 8.00x | unavailable |  |  |" in table


def test_plot_points_split_mask_structures_only_when_mixed():
    def row(case, structure, provider, median):
        return dict(case=case, mode="fwd", provider=provider, median_ms=str(median), sparsity="0.9",
                    mask_structure=structure, _line="1")  # fmt: skip

    rows = [row("u90", "unstructured", "B0", 8), row("u90", "unstructured", "ours:cuda", 4),
            row("blk90", "block64x64", "B0", 8), row("blk90", "block64x64", "ours:cuda", 1)]  # fmt: skip
    mixed = report.plot_points([report.Run(op="linear", device="d", run_id="r", rows=rows)])
    assert mixed == {"fwd": {("ours:cuda", "unstructured"): [(0.9, 2.0)], ("ours:cuda", "block64x64"): [(0.9, 8.0)]}}
    single = report.plot_points([report.Run(op="linear", device="d", run_id="r", rows=rows[:2])])
    assert single == {"fwd": {("ours:cuda", ""): [(0.9, 2.0)]}}  # B0 itself is not a line


@pytest.mark.parametrize("name,op", [("linear_cpu.csv", "linear"), ("conv2d_cuda.csv", "conv2d"),
                                     ("models_cpu.csv", "models"), ("plain.csv", "plain")])  # fmt: skip
def test_op_of(name, op):
    assert report.op_of(Path(name)) == op


def test_slug():
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.slug("***") == "unknown"


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder .* does not exist"):
        report.write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="no benchmark rows in any CSV under"):
        report.write_report(tmp_path)
    quick = _rows("q", "2026-01-01T00:00:00", "CPU-X", "cpu", "a", {"B0": 1, "B1": 2, "ours:cpu": 1}, quick=1)
    _write(tmp_path / "linear_cpu.csv", quick)
    with pytest.raises(ValueError, match="every run under .* is a --quick run"):
        report.write_report(tmp_path)
    assert report.main(["--results", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------------- python -m bench
def test_entry_point_refuses_an_unknown_or_missing_target(capsys):
    assert entry.main(["nope", "--quick"]) == 2
    assert "python -m bench: unknown target 'nope'; choose one of linear, conv2d, models, processes, report" in (
        capsys.readouterr().err
    )
    assert entry.main([]) == 2
    assert "python -m bench {linear,conv2d,models,report}" in capsys.readouterr().err
    assert entry.main(["--help"]) == 0
    assert "python -m bench models [ARGS...]" in capsys.readouterr().out


def test_entry_point_forwards_the_arguments_to_the_report(results, tmp_path, capfd):
    out = tmp_path / "out"
    assert entry.main(["report", "--results", str(results), "--out", str(out)]) == 0
    assert "wrote" in capfd.readouterr().out
    assert (out / "summary.md").is_file()
    assert (out / "plots" / "linear_cpu-x_speedup.png").is_file()
    assert entry.main(["report", "--results", str(tmp_path / "missing")]) == 2
    assert "report: results folder" in capfd.readouterr().err


def test_entry_point_runs_as_a_module_from_the_checkout(run_bench):
    proc = run_bench("linear", "--help", timeout=60)
    assert proc.stdout.startswith("usage: python -m bench linear") and "--quick" in proc.stdout
    proc = run_bench("models", "--help", timeout=60)
    assert all(option in proc.stdout for option in ("--profile", "--memory", "--full", "--backend", "--out"))
    proc = run_bench("conv2d", "--cases", "x", "--repeats", "0", check=False, timeout=60)
    assert proc.returncode == 2 and "--repeats must be >= 1" in proc.stderr
