"""python -m bench processes: the table of wall times and stage times, from runs stood in for by a fake."""

import pytest

from bench import bench_processes


def test_table_reports_medians_speed_ups_and_stages(tmp_path, monkeypatch):
    walls = {1: iter([10.0, 12.0, 11.0]), 2: iter([6.0, 5.0, 7.0])}
    seen = []

    def fake_run_once(processes, experiment, out, threads):
        seen.append((processes, experiment, threads))
        return {"wall": next(walls[processes]), "rtl_masks": 4.0 / processes, "dense": 1.5}

    monkeypatch.setattr(bench_processes, "run_once", fake_run_once)
    args = [
        "--repeats",
        "3",
        "--threads",
        "1",
        "--results-dir",
        str(tmp_path),
        "--experiment",
        "digits-classes --quick",
    ]
    assert bench_processes.main(args) == 0
    # interleaved: every repeat runs each process count in turn
    assert [s[0] for s in seen] == [1, 2, 1, 2, 1, 2]
    assert seen[0][1] == ["digits-classes", "--quick"]
    (result,) = tmp_path.glob("processes_cpu_*.md")
    text = result.read_text()
    assert "| 1 | 11.0 | 1.00x | 10.0, 12.0, 11.0 |" in text
    assert "| 2 | 6.0 | 1.83x | 6.0, 5.0, 7.0 |" in text
    assert "| rtl_masks | 4.0 | 2.0 |" in text and "| dense | 1.5 | 1.5 |" in text
    assert "cores:" in text


def test_a_failed_run_is_reported_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="unknown experiment"):
        bench_processes.run_once(1, ["no-such-experiment"], tmp_path / "run", 1)
