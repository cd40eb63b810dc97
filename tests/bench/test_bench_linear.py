"""bench/bench_linear.py end to end on its --quick shapes, and the shared helpers of bench/common.py.

The script is run as a subprocess, the way people run it, so argument parsing, the CSV/markdown output and the
import of its sibling module are exercised too. Two runs (the second on one case only, to stay well under a
minute) show that results are appended to the CSV, never overwritten.
"""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtl_kernels import _extension

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_linear.py"
CPU_CASES = ["b_1024_u90", "b_1024_u95", "b_1024_u50", "small_groups_u90", "inr_u50", "inr_u75"]
PROVIDERS = {"B0", "B0m", "B1", "B3", "B5", "ours:cpu", "route_prep"}
FWD_ONLY = {"B5", "route_prep"}
HAS_CPU_EXT = _extension.load("_C")[0] is not None


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common_under_test", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(module)
    return module


common = _load_common()


def _run(results_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The test suite's conftest sets TRITON_INTERPRET for the Triton tests; the benchmark should not inherit it.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results-dir", str(results_dir), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"bench_linear failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    try:
        v = float(value)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def test_quick_run_records_every_provider_and_appends(tmp_path):
    _run(tmp_path)
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

    # Second run: one case, appended under the same header; the first run's bytes are untouched.
    _run(tmp_path, "--cases", "b_1024_u90")
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


def test_unknown_case_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results-dir", str(tmp_path), "--cases", "no_such_case"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no_such_case" in proc.stderr
    assert not (tmp_path / "linear_cpu.csv").exists()


def test_unstructured_masks_have_exact_sparsity_and_differ_per_ticket():
    m = common.unstructured_masks(3, 40, 30, 0.9, seed=1)
    assert m.dtype == torch.bool and m.shape == (3, 40, 30)
    assert m.reshape(3, -1).sum(1).tolist() == [120, 120, 120]
    assert not torch.equal(m[0], m[1])
    assert torch.equal(m, common.unstructured_masks(3, 40, 30, 0.9, seed=1))


def test_block_masks_are_whole_blocks():
    m = common.block_masks(2, 40, 36, 0.5, 16, 16, seed=3)  # 3 x 3 blocks, edge blocks cut
    assert m.shape == (2, 40, 36)
    for t in range(2):
        kept = 0
        for nb in range(3):
            for kb in range(3):
                block = m[t, nb * 16 : (nb + 1) * 16, kb * 16 : (kb + 1) * 16]
                assert block.all() or not block.any()
                kept += int(block.any())
        assert kept == round(0.5 * 9)


def test_append_csv_keeps_old_rows_and_refuses_another_header(tmp_path):
    path = tmp_path / "r.csv"
    assert common.append_csv(path, [{"a": 1, "b": 0.5}], ["a", "b"]) == 1
    common.append_csv(path, [{"a": 2, "b": None}], ["a", "b"])
    assert path.read_text().splitlines() == ["a,b", "1,0.5", "2,"]
    with pytest.raises(ValueError, match="columns"):
        common.append_csv(path, [{"a": 3}], ["a"])
    assert path.read_text().splitlines() == ["a,b", "1,0.5", "2,"]


def test_markdown_table_and_timing():
    table = common.markdown_table(["x", "y"], [["a|b", 1]])
    assert table.splitlines() == ["| x | y |", "|:---|---:|", "| a\\|b | 1 |"]
    t = common.time_fn(lambda: None, "cpu", warmup=1, repeats=5)
    assert t.repeats == 5 and 0 <= t.p10_ms <= t.median_ms <= t.p90_ms
    env = common.environment(torch.device("cpu"))
    assert env["device_kind"] == "cpu" and env["git_rev"] and int(env["threads"]) >= 1
