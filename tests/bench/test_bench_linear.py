"""bench/bench_linear.py end to end on its --quick shapes (``python -m bench linear``), and its cases and providers.

The benchmark is run as a subprocess, the way people run it, so argument parsing and the CSV/markdown output are
exercised too. Two runs (the second on one case only, to stay well under a minute) show that results are appended to
the CSV, never overwritten. The harness itself (the float64 check, verdicts, CSV and tables) is tested in
test_harness.py.
"""

import csv
import math
from pathlib import Path

import torch

from bench import bench_linear as bench
from bench import harness
from rtl_kernels import _extension

CPU_CASES = ["b_1024_u90", "b_1024_u95", "b_1024_u50", "small_groups_u90", "inr_u50", "inr_u75"]
PROVIDERS = {"B0", "B0m", "B1", "B3", "B5", "ours:cpu", "route_prep"}
FWD_ONLY = {"B5", "route_prep"}
HAS_CPU_EXT = _extension.load("_C")[0] is not None


def _run(run_bench, results_dir, *extra):
    return run_bench("linear", "--quick", "--results-dir", str(results_dir), *extra, timeout=120)


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    try:
        v = float(value)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def test_quick_run_records_every_provider_and_appends(tmp_path, run_bench):
    _run(run_bench, tmp_path)
    csv_path = tmp_path / "linear_cpu.csv"
    assert csv_path.exists()
    first_text = csv_path.read_text()
    rows = _rows(csv_path)

    assert {r["case"] for r in rows} == set(CPU_CASES)
    for case in CPU_CASES:
        case_rows = [r for r in rows if r["case"] == case]
        assert {r["provider"] for r in case_rows} == PROVIDERS, case
        for provider in PROVIDERS:
            modes = {r["mode"] for r in case_rows if r["provider"] == provider}
            assert modes == ({"fwd"} if provider in FWD_ONLY else {"fwd", "fwd+bwd"}), (case, provider, modes)

    # The dense and naive baselines must run everywhere; B3/B5 may be unavailable on other torch builds, but then
    # the row says so instead of vanishing.
    for r in rows:
        assert r["status"] in ("ok", "error", "unavailable"), r
        if r["provider"] in ("B0", "B0m", "B1", "route_prep") or (r["provider"] == "ours:cpu" and HAS_CPU_EXT):
            assert r["status"] == "ok", r
        if r["status"] != "ok":
            assert r["error"], r
            continue
        for key in ("median_ms", "p10_ms", "p90_ms", "ratio_vs_B0", "ratio_vs_B1"):
            assert _positive(r[key]), (key, r)
        assert float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]), r
        assert int(r["repeats"]) >= 1
        if r["provider"] != "route_prep":
            # fp32 on 48-long dot products against a float64 reference of the same function
            assert float(r["max_abs_err"]) < 1e-4, r
        for key in ("device", "torch", "threads", "git_rev"):
            assert r[key], (key, r)
        assert r["quick"] == "1"

    ours_with_target = [r for r in rows if r["provider"] == "ours:cpu" and r["target"]]
    assert ours_with_target, "the cpu cases all have forward targets"
    assert all(r["target_met"] == "n/a (quick shapes)" for r in ours_with_target)

    md = list(tmp_path.glob("linear_cpu_*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert all(f"### {case}" in text for case in CPU_CASES)
    assert "- command: `python -m bench linear --quick --results-dir" in text
    assert "| provider | fwd ms (p10–p90) | fwd vs B0 | fwd vs B1 | fwd+bwd ms (p10–p90) |" in text

    # Second run: one case, appended under the same header; the first run's bytes are untouched.
    _run(run_bench, tmp_path, "--cases", "b_1024_u90")
    second_text = csv_path.read_text()
    assert second_text.startswith(first_text)
    rows2 = _rows(csv_path)
    added = rows2[len(rows) :]
    assert added and {r["case"] for r in added} == {"b_1024_u90"}
    assert {r["provider"] for r in added} == PROVIDERS
    assert len({r["run_id"] for r in rows}) == 1 and added[0]["run_id"] != rows[0]["run_id"]
    assert second_text.count("run_id,") == 1  # one header line
    # ...and the second run's table goes beside the first one's, which stays as it was.
    assert md[0].read_text() == text
    md2 = sorted(set(tmp_path.glob("linear_cpu_*.md")) - set(md))
    assert [p.name for p in md2] == [md[0].stem + "_2.md"]
    assert "### b_1024_u90" in md2[0].read_text()


def test_unknown_case_is_refused(tmp_path, run_bench):
    proc = run_bench("linear", "--quick", "--results-dir", str(tmp_path), "--cases", "no_such_case", check=False)
    assert proc.returncode != 0
    assert "unknown case(s) no_such_case for cpu; choose from b_1024_u90" in proc.stderr
    assert not (tmp_path / "linear_cpu.csv").exists()


def test_cases_and_their_quick_shapes():
    cpu = {c.name: c for c in bench.cpu_cases()}
    assert list(cpu) == CPU_CASES and all(c.dtype == torch.float32 and c.family == "" for c in cpu.values())
    assert [t.text for t in cpu["b_1024_u90"].targets] == ["fwd >= 3x faster than B0", "fwd >= 2x faster than B5"]
    gpu = bench.gpu_cases()
    assert {c.dtype for c in gpu} == {torch.float32, torch.bfloat16} and len({c.name for c in gpu}) == len(gpu)
    blk = {c.name: c for c in gpu}["b_4096_blk64_90_bf16"]
    assert blk.structure == "block64x64" and blk.base == "b_4096_blk64_90"
    q = blk.quick()
    assert (q.rows, q.n, q.k, q.block, q.tickets, q.sparsity, q.dtype) == (96, 64, 48, (16, 16), 8, 0.9, torch.bfloat16)
    names = [c.name for c in harness.select_cases(gpu, "inr_u50", "cuda", quick=False)]
    assert names == ["inr_u50_bf16", "inr_u50_fp32"]


def test_providers_compute_their_functions_and_a_wrong_route_is_caught():
    case = {c.name: c for c in bench.cpu_cases()}["b_1024_u90"].quick()
    prepared = bench.prepare(case, torch.device("cpu"), None)
    providers = {p.name: p for p in prepared.providers}
    assert list(providers) == ["B0", "B0m", "B1", "B3", "B5", "ours:cpu", "route_prep"]
    assert set(providers["B5"].steps) == {"fwd"} and set(providers["B1"].steps) == {"fwd", "fwd+bwd"}
    for name in ("B0", "B0m", "B1", "B3", "B5", "ours:cpu"):
        p = providers[name]
        if p.unavailable:
            continue
        err, problem = harness.check_provider(p, prepared.references, harness.TOLERANCE[torch.float32])
        assert problem is None and err < 1e-5, (name, err)
    # The references are per function: the dense output is not the routed one, so B0 as "routed" is refused.
    wrong = harness.Provider("B0", "baseline", {}, output=providers["B0"].output, reference="routed")
    assert harness.check_provider(wrong, prepared.references, harness.TOLERANCE[torch.float32])[1] is not None
