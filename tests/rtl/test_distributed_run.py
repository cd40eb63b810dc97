"""`torchrun --nproc_per_node 2 -m rtl run ...` on CPU (gloo): the same masks and metrics as one process, rank 0 the
only writer of the run directory, a killed rank stopping the run cleanly, and a resume on another number of
processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

EXPERIMENT = ["digits-classes", "--quick", "--sparsities", "0.5"]
# Alg. 2 runs data-parallel: the gradients are summed over the processes in another order than in one process, and
# Adam carries those last-bit differences into the weights
WEIGHT_ATOL = 2e-3


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(processes, args):
    return (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        + [
            "-m",
            "rtl",
            "run",
        ]
        + args
    )


def _stage(run: Path, name: str):
    return torch.load(run / "stages" / f"{name}.pt", weights_only=True)["data"]


def _flat(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flat(v, f"{path}[{i}]")
    else:
        yield path, value


def _metrics_without_timing(run: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    return dict(_flat({k: v for k, v in metrics.items() if k not in ("speed", "environment")}))


def _files(run: Path):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_budget):
    out = tmp_path_factory.mktemp("one") / "run"
    cmd = [sys.executable, "-m", "rtl", "run"] + EXPERIMENT + tiny_budget + ["--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_run(run: Path, reference: Path):
    for stage in ("rtl_masks", "single_masks"):
        got, want = _stage(run, stage)["masks"], _stage(reference, stage)["masks"]
        assert got.keys() == want.keys()
        for key in want:
            for layer in want[key]:
                assert torch.equal(got[key][layer], want[key][layer]), (stage, key, layer)
    got, want = _stage(run, "rtl_at_0.5")["state"], _stage(reference, "rtl_at_0.5")["state"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL)
    got, want = _metrics_without_timing(run), _metrics_without_timing(reference)
    assert got.keys() == want.keys() and len(want) > 100
    assert got == pytest.approx(want, abs=1e-3)


def test_two_processes_give_the_one_process_masks_and_metrics(tmp_path, one_process_run, tiny_budget):
    out = tmp_path / "run"
    proc = subprocess.run(
        _torchrun(2, EXPERIMENT + tiny_budget + ["--out", str(out)]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(out, one_process_run)
    assert json.loads((out / "metrics.json").read_text())["environment"]["processes"] == 2
    # rank 0 alone writes the run directory: the same files as the one-process run, and one report line
    assert _files(out) == _files(one_process_run)
    assert proc.stdout.count("report: ") == 1


def _children(pid: int):
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_of(pid: int):
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_killed_rank_stops_the_run_which_resumes_on_one_process(tmp_path, one_process_run, tiny_budget):
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(2, EXPERIMENT + tiny_budget + ["--out", str(out)]),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # wait until Alg. 1 is under way (a ticket's IMP checkpoint exists), then kill rank 1
        deadline = time.monotonic() + 300
        while not list(out.glob("stages/rtl_masks_imp/ticket*/*/imp_checkpoint.pt")):
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "Alg. 1 did not start"
            time.sleep(0.2)
        rank1 = [pid for pid in _children(launcher.pid) if _rank_of(pid) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)  # the whole job stops in bounded time
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "rank 0 of 2 stopped: another rank failed" in stderr
    assert not (out / "metrics.json").exists()

    # the finished stages and the tickets' finished IMP rounds are kept; one process completes the run
    cmd = [sys.executable, "-m", "rtl", "run"] + EXPERIMENT + tiny_budget + ["--threads", "1", "--resume", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[dense] done earlier, loaded" in proc.stdout
    _assert_same_run(out, one_process_run)
