"""bench/bench_conv2d.py end to end on its --quick shapes (``python -m bench conv2d``), plus its case table, its
error-subset rule and its providers against the float64 references.

Run as a subprocess, the way people run it, so argument parsing and the CSV/markdown output are exercised. A second,
one-case run shows that results are appended to the CSV, never rewritten.
"""

import csv
import math
from pathlib import Path

import torch

from bench import bench_conv2d as bench
from bench import harness
from rtl_kernels import _extension

PROVIDERS = {"B0", "B0m", "B1", "ours:cpu", "route_prep"}
FWD_ONLY = {"route_prep"}
HAS_CPU_EXT = _extension.load("_C")[0] is not None
DEFAULT_CASES = [c.name for c in bench.cpu_cases()]


def _run(run_bench, results_dir, *extra):
    return run_bench("conv2d", "--quick", "--results-dir", str(results_dir), *extra, timeout=120)


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
    assert "run them with `--cases resnet_c256_56_u50`" in text  # the skipped case is named
    assert "| provider | fwd ms (p10–p90) | fwd vs B0 | fwd vs B1 | fwd+bwd ms (p10–p90) |" in text

    # Second run: a family name selects its cases (and the opt-in case is reachable); rows are appended under the
    # same header and the first run's bytes are untouched.
    _run(run_bench, tmp_path, "--cases", "unet,resnet_c256_56_u50")
    second_text = csv_path.read_text()
    assert second_text.startswith(first_text)
    added = _rows(csv_path)[len(rows) :]
    assert {r["case"] for r in added} == {c for c in DEFAULT_CASES if c.startswith("unet_")} | {"resnet_c256_56_u50"}
    assert {r["provider"] for r in added} == PROVIDERS
    assert len({r["run_id"] for r in rows}) == 1 and added[0]["run_id"] != rows[0]["run_id"]
    assert second_text.count("run_id,") == 1  # one header line


def test_unknown_case_is_refused(tmp_path, run_bench):
    proc = run_bench("conv2d", "--quick", "--results-dir", str(tmp_path), "--cases", "no_such_case", check=False)
    assert proc.returncode != 0
    assert "unknown case(s) no_such_case for cpu; choose from ghostnet, unet, resnet" in proc.stderr
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
    q = cases["ghost_b4_dw5_s2_u50"].quick()
    assert q.groups == q.c_in == q.c_out and q.kernel == (5, 5) and q.stride == (2, 2)


def test_error_check_subset_covers_every_ticket():
    case = {c.name: c for c in bench.cpu_cases()}["resnet_c64_56_u50"]
    route = torch.arange(case.batch) % case.tickets
    images = bench.reference_images(case, route)
    assert 0 < images.numel() < case.batch
    assert set(route[images].tolist()) == set(range(case.tickets))
    small = {c.name: c for c in bench.cpu_cases()}["ghost_stem_u50"]
    assert bench.reference_images(small, torch.arange(small.batch) % small.tickets).numel() == small.batch


def test_transposed_conv_providers_match_the_per_image_reference():
    case = {c.name: c for c in bench.cpu_cases()}["unet_dec_48_12_u50"].quick()
    prepared = bench.prepare(case, torch.device("cpu"), None)
    providers = {p.name: p for p in prepared.providers}
    assert list(providers) == ["B0", "B0m", "B1", "ours:cpu", "route_prep"]
    assert prepared.check_columns == {"err_images": f"{case.batch}/{case.batch}"}
    assert prepared.references["routed"].shape == (case.batch, case.c_out, *case.out_size)
    for name in ("B0", "B0m", "B1", "ours:cpu"):
        if providers[name].unavailable:
            continue
        err, problem = harness.check_provider(providers[name], prepared.references, harness.TOLERANCE[torch.float32])
        assert problem is None and err < 1e-5, (name, err)
