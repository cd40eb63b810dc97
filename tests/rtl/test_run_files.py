"""Every file `rtl run` and `rtl report` read, damaged: a clean one-line error (exit code 2) that says what to do,
nothing overwritten; and one run per directory at a time."""

import os
import signal
import subprocess
import sys

import pytest

from rtl import cli
from rtl.experiments import run_lock


@pytest.fixture(scope="module")
def run_args(tiny_budget):
    """A whole `rtl run` on the smallest experiment and budget."""
    return ["digits-environments", "--quick", "--sparsities", "0.5"] + tiny_budget


def _snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line_error(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("rtl: ") and "Traceback" not in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, run_args):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["run"] + run_args + ["--out", str(out)]) == 0
    return out


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # valid JSON of the wrong shape, or a torch file of something else
        if path.suffix == ".json":
            path.write_text("[1, 2, 3]")
        else:
            import torch

            torch.save({"something": "else"}, path)
    return data


@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_damaged_files_of_a_finished_run_get_a_clean_error(finished_run, how, tmp_path, capsys, run_args):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    files = sorted(p for p in run.rglob("*") if p.suffix in (".json", ".pt") and p.is_file())
    assert any(p.name == "config.json" for p in files) and any(p.parent.name == "stages" for p in files)
    for path in files:
        original = _damage(path, how)
        for command in (["report", str(run)], ["run"] + run_args + ["--resume", str(run)]):
            before = _snapshot(run)
            capsys.readouterr()
            rc = cli.main(command)
            err = capsys.readouterr().err
            rel = path.relative_to(run)
            if rc == 2:
                assert _one_line_error(err), (rel, command[0], err)
                assert _snapshot(run) == before, (rel, command[0], "a refused command changed the run")
            else:  # a file the command does not need, or an output it rebuilds from the stages (logs, metrics)
                assert rc == 0, (rel, command[0], rc, err)
                after = _snapshot(run)
                kept = [p for p in before if p.relative_to(run).parts[0] == "stages" or p.name == "config.json"]
                assert all(after.get(p) == before[p] for p in kept), (rel, command[0], "a stage was rewritten")
        path.write_bytes(original)


def test_truncated_imp_checkpoint_gets_a_clean_error(tmp_path, monkeypatch, capsys, run_args):
    from rtl import iterative_pruning as imp_module

    real_run = imp_module.IMP.run

    def stop_after_one_round(self):
        def callback(imp, entry):
            raise KeyboardInterrupt

        self.callbacks = tuple(self.callbacks) + (callback,)
        return real_run(self)

    monkeypatch.setattr(imp_module.IMP, "run", stop_after_one_round)
    run = tmp_path / "run"
    assert cli.main(["run"] + run_args + ["--out", str(run)]) == 130
    monkeypatch.setattr(imp_module.IMP, "run", real_run)
    checkpoints = sorted(run.rglob("imp_checkpoint.pt"))
    assert checkpoints
    for how in ("truncated", "empty", "foreign"):
        original = _damage(checkpoints[0], how)
        before = _snapshot(run)
        capsys.readouterr()
        assert cli.main(["run"] + run_args + ["--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert _one_line_error(err) and "imp_checkpoint.pt" in err and "Delete that file" in err, err
        assert _snapshot(run) == before
        checkpoints[0].write_bytes(original)
    assert cli.main(["run"] + run_args + ["--resume", str(run)]) == 0


def test_report_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert _one_line_error(capsys.readouterr().err)


_HOLDER = """
import sys, time
from rtl.experiments.run_lock import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_directory_is_locked_while_a_run_holds_it(tmp_path, capsys, run_args):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (run / run_lock.LOCK_NAME).read_text().strip() == str(holder.pid)
        assert cli.main(["run"] + run_args + ["--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert _one_line_error(err) and f"pid {holder.pid}" in err, err
        assert not (run / "config.json").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder left its lock file behind: stale, it blocks nothing
    assert (run / run_lock.LOCK_NAME).exists()
    assert cli.main(["run"] + run_args + ["--out", str(run)]) == 0
    assert cli.main(["run"] + run_args + ["--resume", str(run)]) == 0


def test_lock_is_released_and_reacquired_in_one_process(tmp_path):
    with run_lock.RunLock(str(tmp_path)):
        pass
    with run_lock.RunLock(str(tmp_path)) as lock:
        assert (tmp_path / run_lock.LOCK_NAME).read_text().strip() == str(os.getpid())
        assert lock.path.endswith(run_lock.LOCK_NAME)
