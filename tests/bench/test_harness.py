"""bench/harness.py on a toy benchmark: the float64 check, ratios and target verdicts, case selection, timing
settings, the CSV and markdown it writes, and the helpers every benchmark shares (masks, CSV, tables, time_fn).

The toy benchmark's providers are plain torch on a few numbers, so a whole run takes well under a second; one of
them computes the wrong function and must be refused before it is timed.
"""

import argparse
import csv
import math
from dataclasses import dataclass, replace

import pytest
import torch

from bench import harness
from bench.harness import Provider

FIELDS = ["run_id", "timestamp", "device_kind", "device", "torch", "threads", "git_rev", "quick", "case", "dtype",
          "size", "T", "sparsity", "provider", "mode", "status", "median_ms", "p10_ms", "p90_ms", "repeats",
          "ratio_vs_B0", "ratio_vs_B1", "max_abs_err", "err_reference", "checked", "target", "target_met",
          "error"]  # fmt: skip
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True, kw_only=True)
class ToyCase(harness.Case):
    size: int

    def quick(self) -> "ToyCase":
        return replace(self, size=3, repeats=2)


def toy_cases(device_type, args):
    common = dict(dtype=torch.float32, tickets=2, sparsity=0.5, repeats=3)
    return [
        ToyCase(name="double_8_fp32", base="double_8", family="toy", size=8,
                targets=(harness.faster("fwd", "B0", 0.0), harness.faster("fwd+bwd", "B0", 1e9)), **common),
        ToyCase(name="double_4_fp32", base="double_4", family="toy", size=4, **common),
        ToyCase(name="other_4_fp32", base="other_4", size=4, **common),
    ]  # fmt: skip


CALLS = {}  # provider name -> calls made, checked and timed


def toy_prepare(case, device, args):
    x = torch.randn(case.size, generator=torch.Generator().manual_seed(case.seed))

    def counted(name, fn):
        def call():
            CALLS[name] = CALLS.get(name, 0) + 1
            return fn()

        return call

    def provider(name, kind, fn, **kwargs):
        step = counted(name, fn)
        return Provider(name, kind, {m: step for m in MODES}, output=step, reference="double", **kwargs)

    def broken():
        raise RuntimeError("kernel exploded")

    return harness.Prepared(
        providers=[
            provider("B0", "baseline", lambda: x * 2),
            provider("B1", "baseline", lambda: x + x),
            provider("ours:good", "ours", lambda: 2 * x),
            provider("ours:wrong", "ours", lambda: x * 2 + 0.5),  # a lost bias, say: off by 0.5 everywhere
            provider("ours:broken", "ours", broken),
            provider("ours:absent", "ours", lambda: x, unavailable="no backend named 'absent'"),
            Provider("prep", "prep", {"fwd": counted("prep", lambda: None)}),
        ],
        references={"double": x.double() * 2},
        columns={"size": case.size},
        check_columns={"checked": f"{case.size}/{case.size}"},
    )


def heading(case_rows):
    return f"### {case_rows[0]['case']}: size {case_rows[0]['size']}"


TOY = harness.Benchmark(
    name="toy",
    title="toy benchmark",
    fields=FIELDS,
    modes=MODES,
    cases=toy_cases,
    prepare=toy_prepare,
    describe=lambda case: f"size {case.size}",
    heading=heading,
    legend=["- toy legend"],
)


def _args(tmp_path, quick=False, cases=None):
    return argparse.Namespace(
        quick=quick, cases=cases, repeats=None, warmup=None, max_seconds=None, results_dir=tmp_path, threads=None
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- a whole toy run
def test_run_checks_times_and_writes_csv_and_markdown(tmp_path):
    CALLS.clear()
    cpu = torch.device("cpu")
    cases = harness.select_cases(toy_cases("cpu", None), "double_8", "cpu", quick=False)
    assert harness.run_cases(TOY, cases, _args(tmp_path), ["--cases", "double_8"], cpu) == 0

    csv_path = tmp_path / "toy_cpu.csv"
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == FIELDS
    rows = {(r["provider"], r["mode"]): r for r in _rows(csv_path)}
    assert len(rows) == 6 * 2 + 1  # six providers in both modes, prep in fwd only
    assert ("prep", "fwd+bwd") not in rows

    for name in ("B0", "B1", "ours:good"):
        for mode in MODES:
            r = rows[(name, mode)]
            assert r["status"] == "ok" and r["error"] == "", r
            assert float(r["max_abs_err"]) == 0.0 and r["err_reference"] == "double" and r["checked"] == "8/8"
            assert int(r["repeats"]) >= 1 and float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"])
            assert float(r["ratio_vs_B0"]) > 0 and float(r["ratio_vs_B1"]) > 0
    assert rows[("B0", "fwd")]["ratio_vs_B0"] == "1"

    # The wrong provider is refused by the float64 check: an error row in each mode, its error recorded, never timed.
    for mode in MODES:
        r = rows[("ours:wrong", mode)]
        assert r["status"] == "error" and r["median_ms"] == "" and r["ratio_vs_B0"] == ""
        assert "float64 check failed" in r["error"] and float(r["max_abs_err"]) == pytest.approx(0.5)
        assert rows[("ours:broken", mode)]["status"] == "error"
        assert rows[("ours:broken", mode)]["error"] == "forward: RuntimeError: kernel exploded"
        assert rows[("ours:absent", mode)]["status"] == "unavailable"
        assert rows[("ours:absent", mode)]["error"] == "no backend named 'absent'"
    assert CALLS["ours:wrong"] == 1  # the check's one call; a timed row would have made warm-up and timed calls
    assert CALLS["ours:good"] > 1 and "ours:absent" not in CALLS
    assert rows[("prep", "fwd")]["status"] == "ok" and rows[("prep", "fwd")]["max_abs_err"] == ""

    # Target verdicts: met (>= 0x B0), not met (>= 1e9x B0), n/a where ours has no time.
    good_fwd, good_bwd = rows[("ours:good", "fwd")], rows[("ours:good", "fwd+bwd")]
    assert good_fwd["target"].startswith("fwd >= 0x faster than B0 (") and good_fwd["target_met"] == "met"
    assert good_bwd["target"].startswith("fwd+bwd >= 1e+09x faster than B0") and good_bwd["target_met"] == "not met"
    assert rows[("ours:wrong", "fwd")]["target"] == "fwd >= 0x faster than B0 (n/a: no ours:wrong time)"
    assert rows[("ours:wrong", "fwd")]["target_met"] == "n/a"
    assert rows[("B0", "fwd")]["target"] == ""  # targets are ours'

    md = list(tmp_path.glob("toy_cpu_*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert text.startswith("# toy benchmark, cpu\n\n- device: ")
    assert "- command: `python -m bench toy --cases double_8`" in text and "- toy legend" in text
    assert "quick run" not in text
    assert "### double_8_fp32: size 8" in text
    header = ("| provider | fwd ms (p10–p90) | fwd vs B0 | fwd vs B1 | fwd+bwd ms (p10–p90) | fwd+bwd vs B0 | "
              "fwd+bwd vs B1 | max abs err | target |")  # fmt: skip
    assert header in text and "|:---|---:|---:|---:|---:|---:|---:|---:|:---|" in text
    assert "| ours:absent | unavailable |  |  | unavailable |  |  |  | fwd >= 0x faster than B0 (n/a: no" in text
    assert "| prep |" in text and "| — |  |  |" in text  # no fwd+bwd row for prep
    assert "- ours:wrong fwd: error: float64 check failed" in text
    assert text.count("- ours:wrong fwd: ") == 1 and "- ours:broken fwd+bwd: error: forward: RuntimeError" in text

    # A second, quick run appends under the same header and gets its own markdown file; quick verdicts are n/a.
    quick = harness.select_cases(toy_cases("cpu", None), "toy", "cpu", quick=True)
    harness.run_cases(TOY, quick, _args(tmp_path, quick=True), ["--quick"], cpu)
    added = _rows(csv_path)[len(rows) :]
    assert {r["case"] for r in added} == {"double_8_fp32", "double_4_fp32"} and {r["size"] for r in added} == {"3"}
    assert {r["quick"] for r in added} == {"1"}
    assert {r["target_met"] for r in added if r["target"]} == {"n/a (quick shapes)"}
    assert csv_path.read_text().count("run_id,") == 1
    second = sorted(set(tmp_path.glob("toy_cpu_*.md")) - set(md))
    assert [p.name for p in second] == [md[0].stem + "_2.md"] and "quick run" in second[0].read_text()


def test_run_refuses_a_csv_with_another_header_before_measuring(tmp_path):
    (tmp_path / "toy_cpu.csv").write_text("a,b\n1,2\n")
    CALLS.clear()
    with pytest.raises(ValueError, match="has columns"):
        harness.run_cases(TOY, toy_cases("cpu", None), _args(tmp_path), [], torch.device("cpu"))
    assert not CALLS and not list(tmp_path.glob("*.md"))


# ------------------------------------------------------------------------------------------------ the check
def _provider(y, reference="ref"):
    return Provider("p", "ours", {}, output=lambda: y, reference=reference)


def test_check_provider_tolerance_is_relative_to_the_outputs_scale():
    ref = torch.tensor([100.0, -50.0], dtype=torch.float64)
    err, problem = harness.check_provider(_provider(torch.tensor([100.5, -50.0])), {"ref": ref}, 1e-2)
    assert err == pytest.approx(0.5) and problem is None  # 0.5 <= 1e-2 * 100
    err, problem = harness.check_provider(_provider(torch.tensor([102.0, -50.0])), {"ref": ref}, 1e-2)
    assert err == pytest.approx(2.0) and "exceeds 0.01 x max |ref| (100); not timed" in problem
    small = torch.tensor([0.5], dtype=torch.float64)  # small outputs: the tolerance shrinks with them
    assert harness.check_provider(_provider(torch.tensor([0.504])), {"ref": small}, 1e-2)[1] is None
    assert harness.check_provider(_provider(torch.tensor([0.51])), {"ref": small}, 1e-2)[1] is not None
    assert harness.check_provider(_provider(torch.tensor([float("nan")])), {"ref": small}, 1e-2)[1] is not None


def test_check_provider_refuses_bad_shapes_and_references():
    ref = {"ref": torch.zeros(2, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"output of shape \(3, 2\) for a reference of shape \(2, 3\)"):
        harness.check_provider(_provider(torch.zeros(3, 2)), ref, 1e-2)
    with pytest.raises(KeyError, match="no float64 reference named 'other'"):
        harness.check_provider(_provider(torch.zeros(2, 3), reference="other"), ref, 1e-2)


def test_check_runs_the_output_in_the_providers_context():
    entered = []
    p = Provider("p", "ours", {}, output=lambda: torch.tensor([float(len(entered))]), reference="ref",
                 context=lambda: _Recorder(entered))  # fmt: skip
    assert harness.check_provider(p, {"ref": torch.tensor([1.0], dtype=torch.float64)}, 1e-9) == (0.0, None)


class _Recorder:
    def __init__(self, entered):
        self.entered = entered

    def __enter__(self):
        self.entered.append(1)

    def __exit__(self, *exc):
        self.entered.pop()


# ------------------------------------------------------------------------------------- ratios and targets
def _row(provider, mode, median, status="ok"):
    return dict(provider=provider, mode=mode, status=status, median_ms=median)


@pytest.mark.parametrize("quick", [False, True])
def test_ratios_and_verdicts(quick):
    rows = [_row("B0", "fwd", 10.0), _row("B1", "fwd", 40.0), _row("ours:a", "fwd", 4.0),
            _row("ours:b", "fwd", None, status="error"), _row("ours:a", "fwd+bwd", 5.0)]  # fmt: skip
    case = ToyCase(name="c", base="c", dtype=torch.float32, tickets=2, sparsity=0.5, repeats=1, size=1,
                   targets=(harness.faster("fwd", "B0", 2), harness.at_most("fwd", "B1", 0.2),
                            harness.strictly_faster("fwd+bwd", "B0")))  # fmt: skip
    harness.add_ratios_and_targets(rows, case, quick=quick)
    a, b, a_bwd = rows[2], rows[3], rows[4]
    assert a["ratio_vs_B0"] == pytest.approx(2.5) and a["ratio_vs_B1"] == pytest.approx(10.0)
    assert "ratio_vs_B0" not in b  # a failed row gets no ratio
    assert a_bwd["ratio_vs_B0"] is None  # no B0 time in fwd+bwd
    assert a["target"] == "fwd >= 2x faster than B0 (2.50x); fwd <= 0.2x B1 time (10.00x)"
    assert b["target"].startswith("fwd >= 2x faster than B0 (n/a: no ours:b time)")
    assert a_bwd["target"] == "fwd+bwd faster than B0 (n/a: no B0 time)"
    if quick:
        assert {a["target_met"], b["target_met"], a_bwd["target_met"]} == {"n/a (quick shapes)"}
    else:
        assert (a["target_met"], b["target_met"], a_bwd["target_met"]) == ("met", "n/a", "n/a")
        rows = [_row("B0", "fwd", 10.0), _row("B1", "fwd", 40.0), _row("ours:a", "fwd", 6.0)]
        harness.add_ratios_and_targets(rows, case, quick=False)
        assert rows[2]["target_met"] == "not met"  # 1.67x < 2x, though 6.67x >= 5x: every target must be met


def test_target_kinds():
    assert harness.faster("fwd", "B0", 3).met(3.0) and not harness.faster("fwd", "B0", 3).met(2.99)
    assert harness.at_most("fwd", "B0", 1.25).met(0.8) and not harness.at_most("fwd", "B0", 1.25).met(0.79)
    assert not harness.strictly_faster("fwd", "B0").met(1.0) and harness.no_slower("fwd", "B0").met(1.0)
    assert harness.no_slower("infer", "B0").text == "infer no slower than B0"


# ------------------------------------------------------------------------------------ cases and settings
def test_select_cases_by_name_base_family_and_quick():
    cases = toy_cases("cpu", None)
    assert [c.name for c in harness.select_cases(cases, None, "cpu", False)] == [c.name for c in cases]
    assert [c.name for c in harness.select_cases(cases, "toy", "cpu", False)] == ["double_8_fp32", "double_4_fp32"]
    assert [c.name for c in harness.select_cases(cases, " other_4 , double_8_fp32", "cpu", False)] == [
        "double_8_fp32", "other_4_fp32"]  # fmt: skip
    quick = harness.select_cases(cases, "double_4", "cpu", True)
    assert [(c.name, c.size, c.repeats) for c in quick] == [("double_4_fp32", 3, 2)]
    with pytest.raises(SystemExit, match="unknown case.*nope for cuda; choose from toy, double_8_fp32, double_4_fp32"):
        harness.select_cases(cases, "double_4,nope", "cuda", False)
    assert cases[0].seed == cases[0].quick().seed != cases[1].seed and cases[0].dtype_name == "float32"


def test_a_case_without_quick_variant_says_so():
    case = harness.Case(name="c", base="c", dtype=torch.float32, tickets=1, sparsity=0.0, repeats=1)
    with pytest.raises(NotImplementedError, match="Case has no quick variant"):
        case.quick()


def test_timing_settings_precedence(tmp_path):
    case = toy_cases("cpu", None)[0]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    args = _args(tmp_path)
    assert harness.timing_settings(case, args, cpu) == (3, 2, 5.0)
    assert harness.timing_settings(case, args, cuda) == (3, 3, 5.0)
    assert harness.timing_settings(replace(case, warmup=7), args, cpu) == (3, 7, 5.0)
    assert harness.timing_settings(replace(case, warmup=7), _args(tmp_path, quick=True), cpu) == (3, 1, 1.0)
    args = argparse.Namespace(**{**vars(args), "repeats": 9, "warmup": 0, "max_seconds": 0.0})
    assert harness.timing_settings(replace(case, warmup=7), args, cpu) == (9, 0, 0.0)


def test_command_line_options_and_their_checks(capsys):
    ap = harness.argument_parser("toy", "toy", cases_help="names", warmup_help="calls")
    args = harness.parse_run_arguments(ap, ["--quick", "--cases", "a,b", "--repeats", "4", "--threads", "1"])
    assert (args.quick, args.cases, args.repeats, args.threads, args.device) == (True, "a,b", 4, 1, "cpu")
    assert args.results_dir == harness.DEFAULT_RESULTS_DIR
    for bad, message in ((["--repeats", "0"], "--repeats must be >= 1"), (["--threads", "0"], "--threads must be"),
                         (["--warmup", "-1"], "--warmup must be >= 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            harness.parse_run_arguments(ap, bad)
        assert message in capsys.readouterr().err
    assert ap.prog == "python -m bench toy"


# ------------------------------------------------------------------------------------- the shared helpers
def test_unstructured_masks_have_exact_sparsity_and_differ_per_ticket():
    m = harness.unstructured_masks(3, 40, 30, 0.9, seed=1)
    assert m.dtype == torch.bool and m.shape == (3, 40, 30)
    assert m.reshape(3, -1).sum(1).tolist() == [120, 120, 120]
    assert not torch.equal(m[0], m[1])
    assert torch.equal(m, harness.unstructured_masks(3, 40, 30, 0.9, seed=1))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        harness.unstructured_masks(2, 4, 4, 1.5)


def test_block_masks_are_whole_blocks():
    m = harness.block_masks(2, 40, 36, 0.5, 16, 16, seed=3)  # 3 x 3 blocks, edge blocks cut
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
    assert harness.append_csv(path, [{"a": 1, "b": 0.5}], ["a", "b"]) == 1
    harness.append_csv(path, [{"a": 2, "b": None, "ignored": 3}, {"a": 3, "b": math.nan}], ["a", "b"])
    assert path.read_text().splitlines() == ["a,b", "1,0.5", "2,", "3,nan"]
    with pytest.raises(ValueError, match="columns"):
        harness.append_csv(path, [{"a": 3}], ["a"])
    assert path.read_text().splitlines() == ["a,b", "1,0.5", "2,", "3,nan"]


def test_markdown_and_number_formats():
    table = harness.markdown_table(["x", "y"], [["a|b", 1]])
    assert table.splitlines() == ["| x | y |", "|:---|---:|", "| a\\|b | 1 |"]
    with pytest.raises(ValueError, match="row has 1 cells for 2 columns"):
        harness.markdown_table(["x", "y"], [["a"]])
    assert [harness.format_ms(v) for v in (123.4, 12.34, 1.234, 0.3, None)] == ["123", "12.3", "1.23", "0.300", ""]
    assert harness.format_ratio(2.314) == "2.31x" and harness.format_ratio(float("nan")) == ""
    assert (
        harness.format_err(1.5e-7) == "1.50e-07"
        and harness.format_err("") == ""
        and harness.format_err("2") == ("2.00e+00")
    )
    assert harness.mode_cells(None) == ["—", "", ""]
    assert harness.mode_cells({"status": "unavailable"}) == ["unavailable", "", ""]


def test_time_fn_counts_its_calls_and_honours_the_cap():
    calls = []
    t = harness.time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=5)
    assert t.repeats == 5 and len(calls) == 7 and 0 <= t.p10_ms <= t.median_ms <= t.p90_ms
    calls.clear()
    t = harness.time_fn(lambda: calls.append(1), "cpu", warmup=0, repeats=50, max_seconds=1e-12, min_repeats=3)
    assert t.repeats == 3 and len(calls) == 3


def test_environment_and_command_text():
    env = harness.environment(torch.device("cpu"))
    assert env["device_kind"] == "cpu" and env["git_rev"] and int(env["threads"]) >= 1 and env["device"]
    assert "cuda" not in env
    assert harness.command_text("linear", ["--quick"]) == "python -m bench linear --quick"
    assert harness.command_text("report", []) == "python -m bench report"


def test_unused_path(tmp_path):
    first = tmp_path / "run.md"
    assert harness.unused_path(first) == first
    first.write_text("")
    (tmp_path / "run_2.md").write_text("")
    assert harness.unused_path(first) == tmp_path / "run_3.md"
