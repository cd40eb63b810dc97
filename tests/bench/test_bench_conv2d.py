"""bench/bench_conv2d.py end to end on its --quick shapes, plus its case table and error-subset rule.

Run as a subprocess, the way people run it, so argument parsing, the CSV/markdown output and the imports of its
sibling modules are exercised. A second, one-case run shows that results are appended to the CSV, never rewritten.
"""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from rtl_kernels import _extension

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_conv2d.py"
PROVIDERS = {"B0", "B0m", "B1", "ours:cpu", "route_prep"}
FWD_ONLY = {"route_prep"}
HAS_CPU_EXT = _extension.load("_C")[0] is not None


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_conv2d_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
DEFAULT_CASES = [c.name for c in bench.cpu_cases()]


def _run(results_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the Triton tests; the benchmark must not inherit it
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results-dir", str(results_dir), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"bench_conv2d failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
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
    csv_path = tmp_path / "conv2d_cpu.csv"
    assert csv_path.exists()
    first_text = csv_path.read_text()
    rows = _rows(csv_path)

    assert [c for c in dict.fromkeys(r["case"] for r in rows)] == DEFAULT_CASES
    assert {r["op"] for r in rows} == {"conv2d", "conv_transpose2d"}
    assert any(r["groups"] != "1" for r in rows), "the depthwise GhostNet layers are in the run"
    for case in DEFAULT_CASES:
        case_rows = [r for r in rows if r["case"] == case]
        assert {r["provider"] for r in case_rows} == PROVIDERS, case
        for provider in PROVIDERS:
            modes = [r["mode"] for r in case_rows if r["provider"] == provider]
            assert sorted(modes) == (["fwd"] if provider in FWD_ONLY else ["fwd", "fwd+bwd"]), (case, provider)

    for r in rows:
        if r["provider"] != "ours:cpu" or HAS_CPU_EXT:
            assert r["status"] == "ok", r
        if r["status"] != "ok":
            assert r["status"] in ("error", "unavailable") and r["error"], r
            continue
        for key in ("median_ms", "p10_ms", "p90_ms", "ratio_vs_B0", "ratio_vs_B1", "gflop_fwd"):
            assert _positive(r[key]), (key, r)
        assert float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]), r
        assert int(r["repeats"]) >= 1
        if r["provider"] != "route_prep":
            # fp32, fan-in at most 16 * 9 on the quick shapes, against a float64 computation of the same function
            assert float(r["max_abs_err"]) < 1e-4, r
            done, total = map(int, r["err_images"].split("/"))
            assert done == total == int(r["B"]), r  # quick shapes are small enough to check every image
        for key in ("device", "torch", "threads", "git_rev"):
            assert r[key], (key, r)
        assert r["quick"] == "1"
        assert abs(float(r["sparsity_measured"]) - float(r["sparsity"])) < 0.02, r

    ours_with_target = [r for r in rows if r["provider"] == "ours:cpu" and r["target"]]
    assert {r["case"] for r in ours_with_target} >= {"ghost_stem_u50", "unet_dec_48_12_u50", "resnet_c256_14_u90"}
    assert all(r["target_met"] == "n/a (quick shapes)" for r in ours_with_target)

    md = list(tmp_path.glob("conv2d_cpu_*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert all(f"### {case}:" in text for case in DEFAULT_CASES)
    assert "resnet_c256_56_u50" in text  # the skipped case is named

    # Second run: a family name selects its cases (and the opt-in case is reachable); rows are appended under the
    # same header and the first run's bytes are untouched.
    _run(tmp_path, "--cases", "unet,resnet_c256_56_u50")
    second_text = csv_path.read_text()
    assert second_text.startswith(first_text)
    added = _rows(csv_path)[len(rows) :]
    assert {r["case"] for r in added} == {c for c in DEFAULT_CASES if c.startswith("unet_")} | {"resnet_c256_56_u50"}
    assert {r["provider"] for r in added} == PROVIDERS
    assert len({r["run_id"] for r in rows}) == 1 and added[0]["run_id"] != rows[0]["run_id"]
    assert second_text.count("run_id,") == 1  # one header line


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
    assert not (tmp_path / "conv2d_cpu.csv").exists()


def test_cases_have_the_issue_shapes_and_targets():
    cases = {c.name: c for c in bench.cpu_cases(include_opt_in=True)}
    ghost = [c for c in cases.values() if c.family == "ghostnet"]
    assert 5 <= len(ghost) <= 6 and all(c.batch == 320 and c.tickets == 10 and c.sparsity == 0.5 for c in ghost)
    assert any(c.groups == c.c_in == c.c_out > 1 for c in ghost)  # depthwise
    unet = [c for c in cases.values() if c.family == "unet"]
    assert all(c.tickets == 3 for c in unet) and any(c.op == "conv_transpose2d" for c in unet)
    dec = cases["unet_dec_48_12_u50"]
    assert dec.out_size == (626, 64) and dec.weight_shape == (48, 12, 3, 3)
    resnet = [c for c in cases.values() if c.family == "resnet"]
    assert {(c.c_in, c.h, c.sparsity) for c in resnet} == {
        (64, 56, 0.5), (64, 56, 0.9), (256, 14, 0.5), (256, 14, 0.9), (256, 14, 0.95), (256, 56, 0.5), (256, 56, 0.9)
    }  # fmt: skip
    assert all(c.batch == 32 and c.tickets == 8 and c.out_size == (c.h, c.w) for c in resnet)
    for c in ghost + unet:
        assert {(t.mode, t.against) for t in c.targets} == {("fwd", "B0"), ("fwd+bwd", "B1")}
    assert [t.text for t in cases["resnet_c256_14_u90"].targets] == ["fwd >= 3x faster than B0"]
    assert [t.text for t in cases["resnet_c256_14_u95"].targets] == ["fwd >= 4x faster than B0"]
    assert [t.text for t in cases["resnet_c256_56_u90"].targets] == ["fwd >= 2x faster than B0"]
    assert not cases["resnet_c64_56_u90"].targets
    # quick shapes keep the layer kind
    q = bench.quick_case(cases["ghost_b4_dw5_s2_u50"])
    assert q.groups == q.c_in == q.c_out and q.kernel == (5, 5) and q.stride == (2, 2)


def test_error_check_subset_covers_every_ticket():
    case = {c.name: c for c in bench.cpu_cases()}["resnet_c64_56_u50"]
    route = torch.arange(case.batch) % case.tickets
    images = bench.reference_images(case, route)
    assert 0 < images.numel() < case.batch
    assert set(route[images].tolist()) == set(range(case.tickets))
    small = {c.name: c for c in bench.cpu_cases()}["ghost_stem_u50"]
    assert bench.reference_images(small, torch.arange(small.batch) % small.tickets).numel() == small.batch
