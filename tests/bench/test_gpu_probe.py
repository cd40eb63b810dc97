"""bench/gpu_probe.py without a GPU (its dry run, its refusal, its tables from a CPU run with a stand-in timer) and
bench/run_gpu.sh's syntax and usage exit."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_probe

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "run_gpu.sh"


def test_cases_follow_the_inr_model_and_the_gpu_target():
    big, inr = gpu_probe.probe_cases()
    assert (big.rows, big.n, big.k, big.tickets, big.sparsity, big.block) == (8192, 4096, 4096, 8, 0.9, (64, 64))
    width = gpu_probe.inr_hidden()
    assert (inr.rows, inr.n, inr.k, inr.tickets, inr.block) == (65536, width, width, 6, None)
    with pytest.raises(ValueError, match="unknown case"):
        gpu_probe.select([big, inr], "nope")


def test_dry_run_prints_the_plan_and_checks_the_op_on_cpu(capsys):
    assert gpu_probe.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for text in ("b4096_blk64_90", f"inr{gpu_probe.inr_hidden()}_u90", "masks (8, 4096, 4096) 64x64-block",
                 "useful 2.75e+10", "graph.replay()", "torch.autograd.grad"):  # fmt: skip
        assert text in out
    assert out.count(", ok") == 2, out


def test_without_cuda_it_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_probe.main(["--out", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert gpu_probe.main(["--dry-run", "--dtypes", "fp16"]) == 2


class _Graph:
    def __init__(self, forward):
        self.replay = forward


def test_a_cpu_run_writes_every_row_and_keeps_the_other_backend(monkeypatch, tmp_path):
    # Timing and graph capture need a GPU; stand-ins let the rest (checks, rows, files) run on CPU.
    monkeypatch.setattr(gpu_probe, "time_ms", lambda fn: (fn(), (2.0, 1.8, 2.2))[1])
    monkeypatch.setattr(gpu_probe, "capture_graph", lambda forward: (_Graph(forward), forward()))
    local = "cpu" if "cpu" in gpu_probe.rk.available_backends() else "reference"
    cases = gpu_probe.probe_cases()
    cpu = torch.device("cpu")
    assert gpu_probe.gpu_run(cases, ["fp32"], local, tmp_path, 60, device=cpu, quick=True) == 0
    # a backend that cannot run here: its rows say why instead of timing anything
    assert gpu_probe.gpu_run(cases[1:], ["fp32"], "cuda", tmp_path, 60, device=cpu, quick=True) == 1
    runs = json.loads((tmp_path / "gpu_probe.json").read_text())["runs"]
    assert [r["backend"] for r in runs] == [local, "cuda"] and all(r["finished"] for r in runs)
    rows = runs[0]["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        ("dense", "fwd"), ("ours", "fwd"), ("ours:graph", "fwd"), ("dense", "fwd+bwd"), ("ours", "fwd+bwd")
    }  # fmt: skip
    assert len(rows) == 10 and all(r["status"] == "ok" and r["vs_dense"] in (None, 1.0) for r in rows)
    assert all(r["max_abs_err"] < 1e-5 for r in rows)
    refused = [r for r in runs[1]["rows"] if r["provider"] != "dense"]
    assert refused and all(r["status"] == "not timed" and "unavailable" in r["note"] for r in refused)
    md = (tmp_path / "gpu_probe.md").read_text()
    assert f"## backend {local}" in md and "## backend cuda" in md and "useful TFLOP/s" in md


def test_a_case_that_cannot_be_set_up_leaves_an_error_row_and_the_rest(monkeypatch, tmp_path):
    real_prepare = gpu_probe.prepare

    def prepare(pc, *args, **kwargs):
        if pc.name.startswith("b4096"):
            raise torch.cuda.OutOfMemoryError("no room")
        return real_prepare(pc, *args, **kwargs)

    monkeypatch.setattr(gpu_probe, "prepare", prepare)
    monkeypatch.setattr(gpu_probe, "time_ms", lambda fn: (1.0, 1.0, 1.0))
    monkeypatch.setattr(gpu_probe, "capture_graph", lambda forward: (_Graph(forward), forward()))
    cpu = torch.device("cpu")
    assert gpu_probe.gpu_run(gpu_probe.probe_cases(), ["fp32"], "reference", tmp_path, 0, cpu, quick=True) == 1
    rows = json.loads((tmp_path / "gpu_probe.json").read_text())["runs"][0]["rows"]
    assert rows[0]["provider"] == "setup" and "OutOfMemoryError: no room" in rows[0]["note"]
    assert [r["status"] for r in rows[1:4]] == ["ok"] * 3
    assert {r["status"] for r in rows[4:]} == {"skipped"}  # budget 0: no fwd+bwd


def test_run_gpu_sh_parses_and_refuses_an_unknown_stage(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "nonsense"],
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "usage" in proc.stderr.lower(), proc.stderr
    assert not any((tmp_path / "out").glob("*"))  # nothing ran
