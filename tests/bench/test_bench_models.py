"""bench/bench_models.py: a --quick run end to end, its case table, and the numerics its error column rests on.

The end-to-end run is a subprocess (``python -m bench models``), the way people run it, so argument parsing and the
CSV/markdown output are exercised; ResNet-18 stays out of it (pruning and compiling 11M weights x 8 tickets takes
half a minute even on quick shapes) and is covered by the case table and a conversion check. The numerical checks
import the module and compare the routed providers with per-ticket float64 references.
"""

import copy
import csv
import math
from pathlib import Path

import pytest
import torch

import rtl
from bench import bench_models as bench
from bench import harness

PROVIDERS = {"B0", "B1", "ours:auto"}
QUICK_CASES = ["ghostnet_u50", "inr_u90", "inr_v8_90"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for the in-process checks, as --quick runs use: on a loaded machine, OpenMP threads
    waiting on each other made one quick GhostNet forward 20-100x slower with two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(run_bench, results_dir, *extra):
    return run_bench("models", "--quick", "--out", str(results_dir), *extra, timeout=180)


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    try:
        v = float(value)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def _case(name: str, quick: bool = True):
    case = {c.name: c for c in bench.cpu_cases()}[name]
    return case.quick() if quick else case


# -------------------------------------------------------------------------------------------------- end to end
def test_quick_run_writes_csv_and_markdown_and_appends(tmp_path, run_bench):
    _run(run_bench, tmp_path, "--cases", ",".join(QUICK_CASES))
    csv_path = tmp_path / "models_cpu.csv"
    assert csv_path.exists()
    first_text = csv_path.read_text()
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == bench.FIELDS
    rows = _rows(csv_path)

    assert list(dict.fromkeys(r["case"] for r in rows)) == QUICK_CASES
    for case in QUICK_CASES:
        case_rows = [r for r in rows if r["case"] == case]
        assert {r["provider"] for r in case_rows} == PROVIDERS, case
        for provider in PROVIDERS:
            modes = sorted(r["mode"] for r in case_rows if r["provider"] == provider)
            assert modes == ["infer", "train_step"], (case, provider)

    for r in rows:
        assert r["status"] == "ok", r
        for key in ("median_ms", "p10_ms", "p90_ms", "ratio_vs_B0", "ratio_vs_B1", "ref_max_abs"):
            assert _positive(r[key]), (key, r)
        assert float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]), r
        assert int(r["repeats"]) >= 1
        assert r["quick"] == "1"
        for key in ("device", "torch", "threads", "git_rev", "run_id"):
            assert r[key], (key, r)
        # fp32 against float64 from the same values: relative to the outputs' scale, only rounding is left.
        assert float(r["max_abs_err"]) <= 1e-5 * float(r["ref_max_abs"]), r
        done, total = map(int, r["err_samples"].split("/"))
        assert done == total == int(r["batch"]), r  # quick shapes check every sample
        if r["mask_structure"] == "unstructured":
            assert abs(float(r["sparsity_measured"]) - float(r["sparsity"])) < 0.005, r
        else:  # whole vectors only: a little under the request, never over it
            assert float(r["sparsity"]) - 0.05 < float(r["sparsity_measured"]) <= float(r["sparsity"]) + 1e-9, r
    by = {r["provider"]: r for r in rows}
    assert by["B0"]["err_reference"] == "dense_f64" and by["B0"]["backend"] == ""
    assert by["B1"]["err_reference"] == "ticket_f64" and by["B1"]["backend"] == "reference"
    assert by["ours:auto"]["backend"] in ("cpu", "reference")
    shapes = {r["case"]: (r["model"], r["input_shape"], r["T"], r["mask_structure"]) for r in rows}
    assert shapes == {
        "ghostnet_u50": ("ghostnet", "20x3x32x32", "10", "unstructured"),
        "inr_u90": ("inr", "256x2", "10", "unstructured"),
        "inr_v8_90": ("inr", "256x2", "10", "vector8"),
    }

    md = list(tmp_path.glob("models_cpu_*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert all(f"### {case}:" in text for case in QUICK_CASES)
    assert "train_step vs B1" in text and "quick run" in text
    assert "| provider | backend | infer ms (p10–p90) | infer vs B0 | infer vs B1 | train_step ms (p10–p90) |" in text
    assert "- command: `python -m bench models --quick --out" in text

    # A second run (a family name selects its cases) appends under the same header; the first bytes stay.
    _run(run_bench, tmp_path, "--cases", "inr_u0", "--backend", "auto,cpu")
    second_text = csv_path.read_text()
    assert second_text.startswith(first_text)
    added = _rows(csv_path)[len(rows) :]
    assert {r["case"] for r in added} == {"inr_u0"}
    assert {r["provider"] for r in added} == {"B0", "B1", "ours:auto", "ours:cpu"}
    assert added[0]["run_id"] != rows[0]["run_id"]
    assert second_text.count("run_id,") == 1


@pytest.mark.parametrize(
    "backend, message",
    [
        ("fastest", "--backend 'fastest': choose from auto, cpu, triton, cuda"),
        ("auto,reference", "B1 is the reference backend"),
        (",", "--backend ','"),
    ],
)
def test_bad_backend_is_refused(backend, message, capsys):
    with pytest.raises(SystemExit, match="2"):
        bench.parse_args(["--backend", backend])
    assert message in capsys.readouterr().err


def test_backend_list_and_out_alias():
    args = bench.parse_args(["--backend", "CPU, auto,cpu", "--out", "/tmp/x"])
    assert args.backend == ["cpu", "auto"] and args.results_dir == Path("/tmp/x")
    assert bench.parse_args([]).results_dir == harness.DEFAULT_RESULTS_DIR


def test_unknown_case_is_refused_before_writing(tmp_path):
    with pytest.raises(SystemExit, match="unknown case.*no_such_case.*choose from ghostnet, inr, resnet18"):
        bench.main(["--quick", "--cases", "no_such_case", "--out", str(tmp_path)])
    assert not (tmp_path / "models_cpu.csv").exists()


# ------------------------------------------------------------------------------------------------ the cases
def test_cases_have_the_brief_shapes():
    cases = bench.cpu_cases()
    assert {c.family for c in cases} == set(bench.FAMILIES)
    for family in bench.FAMILIES:
        mine = [c for c in cases if c.family == family]
        unstructured = sorted(c.sparsity for c in mine if c.structure == "unstructured")
        assert unstructured == [0.0, 0.5, 0.75, 0.9, 0.95]
        assert {c.structure for c in mine if c.structure != "unstructured"} == {"vector8", "block16x16", "overlap0.8"}
        assert sorted(c.sparsity for c in mine if c.structure == "overlap0.8") == [0.5, 0.9]
        assert all(c.dtype == torch.float32 for c in mine)
    one = {c.family: c for c in cases}
    assert (one["ghostnet"].batch, one["ghostnet"].size, one["ghostnet"].tickets) == (320, 32, 10)
    assert (one["inr"].batch, one["inr"].input_shape, one["inr"].tickets) == (65536, (65536, 2), 10)
    assert (one["resnet18"].input_shape, one["resnet18"].tickets) == ((64, 3, 64, 64), 8)
    assert {c.family: c.size for c in bench.cpu_cases(full=True)}["resnet18"] == 224

    gpu = bench.gpu_cases()
    assert {c.dtype for c in gpu} == {torch.float32, torch.bfloat16}
    assert {c.structure for c in gpu} == {"unstructured", "vector8", "block64x64", "overlap0.8"}
    assert all(c.size == 224 for c in gpu if c.family == "resnet18")
    assert len({c.name for c in gpu}) == len(gpu)

    q = one["resnet18"].quick()
    assert (q.batch, q.size, q.tickets, q.err_samples) == (16, 32, 8, 16)


def test_overlapping_masks_have_the_wanted_jaccard():
    case = {c.base: c for c in bench.cpu_cases()}["ghostnet_o90"].quick()
    setup = bench.make_setup(case, torch.device("cpu"))
    assert setup.sparsity_measured == pytest.approx(0.9, abs=0.01)
    assert setup.jaccard == pytest.approx(bench.OVERLAP_JACCARD, abs=0.05)
    masks = {n: m.weight_masks for n, m in rtl.routed_modules(setup.routed)}
    differ = [not torch.equal(m[0], m[1]) for m in masks.values()]
    assert sum(differ) > len(differ) // 2  # similar tickets, not copies


def test_select_cases_by_name_base_and_family():
    assert [c.name for c in bench.select_cases("cpu", "inr_u50", quick=False)] == ["inr_u50"]
    assert len(bench.select_cases("cpu", "ghostnet", quick=False)) == 9  # 5 unstructured, 2 overlapping, 2 structured
    names = [c.name for c in bench.select_cases("cuda", "inr_u50", quick=False)]
    assert names == ["inr_u50_bf16", "inr_u50_fp32"]
    with pytest.raises(SystemExit, match="unknown case.*resnet50"):
        bench.select_cases("cpu", "inr_u50,resnet50", quick=False)


def test_resnet18_keeps_its_classifier_dense():
    model, filter_fn = bench._dense_model("resnet18")
    rtl.convert_(model, 8, filter_fn=filter_fn)
    names = {name for name, _ in rtl.routed_modules(model)}
    assert "fc" not in names and "conv1" in names and len(names) == 20  # 17 3x3/7x7 convs + 3 downsample 1x1
    assert type(model.fc) is torch.nn.Linear


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown model family 'vgg'"):
        bench._dense_model("vgg")


# --------------------------------------------------------------------------------------------------- the masks
@pytest.mark.parametrize("granularity", [("unstructured",), ("vector", 8), ("block", 16, 16)])
def test_prune_tickets_gives_different_tickets_at_the_sparsity(granularity):
    # Odd sizes: a 24x27 conv view and a 48x37 linear, so vectors and blocks have partial edge groups.
    model = torch.nn.ModuleList([rtl.nn.RoutedSparseConv2d(3, 24, 3, 4), rtl.nn.RoutedSparseLinear(37, 48, 4)])
    bench.prune_tickets_(model, 4, 0.75, granularity, seed=3)
    for _, m in rtl.routed_modules(model):
        masks = m.weight_masks
        kept = masks.flatten(1).double().mean(1)
        if granularity[0] == "unstructured":
            assert torch.allclose(kept, torch.full_like(kept, 0.25), atol=1 / masks[0].numel())
        else:  # whole groups, never more than asked (a few large blocks can stop well short of it)
            upper = 0.3 if granularity[0] == "vector" else 1.0
            assert bool((kept >= 0.25 - 1e-12).all()) and bool((kept < upper).all()), kept
        assert not torch.equal(masks[0], masks[1]), "tickets must differ"
        if granularity[0] == "vector":
            rows = masks.reshape(4, masks.shape[1], -1)
            cols = rows.shape[2] // 8 * 8
            groups = rows[:, :, :cols].reshape(4, rows.shape[1], -1, 8)
            assert bool((groups.all(-1) | ~groups.any(-1)).all()), "vectors kept or pruned whole"


def test_prune_tickets_at_zero_keeps_all_ones():
    model = torch.nn.Sequential(rtl.nn.RoutedSparseLinear(9, 5, 3))
    bench.prune_tickets_(model, 3, 0.0, ("unstructured",), seed=0)
    assert bool(model[0].weight_masks.all())


@pytest.mark.parametrize(
    "route, num_tickets, limit",
    [
        ([1, 0, 1, 1], 2, 2),
        ([0] * 7, 1, 3),  # T = 1
        ([2, 2, 0, 2, 0, 2], 4, 1),  # empty tickets 1 and 3; the limit is below the tickets present
        (list(range(5)) * 3, 5, 100),  # limit above the batch
        ([3, 1, 4, 1, 5, 0, 2, 6, 5, 3, 5], 7, 9),  # skewed
    ],
)
def test_check_samples_round_robin(route, num_tickets, limit):
    route = torch.tensor(route)
    idx = bench.check_samples(route, num_tickets, limit)
    present = set(route.tolist())
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert set(route[idx].tolist()) == present  # every ticket present is checked
    assert idx.numel() == min(route.numel(), max(len(present), limit))
    # Round robin: no ticket gets a second sample while another present ticket with samples left has none.
    counts = torch.bincount(route[idx], minlength=num_tickets)
    avail = torch.bincount(route, minlength=num_tickets)
    for t in present:
        for u in present:
            assert counts[t] <= counts[u] + 1 or counts[u] == avail[u]


# ------------------------------------------------------------------------------------------------- the numerics
@pytest.mark.parametrize("name", ["ghostnet_u75", "inr_u50", "inr_b16_90"])
def test_routed_providers_match_the_per_ticket_reference(name):
    case = _case(name)
    setup = bench.make_setup(case, CPU)
    refs = bench.float64_references(setup)
    providers = {r.name: r for r in bench.make_runners(case, setup, CPU, ["auto", "cpu"])}
    scale = refs["ticket_f64"].abs().max().item()
    for p in providers.values():
        p.model.eval()
    for pname in ("B1", "ours:auto", "ours:cpu"):
        p = providers[pname]
        if p.unavailable:
            continue
        y = bench.infer_step(p, setup.x).double()
        assert (y - refs["ticket_f64"]).abs().max().item() <= 1e-5 * scale, pname
    y0 = bench.infer_step(providers["B0"], setup.x).double()
    assert (y0 - refs["dense_f64"]).abs().max().item() <= 1e-5 * refs["dense_f64"].abs().max().item()

    # The reference is per ticket: the same model routed by a shifted route computes something else, so the
    # check is able to fail.
    if case.sparsity > 0:
        shifted = (setup.route + 1) % case.tickets
        wrong = copy.copy(setup)
        wrong.route = shifted
        bad = bench.float64_references(wrong)["ticket_f64"]
        assert (bad - refs["ticket_f64"]).abs().max().item() > 1e-3 * scale


def test_the_float64_check_refuses_a_routed_model_on_the_wrong_route():
    case = _case("inr_u90")
    setup = bench.make_setup(case, CPU)
    prepared = bench.prepare(case, CPU, bench.parse_args(["--backend", "auto"]))
    providers = {p.name: p for p in prepared.providers}
    assert list(providers) == ["B0", "B1", "ours:auto"] and set(providers["B1"].steps) == set(bench.MODES)
    assert prepared.check_columns == {"err_samples": f"{case.batch}/{case.batch}"}
    for p in providers.values():
        assert harness.check_provider(p, prepared.references, bench.TOLERANCE[torch.float32])[1] is None, p.name
    wrong = copy.copy(setup)
    wrong.route = (setup.route + 1) % case.tickets  # every sample through the next ticket's masks
    runner = bench.make_runners(case, wrong, CPU, ["auto"])[2]
    provider = bench.make_providers(case, wrong, [runner])[0]
    err, problem = harness.check_provider(provider, prepared.references, bench.TOLERANCE[torch.float32])
    assert problem is not None and "float64 check failed" in problem, err


def test_reference_matches_a_masked_weight_computation():
    """The per-ticket reference is the B0m-style function: a linear INR layer by layer with W * M_t in float64."""
    case = _case("inr_u75")
    setup = bench.make_setup(case, CPU)
    ref = bench.float64_references(setup)["ticket_f64"]
    model = setup.routed
    x = model.features(setup.x.double())
    route = setup.route
    out = torch.empty(x.shape[0], 3, dtype=torch.float64)
    for t in range(case.tickets):
        h = x[route == t]
        for i, layer in enumerate(model.layers):
            h = torch.nn.functional.linear(h, layer.weight.double() * layer.weight_masks[t], layer.bias.double())
            h = torch.relu(h) if i < len(model.layers) - 1 else torch.sigmoid(h)
        out[route == t] = h
    assert torch.allclose(ref, out[setup.check], rtol=0, atol=1e-12)


def test_train_step_of_ours_matches_the_naive_loop():
    """From the same start, ours and B1 compute the same loss and gradients in train mode; a full train step of ours
    moves weights, but none that no ticket keeps (every ticket is in the batch)."""
    case = _case("ghostnet_u90")
    setup = bench.make_setup(case, CPU)
    providers = {r.name: r for r in bench.make_runners(case, setup, CPU, ["auto"])}
    losses, grads = {}, {}
    for name in ("B1", "ours:auto"):
        p = providers[name]
        p.model.train()
        with p.context():
            loss = bench._loss(case, p.call(setup.x), setup.target)
            loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: w.grad for n, w in p.model.named_parameters()}
    assert math.isfinite(losses["B1"])
    assert losses["ours:auto"] == pytest.approx(losses["B1"], rel=1e-5)
    for n, g in grads["B1"].items():
        assert g is not None, n
        assert torch.allclose(grads["ours:auto"][n], g, rtol=1e-3, atol=1e-5 * g.abs().max().item() + 1e-12), n

    ours = providers["ours:auto"]
    before = {n: w.detach().clone() for n, w in ours.model.named_parameters()}
    bench.train_step(ours, case, setup.x, setup.target)
    moved = sum(int((w != before[n]).sum()) for n, w in ours.model.named_parameters())
    assert moved > 0
    for name, m in rtl.routed_modules(ours.model):
        union = m.weight_masks.any(0)
        assert torch.equal(m.weight[~union], before[name + ".weight"][~union]), name


# ---------------------------------------------------------------------------------------------- profile and memory
def test_profile_prints_every_routed_layer_with_its_path(tmp_path, run_bench):
    proc = _run(run_bench, tmp_path, "--profile", "--cases", "ghostnet_u90")
    md = list(tmp_path.glob("models_profile_cpu_*.md"))
    assert len(md) == 1 and not (tmp_path / "models_cpu.csv").exists()  # a profile appends no timing rows
    text = md[0].read_text()
    model = bench.GhostNet(num_classes=10)
    layers = [
        name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and model.prunable_filter(name, m)
    ]
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in layers]
    assert len(rows) == len(layers)
    assert all("mixed" in r or "image" in r or "dense" in r for r in rows)  # the cpu backend's path is named
    assert "| whole model |" in text and "| routed layers |" in text
    assert "blocks.0.ghost1.primary_conv.0" in proc.stdout


def test_memory_compares_dense_and_routed_in_fresh_processes(tmp_path, run_bench):
    _run(run_bench, tmp_path, "--memory", "--cases", "ghostnet_u90")
    md = list(tmp_path.glob("models_memory_cpu_*.md"))
    assert len(md) == 1
    row = next(line for line in md[0].read_text().splitlines() if line.startswith("| ghostnet_u90 |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    dense_loaded, dense_peak, ours_loaded, ours_peak = (float(c) for c in cells[:4])
    assert 0 < dense_loaded <= dense_peak and 0 < ours_loaded <= ours_peak
