"""rtl.prune: magnitude_prune_ (counts, ranking, scopes, granularities, ties), ticket_sparsity, prunable_count."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from rtl.nn import RoutedSparseConv2d, RoutedSparseConvTranspose2d, RoutedSparseLinear, routed_modules
from rtl.iterative_pruning import IMP
from rtl.prune import magnitude_prune_, prunable_count, ticket_sparsity

PRUNABLE = 4 * 1 * 3 * 3 + 10 * 256  # conv + linear weights of _model


def _model(num_tickets=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(256, 10, num_tickets, dtype=dtype),
    )


def _masks(model):
    return {name: m.weight_masks.clone() for name, m in routed_modules(model)}


def _random_masks_(model, density=0.7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in routed_modules(model):
            m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=gen) < density)


def _integer_importance(model, high=5, seed=2):
    """Small-integer scores (float64): many exact ties, and group means computed the same way in any order."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randint(0, high, m.weight_masks.shape, generator=gen).double() for name, m in routed_modules(model)
    }


# -- float64 references -----------------------------------------------------------------------------------------
def _ref_unstructured(keeps, scores, count):
    """Drop the `count` kept entries with the lowest (score, position), positions over the concatenated layers."""
    keep = torch.cat([k.reshape(-1) for k in keeps])
    score = torch.cat([s.reshape(-1) for s in scores]).double()
    idx = keep.nonzero().squeeze(1)
    order = np.lexsort((idx.numpy(), score[idx].numpy()))
    drop = torch.zeros_like(keep)
    drop[idx[torch.from_numpy(order[:count])]] = True
    return list(drop.split([k.numel() for k in keeps]))


def _ref_groups(keeps, scores, tilings, count):
    """Python-loop reference of the group rule: mean kept score, stable order, prefix while total <= count."""
    groups = []
    for layer, (keep, score, (bn, bk)) in enumerate(zip(keeps, scores, tilings)):
        keep2, score2 = keep.reshape(keep.shape[0], -1), score.reshape(score.shape[0], -1).double()
        rows, cols = keep2.shape
        for r in range(math.ceil(rows / bn)):
            for c in range(math.ceil(cols / bk)):
                sl = (slice(r * bn, (r + 1) * bn), slice(c * bk, (c + 1) * bk))
                size = int(keep2[sl].sum())
                if size:
                    groups.append((float((score2[sl] * keep2[sl]).sum()) / size, len(groups), layer, sl, size))
    groups.sort(key=lambda g: (g[0], g[1]))
    drops = [torch.zeros(k.reshape(k.shape[0], -1).shape, dtype=torch.bool) for k in keeps]
    total = 0
    for _, _, layer, sl, size in groups:
        if total + size > count:
            break
        total += size
        drops[layer][sl] = keeps[layer].reshape(keeps[layer].shape[0], -1)[sl]
    return [d.reshape(k.shape) for d, k in zip(drops, keeps)], total


def _tiling(granularity, shape):
    cols = math.prod(shape[1:])
    if granularity == "channel":
        return 1, cols
    if granularity[0] == "vector":
        return 1, granularity[1]
    return granularity[1], granularity[2]


# -- counts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tickets", [1, 3])
@pytest.mark.parametrize("amount", [0, 1, 37, 500, PRUNABLE])
def test_int_amount_removes_exact_count(num_tickets, amount):
    model = _model(num_tickets)
    report = magnitude_prune_(model, amount)
    kept = sum(m.weight_masks.flatten(1).sum(1) for _, m in routed_modules(model))
    assert kept.tolist() == [PRUNABLE - amount] * num_tickets
    assert report["removed"] == {t: amount for t in range(num_tickets)}
    assert report["requested"] == {t: amount for t in range(num_tickets)}
    assert report["sparsity"] == pytest.approx({t: amount / PRUNABLE for t in range(num_tickets)})
    torch.testing.assert_close(
        ticket_sparsity(model), torch.full((num_tickets,), amount / PRUNABLE, dtype=torch.float64)
    )


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.25, 0.5, 0.999])
def test_fraction_of_remaining_rounds_half_up(amount):
    model = _model(2)
    _random_masks_(model, density=0.6)
    remaining = [int(sum(m.weight_masks[t].sum() for _, m in routed_modules(model))) for t in range(2)]
    report = magnitude_prune_(model, amount)
    for t in range(2):
        assert report["removed"][t] == math.floor(amount * remaining[t] + 0.5)


def test_fraction_rounding_halves_go_up():
    model = nn.Sequential(RoutedSparseLinear(5, 2, 1))  # 10 weights: 0.25 * 10 = 2.5 -> 3; 0.05 * 10 = 0.5 -> 1
    assert magnitude_prune_(model, 0.25)["removed"] == {0: 3}
    model = nn.Sequential(RoutedSparseLinear(5, 2, 1))
    assert magnitude_prune_(model, 0.05)["removed"] == {0: 1}


# -- ranking against the reference --------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 250, 1111])
@pytest.mark.parametrize("ties", [False, True])
def test_global_unstructured_matches_reference(count, ties):
    model = _model(3, seed=count)
    _random_masks_(model, density=0.8, seed=count)
    importance = _integer_importance(model) if ties else None
    before = _masks(model)
    layers = list(routed_modules(model))
    magnitude_prune_(model, count, importance=importance)
    for t in range(3):
        scores = [importance[n][t] if ties else m.weight.detach().abs() for n, m in layers]
        drops = _ref_unstructured([before[n][t] for n, _ in layers], scores, count)
        for (name, m), drop in zip(layers, drops):
            assert torch.equal(m.weight_masks[t], before[name][t] & ~drop.view_as(before[name][t])), (t, name)


@pytest.mark.parametrize("amount", [3, 0.3])
def test_layer_scope_matches_reference(amount):
    model = _model(2, seed=5)
    _random_masks_(model, density=0.9, seed=5)
    importance = _integer_importance(model, high=3)
    before = _masks(model)
    report = magnitude_prune_(model, amount, scope="layer", importance=importance)
    expected_total = {t: 0 for t in range(2)}
    for name, m in routed_modules(model):
        for t in range(2):
            remaining = int(before[name][t].sum())
            count = amount if isinstance(amount, int) else math.floor(amount * remaining + 0.5)
            expected_total[t] += count
            drop = _ref_unstructured([before[name][t]], [importance[name][t]], count)[0]
            assert torch.equal(m.weight_masks[t], before[name][t] & ~drop.view_as(before[name][t]))
    assert report["removed"] == expected_total


def test_global_and_layer_scope_differ_when_one_layer_is_huge():
    model = _model(1)
    with torch.no_grad():
        model[0].weight.mul_(1000.0)  # the conv's weights outrank every linear weight
    glob = _model(1)
    glob.load_state_dict(model.state_dict())
    magnitude_prune_(glob, 0.2, scope="global")
    magnitude_prune_(model, 0.2, scope="layer")
    assert bool(glob[0].weight_masks.all())  # global ranking takes nothing from the conv
    assert int((~model[0].weight_masks).sum()) == 7  # round(0.2 * 36)
    assert int((~glob[3].weight_masks).sum()) == round(0.2 * PRUNABLE)
    assert not torch.equal(glob[3].weight_masks, model[3].weight_masks)


def test_equal_magnitudes_give_identical_masks_lowest_positions_first():
    masks = []
    for _ in range(2):
        model = _model(2)
        with torch.no_grad():
            for _, m in routed_modules(model):
                m.weight.copy_(torch.where(torch.rand_like(m.weight) < 0.5, -1.0, 1.0))  # fresh signs, |w| = 1
        magnitude_prune_(model, 100)
        masks.append(_masks(model))
        # All ties: the 36 conv weights (first layer) and the first 64 linear weights go.
        assert int((~model[0].weight_masks).sum()) == 2 * 36
        assert not bool(model[3].weight_masks[:, 0, :64].any()) and bool(model[3].weight_masks[:, 0, 64:].all())
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_per_ticket_importance_ranks_each_ticket_by_its_own_row():
    model = _model(3)
    importance = {name: torch.randn(m.weight_masks.shape) for name, m in routed_modules(model)}
    magnitude_prune_(model, 300, importance=importance)
    layers = list(routed_modules(model))
    for t in range(3):
        drops = _ref_unstructured(
            [torch.ones_like(m.weight_masks[t]) for _, m in layers], [importance[n][t] for n, _ in layers], 300
        )
        for (name, m), drop in zip(layers, drops):
            assert torch.equal(m.weight_masks[t], ~drop.view_as(m.weight_masks[t]))
    assert not torch.equal(model[3].weight_masks[0], model[3].weight_masks[1])


def test_importance_as_expanded_view_and_integer_dtype():
    model = _model(3)
    imp = {name: m.weight.detach().abs().expand_as(m.weight_masks) for name, m in routed_modules(model)}
    ref = _model(3)
    magnitude_prune_(ref, 200)
    magnitude_prune_(model, 200, importance=imp)
    assert all(torch.equal(a, b) for a, b in zip(_masks(model).values(), _masks(ref).values()))
    ints = {name: torch.randint(0, 9, m.weight_masks.shape) for name, m in routed_modules(model)}
    assert magnitude_prune_(model, 50, importance=ints)["removed"] == {0: 50, 1: 50, 2: 50}


def test_masks_only_shrink_even_when_pruned_weights_score_lowest():
    model = _model(2)
    magnitude_prune_(model, 400)
    first = _masks(model)
    # Scores that would rank the already pruned weights first: they must not count and must not come back.
    importance = {
        name: torch.where(m.weight_masks, 10.0, -10.0).double() + torch.rand(m.weight_masks.shape)
        for name, m in routed_modules(model)
    }
    report = magnitude_prune_(model, 400, importance=importance)
    assert report["removed"] == {0: 400, 1: 400}
    for name, m in routed_modules(model):
        assert not bool((m.weight_masks & ~first[name]).any())
    torch.testing.assert_close(ticket_sparsity(model), torch.full((2,), 800 / PRUNABLE, dtype=torch.float64))


def test_tickets_subset_leaves_the_others_alone():
    model = _model(4)
    report = magnitude_prune_(model, 0.5, tickets=[3, 1, 3])
    assert report["tickets"] == [1, 3]
    for _, m in routed_modules(model):
        assert bool(m.weight_masks[0].all()) and bool(m.weight_masks[2].all())
    magnitude_prune_(model, 10, tickets=2)
    assert int(sum((~m.weight_masks[2]).sum() for _, m in routed_modules(model))) == 10


def test_fully_pruned_ticket_is_legal():
    model = _model(2)
    magnitude_prune_(model, PRUNABLE, tickets=[0])
    assert ticket_sparsity(model).tolist() == [1.0, 0.0]
    report = magnitude_prune_(model, 0.5)
    assert report["removed"][0] == 0 and report["sparsity"][0] == 1.0
    with pytest.raises(ValueError, match="amount 1 exceeds the 0 prunable weights ticket 0"):
        magnitude_prune_(model, 1)


def test_float64_weights_and_conv_transpose():
    torch.manual_seed(0)
    model = nn.Sequential(
        RoutedSparseConvTranspose2d(3, 5, (3, 2), 2, dtype=torch.float64),
        RoutedSparseLinear(7, 3, 2, dtype=torch.float64),
    )
    before = _masks(model)
    report = magnitude_prune_(model, 17)
    assert report["removed"] == {0: 17, 1: 17}
    layers = list(routed_modules(model))
    drops = _ref_unstructured([before[n][0] for n, _ in layers], [m.weight.detach().abs() for _, m in layers], 17)
    for (_, m), drop in zip(layers, drops):
        assert torch.equal(m.weight_masks[0], ~drop.view_as(m.weight_masks[0]))


# -- structured granularities ---------------------------------------------------------------------------------------
GRANULARITIES = [("block", 2, 8), ("block", 3, 5), ("vector", 4), ("vector", 7), "channel"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_matches_reference(granularity, scope):
    model = _model(2, seed=3)
    _random_masks_(model, density=0.85, seed=3)  # partly pruned groups too
    importance = _integer_importance(model, high=7)
    before = _masks(model)
    layers = list(routed_modules(model))
    count = 20 if scope == "layer" else 300
    report = magnitude_prune_(model, count, scope=scope, granularity=granularity, importance=importance)
    for t in range(2):
        keeps = [before[n][t] for n, _ in layers]
        scores = [importance[n][t] for n, _ in layers]
        tilings = [_tiling(granularity, tuple(m.weight.shape)) for _, m in layers]
        if scope == "global":
            drops, total = _ref_groups(keeps, scores, tilings, count)
        else:
            pairs = [_ref_groups([k], [s], [tl], count) for k, s, tl in zip(keeps, scores, tilings)]
            drops, total = [p[0][0] for p in pairs], sum(p[1] for p in pairs)
        assert report["removed"][t] == total
        for (name, m), drop in zip(layers, drops):
            assert torch.equal(m.weight_masks[t], keeps[layers.index((name, m))] & ~drop), (t, name)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_structured_masks_stay_structured_over_rounds(granularity):
    model = _model(3, seed=11)
    for _ in range(3):
        report = magnitude_prune_(model, 0.2, granularity=granularity)
        assert all(0 < r <= req for r, req in zip(report["removed"].values(), report["requested"].values()))
    for _, m in routed_modules(model):
        bn, bk = _tiling(granularity, tuple(m.weight.shape))
        for t in range(3):
            mask = m.weight_masks[t].reshape(m.weight.shape[0], -1)
            for r in range(0, mask.shape[0], bn):
                for c in range(0, mask.shape[1], bk):
                    tile = mask[r : r + bn, c : c + bk]
                    assert bool(tile.all()) or not bool(tile.any())


def test_equal_size_groups_give_exact_counts():
    model = nn.Sequential(RoutedSparseLinear(32, 16, 2))  # 4 x 8 blocks tile it exactly
    for _ in range(3):
        report = magnitude_prune_(model, 96, granularity=("block", 4, 8))
        assert report["removed"] == {0: 96, 1: 96}
    assert magnitude_prune_(model, 0.5, granularity=("vector", 4))["removed"] == {0: 112, 1: 112}  # of 224
    model = nn.Sequential(RoutedSparseLinear(32, 16, 2))
    assert magnitude_prune_(model, 31, granularity="channel")["removed"] == {0: 0, 1: 0}  # a row is 32 weights
    assert magnitude_prune_(model, 95, granularity="channel")["removed"] == {0: 64, 1: 64}


# -- measures -------------------------------------------------------------------------------------------------------
def test_filter_fn_selects_prunable_layers():
    model = _model(2)
    only_linear = lambda name, m: isinstance(m, nn.Linear)  # noqa: E731
    assert prunable_count(model) == PRUNABLE
    assert prunable_count(model, only_linear) == 2560
    report = magnitude_prune_(model, 256, filter_fn=only_linear)
    assert bool(model[0].weight_masks.all())
    assert list(report["layer_density"]) == ["3"]
    assert report["layer_density"]["3"] == pytest.approx([0.9, 0.9])
    assert ticket_sparsity(model, only_linear).tolist() == pytest.approx([0.1, 0.1])
    assert ticket_sparsity(model).tolist() == pytest.approx([256 / PRUNABLE] * 2)


def test_imp_is_reexported():
    import rtl

    assert rtl.IMP is IMP


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(amount=1.0), ValueError, r"amount must be a float in \[0, 1\).*got 1.0"),
        (dict(amount=-0.1), ValueError, r"amount must be a float in \[0, 1\)"),
        (dict(amount=-1), ValueError, r"amount must be an int >= 0.*got -1"),
        (dict(amount=PRUNABLE + 1), ValueError, rf"amount {PRUNABLE + 1} exceeds the {PRUNABLE} prunable weights"),
        (dict(amount=37, scope="layer"), ValueError, r"amount 37 exceeds the 36 weights ticket 0 .* layer '0'"),
        (dict(amount=True), TypeError, r"amount must be an int count or a float fraction, got bool"),
        (dict(amount="10"), TypeError, r"amount must be an int count or a float fraction, got str"),
        (dict(amount=1, scope="ticket"), ValueError, r"unknown scope 'ticket'"),
        (dict(amount=1, granularity="row"), ValueError, r"unknown granularity 'row'"),
        (
            dict(amount=1, granularity=("block", 4)),
            ValueError,
            r"granularity \('block', 4\) must be \(\"block\", bn, bk\)",
        ),
        (dict(amount=1, granularity=("vector", 0)), ValueError, r"must be \(\"vector\", v\) with positive int"),
        (dict(amount=1, granularity=("tile", 2, 2)), ValueError, r"unknown granularity \('tile', 2, 2\)"),
        (dict(amount=1, tickets=[0, 3]), ValueError, r"ticket 3 in tickets is outside \[0, 3\)"),
        (dict(amount=1, tickets=-1), ValueError, r"ticket -1 in tickets is outside"),
        (dict(amount=1, tickets=[0.5]), TypeError, r"tickets must hold ints, got 0.5"),
        (dict(amount=1, importance=[1]), TypeError, r"importance must be a dict"),
        (dict(amount=1, filter_fn=3), TypeError, r"filter_fn must be callable"),
        (dict(amount=1, filter_fn=lambda n, m: False), ValueError, r"no routed layers selected by filter_fn"),
    ],
)
def test_errors(kwargs, error, match):
    model = _model(3)
    before = _masks(model)
    with pytest.raises(error, match=match):
        magnitude_prune_(model, **kwargs)
    assert all(torch.equal(before[n], m.weight_masks) for n, m in routed_modules(model))


def test_importance_errors():
    model = _model(3)
    good = {name: torch.rand(m.weight_masks.shape) for name, m in routed_modules(model)}
    with pytest.raises(ValueError, match=r"importance names unknown or non-prunable layers \['fc'\]"):
        magnitude_prune_(model, 1, importance={**good, "fc": torch.rand(3, 10, 256)})
    with pytest.raises(ValueError, match=r"importance is missing prunable layers \['3'\]"):
        magnitude_prune_(model, 1, importance={"0": good["0"]})
    with pytest.raises(ValueError, match=r"importance names unknown or non-prunable layers \['0'\]"):
        magnitude_prune_(model, 1, importance=good, filter_fn=lambda n, m: n == "3")
    with pytest.raises(ValueError, match=r"importance\['3'\] has shape \(10, 256\), expected .* \(3, 10, 256\)"):
        magnitude_prune_(model, 1, importance={**good, "3": torch.rand(10, 256)})
    with pytest.raises(TypeError, match=r"importance\['0'\] must hold real numbers, got dtype torch.bool"):
        magnitude_prune_(model, 1, importance={**good, "0": good["0"] > 0.5})
    with pytest.raises(TypeError, match=r"importance\['0'\] must be a tensor, got list"):
        magnitude_prune_(model, 1, importance={**good, "0": [0.0]})
    nan = good["3"].clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"importance\['3'\] of layer '3' holds NaN for ticket 1"):
        magnitude_prune_(model, 1, importance={**good, "3": nan})


def test_model_errors():
    with pytest.raises(ValueError, match=r"the model has no routed layers: convert it first"):
        magnitude_prune_(nn.Sequential(nn.Linear(3, 4)), 1)
    with pytest.raises(ValueError, match=r"the model has no routed layers"):
        ticket_sparsity(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        prunable_count({})
    mixed = nn.Sequential(RoutedSparseLinear(3, 4, 2), RoutedSparseLinear(4, 2, 3))
    with pytest.raises(ValueError, match=r"routed layers disagree on num_tickets"):
        magnitude_prune_(mixed, 1)


def test_the_former_names_of_imp_still_work_with_a_warning():
    import rtl.prune

    with pytest.warns(DeprecationWarning, match="rtl.prune.IMP moved: use rtl.iterative_pruning.IMP"):
        assert rtl.prune.IMP is IMP
    with pytest.warns(DeprecationWarning, match="rtl.imp moved: use rtl.iterative_pruning"):
        from rtl.imp import IMP as former
    assert former is IMP


def test_the_former_routing_module_still_works_with_a_warning():
    import rtl

    with pytest.warns(DeprecationWarning, match="rtl.routing moved: use rtl.routed_model"):
        from rtl.routing import use_route
    assert use_route is rtl.use_route
