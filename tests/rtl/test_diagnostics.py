"""rtl.diagnostics: Jaccard matrices (global, per layer), per-ticket scores, chance correction, CollapseMonitor."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

import rtl.diagnostics as diagnostics
from rtl.diagnostics import (
    CollapseMonitor,
    chance_corrected_similarity,
    expected_random_jaccard,
    jaccard_matrix,
    ticket_similarity_scores,
)
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


def _b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _reference_jaccard(masks, layers=None):
    """(T, T) float64 by Python set operations over the flattened masks of the chosen layers."""
    layers = list(masks) if layers is None else layers
    num_tickets = next(iter(masks.values())).shape[0]
    sets = [set() for _ in range(num_tickets)]
    for name in layers:
        flat = masks[name].reshape(num_tickets, -1)
        for t in range(num_tickets):
            sets[t] |= {(name, i) for i in flat[t].nonzero().flatten().tolist()}
    out = torch.empty(num_tickets, num_tickets, dtype=torch.float64)
    for i, j in itertools.product(range(num_tickets), repeat=2):
        union = len(sets[i] | sets[j])
        out[i, j] = len(sets[i] & sets[j]) / union if union else 1.0
    return out


def _random_masks(num_tickets, shapes, seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand((num_tickets,) + shape, generator=g) < density for i, shape in enumerate(shapes)}


def _tiny_model(num_tickets, seed=0):
    model = nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(4 * 8 * 8, 10, num_tickets),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < 0.6)
    return model


# -- Jaccard --------------------------------------------------------------------------------------------------------
def test_hand_pair_one_third():
    masks = {"fc": _b([[1, 1, 0, 0], [0, 1, 1, 0]])}
    expected = torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]], dtype=torch.float64)
    result = jaccard_matrix(masks)
    assert result.dtype == torch.float64 and result.device.type == "cpu"
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-15)


def test_global_vs_per_layer_hand_counts():
    # Layer a: intersection 1, union 3. Layer b: intersection 2, union 3. Global: 3 / 6.
    masks = {"a": _b([[1, 1, 0, 0], [0, 1, 1, 0]]), "b": _b([[[1, 0, 1], [0, 0, 0]], [[1, 0, 1], [1, 0, 0]]])}
    assert jaccard_matrix(masks)[0, 1].item() == pytest.approx(0.5, abs=1e-15)
    per_layer = jaccard_matrix(masks, per_layer=True)
    assert list(per_layer) == ["a", "b"]
    assert per_layer["a"][0, 1].item() == pytest.approx(1 / 3, abs=1e-15)
    assert per_layer["b"][1, 0].item() == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize("num_tickets", [1, 2, 5])
@pytest.mark.parametrize("shapes", [[(7,)], [(3, 5), (4, 1, 3, 3)], [(1, 1), (13, 11)]])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_matches_set_reference(num_tickets, shapes, density):
    masks = _random_masks(num_tickets, shapes, seed=num_tickets * 100 + len(shapes), density=density)
    result = jaccard_matrix(masks)
    torch.testing.assert_close(result, _reference_jaccard(masks), rtol=0, atol=1e-12)
    torch.testing.assert_close(result, result.T, rtol=0, atol=0)
    assert torch.all(result.diagonal() == 1.0)
    assert torch.all((result >= 0) & (result <= 1))
    for name, matrix in jaccard_matrix(masks, per_layer=True).items():
        torch.testing.assert_close(matrix, _reference_jaccard(masks, [name]), rtol=0, atol=1e-12)


def test_empty_tickets():
    masks = {"a": _b([[0, 0, 0], [0, 0, 0], [1, 0, 1]]), "b": _b([[[0]], [[0]], [[1]]])}
    result = jaccard_matrix(masks)
    assert result[0, 1].item() == 1.0  # two empty masks are identical
    assert result[0, 0].item() == 1.0
    assert result[0, 2].item() == 0.0 and result[2, 1].item() == 0.0
    torch.testing.assert_close(result, _reference_jaccard(masks), rtol=0, atol=0)


def test_chunking_gives_the_same_exact_counts(monkeypatch):
    masks = _random_masks(4, [(37, 29), (5, 3, 3, 3)], seed=11, density=0.4)
    whole = jaccard_matrix(masks)
    monkeypatch.setattr(diagnostics, "_CHUNK", 7)
    torch.testing.assert_close(jaccard_matrix(masks), whole, rtol=0, atol=0)


def test_model_equals_its_mask_dict():
    model = _tiny_model(3)
    masks = {"0": model[0].weight_masks, "3": model[3].weight_masks}
    torch.testing.assert_close(jaccard_matrix(model), jaccard_matrix(masks), rtol=0, atol=0)
    assert list(jaccard_matrix(model, per_layer=True)) == ["0", "3"]


@pytest.mark.parametrize("device", DEVICES)
def test_device_masks(device):
    masks = _random_masks(3, [(31, 17)], seed=5)
    on_device = {k: v.to(device) for k, v in masks.items()}
    result = jaccard_matrix(on_device)
    assert result.device.type == "cpu"
    torch.testing.assert_close(result, _reference_jaccard(masks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("density", [0.75, 0.5, 0.25, 0.1])
def test_random_masks_near_d_over_2_minus_d(density):
    masks = _random_masks(3, [(400, 500)], seed=7, density=density)
    result = jaccard_matrix(masks)
    expected = density / (2 - density)
    off = result[~torch.eye(3, dtype=torch.bool)]
    # 200k weights: the binomial spread of J is below 0.004 at these densities.
    assert torch.all((off - expected).abs() < 0.01), (off, expected)
    torch.testing.assert_close(
        expected_random_jaccard(masks), torch.full((3, 3), expected, dtype=torch.float64), rtol=0, atol=0.005
    )


def test_bad_arguments():
    masks = {"a": _b([[1, 0], [0, 1]])}
    with pytest.raises(TypeError, match="per_layer must be a bool, got 'yes'"):
        jaccard_matrix(masks, per_layer="yes")
    with pytest.raises(TypeError, match="masks of layer 'a' must be bool"):
        jaccard_matrix({"a": torch.rand(2, 3)})
    with pytest.raises(ValueError, match="the model has no routed layers"):
        jaccard_matrix(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="layers disagree on the number of tickets"):
        jaccard_matrix({"a": _b([[1, 0], [0, 1]]), "b": _b([[1, 0]])})
    with pytest.raises(TypeError, match="matrix must be a bool"):
        chance_corrected_similarity(masks, matrix=1)


# -- per-ticket scores ------------------------------------------------------------------------------------------------
def test_ticket_scores_hand():
    masks = {"fc": _b([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])}
    # J: t0-t1 1/3, t0-t2 1, t0-t3 0, t1-t2 1/3, t1-t3 0, t2-t3 0.
    expected = torch.tensor([(1 / 3 + 1) / 3, (2 / 3) / 3, (1 + 1 / 3) / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ticket_similarity_scores(masks), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("num_tickets", [2, 3, 6])
def test_ticket_scores_are_row_means_without_diagonal(num_tickets):
    masks = _random_masks(num_tickets, [(9, 7), (3, 3)], seed=num_tickets)
    matrix = _reference_jaccard(masks)
    expected = torch.stack([torch.cat([matrix[k, :k], matrix[k, k + 1 :]]).mean() for k in range(num_tickets)])
    torch.testing.assert_close(ticket_similarity_scores(masks), expected, rtol=0, atol=1e-12)
    per_layer = ticket_similarity_scores(masks, per_layer=True)
    assert set(per_layer) == {"l0", "l1"} and per_layer["l0"].shape == (num_tickets,)


def test_ticket_scores_need_two_tickets():
    with pytest.raises(ValueError, match="needs at least 2 tickets .* got num_tickets=1"):
        ticket_similarity_scores({"a": _b([[1, 0, 1]])})
    with pytest.raises(ValueError, match="needs at least 2 tickets"):
        chance_corrected_similarity({"a": _b([[1, 0, 1]])})


# -- chance correction ------------------------------------------------------------------------------------------------
def test_expected_jaccard_formula_per_layer_densities():
    # Layer a: densities 1/2 and 1/4 over 8 weights; layer b: 1/2 and 1/2 over 4 weights.
    masks = {"a": _b([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]), "b": _b([[1, 1, 0, 0], [0, 0, 1, 1]])}
    inter = 8 * 0.5 * 0.25 + 4 * 0.5 * 0.5
    union = 8 * (0.5 + 0.25 - 0.125) + 4 * (0.5 + 0.5 - 0.25)
    assert expected_random_jaccard(masks)[0, 1].item() == pytest.approx(inter / union, abs=1e-15)
    per_layer = expected_random_jaccard(masks, per_layer=True)
    assert per_layer["a"][0, 1].item() == pytest.approx(0.125 / 0.625, abs=1e-15)
    assert per_layer["b"][0, 1].item() == pytest.approx(1 / 3, abs=1e-15)


@pytest.mark.parametrize("density", [0.8, 0.5, 0.2])
def test_independent_random_masks_are_near_zero(density):
    masks = _random_masks(4, [(300, 301)], seed=3, density=density)
    scores = chance_corrected_similarity(masks)
    assert scores.shape == (4,)
    assert torch.all(scores.abs() < 0.02), scores


def test_chance_correction_uses_per_layer_densities():
    # One dense-ish and one sparse layer: a single global density would expect far less overlap than random
    # masks with these per-layer densities produce, and report a large spurious similarity.
    g = torch.Generator().manual_seed(9)
    masks = {"dense": torch.rand(3, 250, 200, generator=g) < 0.9, "sparse": torch.rand(3, 250, 200, generator=g) < 0.1}
    assert torch.all(chance_corrected_similarity(masks).abs() < 0.02)
    density = 0.5
    naive = density / (2 - density)
    j = jaccard_matrix(masks)[0, 1].item()
    assert (j - naive) / (1 - naive) > 0.4  # what the uncorrected-for-layers formula would have said


def test_identical_disjoint_and_degenerate_masks():
    g = torch.Generator().manual_seed(4)
    base = torch.rand(50, 40, generator=g) < 0.3
    identical = {"a": base.expand(3, 50, 40).clone()}
    torch.testing.assert_close(
        chance_corrected_similarity(identical), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12
    )
    disjoint = {"a": torch.stack([base, ~base])}
    # J = 0 and E[J] > 0: less overlap than chance, kappa < 0.
    assert torch.all(chance_corrected_similarity(disjoint) < -0.2)
    kappa = chance_corrected_similarity({"a": _b([[1, 1, 1], [1, 1, 1], [1, 0, 0]])}, matrix=True)
    assert math.isnan(kappa[0, 1].item())  # both full: chance alone gives J = 1
    assert kappa[0, 2].item() == pytest.approx(0.0, abs=1e-12)  # full vs 1/3: J = 1/3 = E[J]
    torch.testing.assert_close(kappa, kappa.T, rtol=0, atol=0, equal_nan=True)
    scores = chance_corrected_similarity({"a": _b([[1, 1, 1], [1, 1, 1], [1, 0, 0]])})
    assert scores[0].item() == pytest.approx(0.0, abs=1e-12)  # NaN pair skipped
    all_full = chance_corrected_similarity({"a": torch.ones(2, 3, dtype=torch.bool)})
    assert torch.all(torch.isnan(all_full))


def test_chance_corrected_matrix_and_per_layer():
    masks = {"a": _b([[1, 1, 0, 0], [0, 1, 1, 0]]), "b": _b([[1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0]])}
    per_layer = chance_corrected_similarity(masks, per_layer=True, matrix=True)
    assert per_layer["a"][0, 1].item() == pytest.approx(0.0, abs=1e-12)  # J = 1/3 = E[J]
    assert per_layer["b"][0, 1].item() == pytest.approx(1.0, abs=1e-12)
    scores = chance_corrected_similarity(masks, per_layer=True)
    assert scores["a"].shape == (2,)


# -- collapse monitor -------------------------------------------------------------------------------------------------
FIRST, LAST = [1] * 6 + [0] * 6, [0] * 6 + [1] * 6
# Round masks: all equal -> ticket 0 moves away (scores fall) -> back (scores rise) -> unchanged.
ROUND_MASKS = [
    [FIRST, FIRST, FIRST],
    [FIRST, FIRST, FIRST],
    [LAST, FIRST, FIRST],  # scores 1,1,1 -> 0, .5, .5
    [FIRST, FIRST, FIRST],  # scores back to 1,1,1
    [FIRST, FIRST, FIRST],
]
ACCURACY = [
    [0.90, 0.90, 0.90],
    [0.88, 0.89, 0.90],  # small drops, no similarity change
    [0.60, 0.89, 0.89],  # ticket 0 drops with a falling jump; tickets 1, 2 move but hold their metric
    [0.70, 0.60, 0.89],  # ticket 1 drops with a rising jump; ticket 0 recovers
    [0.70, 0.60, 0.40],  # ticket 2 drops one round after its similarity rose
]


def _monitor(per_layer=False, rounds=None):
    monitor = CollapseMonitor(per_layer=per_layer)
    for r in range(len(ROUND_MASKS)) if rounds is None else rounds:
        monitor.record(
            r, {"fc": _b(ROUND_MASKS[r])}, metrics={"accuracy": ACCURACY[r], "loss": [1 - a for a in ACCURACY[r]]}
        )
    return monitor


def test_monitor_records():
    monitor = _monitor(per_layer=True)
    assert monitor.num_tickets == 3 and len(monitor.history) == 5
    entry = monitor.history[2]
    assert entry["round"] == 2 and entry["sparsity"] == pytest.approx(0.5)
    assert entry["ticket_sparsity"] == [0.5, 0.5, 0.5]
    assert entry["scores"] == pytest.approx([0.0, 0.5, 0.5])
    assert entry["jaccard"][0] == pytest.approx([1.0, 0.0, 0.0])
    # kappa: J = 0 vs E[J] = 1/3 gives -1/2; J = 1 gives 1.
    assert entry["chance_corrected"] == pytest.approx([-0.5, 0.25, 0.25])
    assert entry["metrics"]["accuracy"] == ACCURACY[2]
    assert entry["layer_scores"]["fc"] == pytest.approx([0.0, 0.5, 0.5])
    assert entry["layer_jaccard"]["fc"][1] == pytest.approx([0.0, 1.0, 1.0])
    json.dumps(monitor.history)  # plain data


def test_flagged_rising_and_falling():
    flags = _monitor().flagged("accuracy", similarity_jump=0.1, metric_drop=0.1)
    assert [(f["round"], f["ticket"]) for f in flags] == [(2, 0), (3, 1)]
    assert flags[0]["similarity_change"] == pytest.approx(-1.0)  # falling jump
    assert flags[0]["metric_change"] == pytest.approx(-0.28)
    assert flags[1]["similarity_change"] == pytest.approx(0.5)  # rising jump
    assert flags[1]["metric_change"] == pytest.approx(-0.29)


def test_flagged_lead_catches_a_preceding_jump():
    flags = _monitor().flagged("accuracy", similarity_jump=0.1, metric_drop=0.1, lead=1)
    assert [(f["round"], f["ticket"]) for f in flags] == [(2, 0), (3, 1), (4, 2)]
    assert flags[2]["similarity_change"] == pytest.approx(0.5)


def test_flagged_thresholds_and_options():
    monitor = _monitor()
    assert monitor.flagged("accuracy", similarity_jump=1.0, metric_drop=0.1) == []  # jump must exceed
    assert monitor.flagged("accuracy", similarity_jump=0.1, metric_drop=0.5) == []
    loss_flags = monitor.flagged("loss", similarity_jump=0.1, metric_drop=0.1, higher_is_better=False)
    assert [(f["round"], f["ticket"]) for f in loss_flags] == [(2, 0), (3, 1)]
    assert monitor.flagged("loss", similarity_jump=0.1, metric_drop=0.1) == []  # loss falls on recovery only
    kappa_flags = monitor.flagged("accuracy", similarity_jump=0.1, metric_drop=0.1, score="chance_corrected")
    assert [(f["round"], f["ticket"]) for f in kappa_flags] == [(2, 0), (3, 1)]


def test_no_flag_when_metric_holds():
    monitor = CollapseMonitor()
    for r, masks in enumerate(ROUND_MASKS):
        monitor.record(r, {"fc": _b(masks)}, metrics={"accuracy": [0.9, 0.8, 0.7]})
    assert monitor.flagged("accuracy", similarity_jump=0.0, metric_drop=0.0) == []
    assert CollapseMonitor().flagged("accuracy") == []


def test_missing_and_nan_metrics_are_skipped():
    monitor = CollapseMonitor()
    monitor.record(0, {"fc": _b(ROUND_MASKS[1])}, metrics={"accuracy": [0.9, 0.9, 0.9]})
    monitor.record(1, {"fc": _b(ROUND_MASKS[2])})
    monitor.record(2, {"fc": _b(ROUND_MASKS[3])}, metrics={"accuracy": torch.tensor([0.1, 0.9, 0.9])})
    monitor.record(3, {"fc": _b(ROUND_MASKS[2])}, metrics={"accuracy": [None, 0.9, 0.9]})
    monitor.record(4, {"fc": _b(ROUND_MASKS[3])}, metrics={"accuracy": [0.0, 0.9, 0.9]})
    assert monitor.history[3]["metrics"]["accuracy"][0] != monitor.history[3]["metrics"]["accuracy"][0]  # NaN
    assert monitor.flagged("accuracy", similarity_jump=0.1, metric_drop=0.1) == []


def test_record_sparsity_and_rounds():
    monitor = CollapseMonitor()
    entry = monitor.record(0, {"fc": _b([[1, 0, 0, 0], [1, 1, 0, 0]])})
    assert entry["ticket_sparsity"] == [0.75, 0.5] and entry["sparsity"] == pytest.approx(0.625)
    monitor.record(1, {"fc": _b([[1, 0, 0, 0], [1, 1, 0, 0]])}, sparsity=0.3)
    assert monitor.history[1]["sparsity"] == 0.3
    monitor.record(1, {"fc": _b([[1, 0, 0, 0], [1, 0, 0, 0]])}, sparsity=0.4)  # redo of the last round replaces it
    assert len(monitor.history) == 2 and monitor.history[1]["sparsity"] == 0.4
    assert monitor.history[1]["scores"] == [1.0, 1.0]


def test_record_errors():
    monitor = CollapseMonitor()
    masks = {"fc": _b([[1, 0, 1], [0, 1, 1]])}
    monitor.record(3, masks)
    with pytest.raises(ValueError, match="round 2 comes before the last recorded round 3"):
        monitor.record(2, masks)
    with pytest.raises(TypeError, match="round must be an int, got 1.5"):
        monitor.record(1.5, masks)
    with pytest.raises(ValueError, match="round must be an int >= 0, got -1"):
        CollapseMonitor().record(-1, masks)
    with pytest.raises(ValueError, match="has 3 tickets but the monitor recorded 2"):
        monitor.record(4, {"fc": _b([[1, 0, 1], [0, 1, 1], [1, 1, 1]])})
    with pytest.raises(ValueError, match="needs at least 2 tickets"):
        CollapseMonitor().record(0, {"fc": _b([[1, 0, 1]])})
    with pytest.raises(ValueError, match=r"metrics\['accuracy'\] must hold one value per ticket \(2\), got 3"):
        monitor.record(4, masks, metrics={"accuracy": [0.1, 0.2, 0.3]})
    with pytest.raises(TypeError, match=r"metrics\['accuracy'\] must hold numbers, got 'high'"):
        monitor.record(4, masks, metrics={"accuracy": ["high", 0.2]})
    with pytest.raises(TypeError, match="metrics must be a dict"):
        monitor.record(4, masks, metrics=[0.1, 0.2])
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\] or None, got 1.5"):
        monitor.record(4, masks, sparsity=1.5)
    assert len(monitor.history) == 1  # failed records store nothing


def test_flagged_errors():
    monitor = _monitor(rounds=[0, 1])
    with pytest.raises(ValueError, match=r"metric 'psnr' was never recorded; recorded metrics: \['accuracy', 'loss'\]"):
        monitor.flagged("psnr")
    with pytest.raises(ValueError, match="similarity_jump must be a number >= 0, got -0.1"):
        monitor.flagged("accuracy", similarity_jump=-0.1)
    with pytest.raises(ValueError, match="metric_drop must be a number >= 0, got nan"):
        monitor.flagged("accuracy", metric_drop=math.nan)
    with pytest.raises(ValueError, match="score must be 'scores' or 'chance_corrected', got 'iou'"):
        monitor.flagged("accuracy", score="iou")
    with pytest.raises(ValueError, match="lead must be an int >= 0, got -1"):
        monitor.flagged("accuracy", lead=-1)


def test_state_dict_resume_and_json():
    full = _monitor(per_layer=True)
    partial = _monitor(per_layer=True, rounds=[0, 1, 2])
    text = partial.to_json()
    resumed = CollapseMonitor.from_json(text)
    assert resumed.per_layer and resumed.to_json() == text
    for r in (2, 3, 4):  # the crashed run redoes round 2, then goes on
        resumed.record(
            r, {"fc": _b(ROUND_MASKS[r])}, metrics={"accuracy": ACCURACY[r], "loss": [1 - a for a in ACCURACY[r]]}
        )
    assert resumed.to_json() == full.to_json()
    assert resumed.flagged("accuracy", 0.1, 0.1) == full.flagged("accuracy", 0.1, 0.1)

    state = full.state_dict()
    state["history"][0]["round"] = 99  # a copy: editing it leaves the monitor alone
    assert full.history[0]["round"] == 0
    other = CollapseMonitor()
    other.load_state_dict(json.loads(json.dumps(full.state_dict())))
    assert other.to_json() == full.to_json()


def test_load_state_dict_errors():
    with pytest.raises(ValueError, match="not a CollapseMonitor state"):
        CollapseMonitor().load_state_dict({"rounds": []})
    with pytest.raises(ValueError, match="CollapseMonitor state version 7; this rtl reads version 1"):
        CollapseMonitor().load_state_dict({"version": 7, "history": []})
    with pytest.raises(ValueError, match=r"a history entry lacks \['chance_corrected', 'jaccard'"):
        CollapseMonitor().load_state_dict({"version": 1, "history": [{"round": 0}]})


def test_monitor_on_a_model():
    model = _tiny_model(4)
    monitor = CollapseMonitor()
    entry = monitor.record(0, model, metrics={"accuracy": torch.rand(4).tolist()})
    torch.testing.assert_close(torch.tensor(entry["scores"], dtype=torch.float64), ticket_similarity_scores(model))
    torch.testing.assert_close(
        torch.tensor(entry["chance_corrected"], dtype=torch.float64), chance_corrected_similarity(model)
    )
