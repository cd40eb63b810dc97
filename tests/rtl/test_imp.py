"""rtl.IMP (Alg. 1): rounds, counts, clipping, granularities, rewinding, late rewinding, resume, errors."""

import math
import os
import random
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rtl
from rtl.iterative_pruning import IMP
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear, routed_modules
from rtl.prune import magnitude_prune_, ticket_sparsity

PRUNABLE = 4 * 9 + 10 * 256


def _model(num_tickets=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(256, 10, num_tickets),
    )


def _data(num_tickets, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tickets, 6, 1, 8, 8, generator=gen), torch.randint(0, 10, (num_tickets, 6), generator=gen)


def _state(model):
    """Every parameter and buffer except the masks."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if not n.endswith("weight_masks")})
    return out


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _masks(model):
    return {n: m.weight_masks.clone() for n, m in routed_modules(model)}


def _trainer(num_tickets, steps=2, lr=0.1, noisy=False, record=None):
    """train_fn: `steps` SGD steps of the routed model on ticket's own random data (optionally RNG-dependent)."""
    x, y = _data(num_tickets)

    def train_fn(model, ticket, round_idx):
        if record is not None:
            record.append((ticket, round_idx, _state(model)))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        routed = rtl.RoutedModel(model)
        for _ in range(steps):
            xb = x[ticket]
            if noisy:  # draws from every global generator, so a resume must restore them all
                xb = xb + 0.5 * torch.randn_like(xb) + float(np.random.rand()) + random.random()
            loss = F.cross_entropy(routed(xb, torch.full((xb.shape[0],), ticket)), y[ticket])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"loss": loss.detach(), "steps": steps}

    return train_fn


# -- rounds and counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tickets", [1, 3])
def test_int_amount_exact_counts_and_last_round_clipped(num_tickets):
    model = _model(num_tickets)
    target = 0.3  # round(0.3 * 2596) = 779 = 7 * 100 + 79
    start = time.perf_counter()
    log = IMP(model, _trainer(num_tickets), target, amount=100, progress=False).run()
    elapsed = time.perf_counter() - start
    assert [entry["round"] for entry in log] == list(range(8))
    for entry in log[:-1]:
        assert entry["removed"] == {t: 100 for t in range(num_tickets)}
    assert log[-1]["removed"] == {t: 79 for t in range(num_tickets)}
    assert (PRUNABLE - sum(m.weight_masks.flatten(1).sum(1) for _, m in routed_modules(model))).tolist() == [
        779
    ] * num_tickets
    assert log[-1]["sparsity"] == {t: 779 / PRUNABLE for t in range(num_tickets)}
    assert all(set(entry["train"]) == set(range(num_tickets)) for entry in log)
    assert isinstance(log[0]["train"][0]["loss"], float)
    # each round's wall time is its own: positive, and all rounds together within the run's time
    assert all(entry["wall_time"] > 0 for entry in log) and sum(entry["wall_time"] for entry in log) <= elapsed


def test_fraction_amount_counts_remaining_and_hits_target():
    model = _model(2)
    log = IMP(model, _trainer(2), 0.5, amount=0.2, progress=False).run()
    remaining, target = PRUNABLE, math.floor(0.5 * PRUNABLE + 0.5)
    for entry in log:
        want = min(math.floor(0.2 * remaining + 0.5), target - (PRUNABLE - remaining))
        assert entry["removed"] == {0: want, 1: want}
        remaining -= want
    assert PRUNABLE - remaining == target
    assert len(log) == 4  # 519, 415, 332, 32
    assert ticket_sparsity(model).tolist() == [target / PRUNABLE] * 2


def test_layer_scope_clips_last_round_across_layers():
    model = _model(2)
    log = IMP(model, _trainer(2), 0.02, amount=5, scope="layer", progress=False).run()
    # round(0.02 * 2596) = 52: five rounds of 5 per layer, then the last 2 shared as 1 + 1.
    assert [entry["removed"] for entry in log] == [{0: 10, 1: 10}] * 5 + [{0: 2, 1: 2}]
    assert ticket_sparsity(model).tolist() == [52 / PRUNABLE] * 2
    assert int((~model[0].weight_masks[0]).sum()) == int((~model[4].weight_masks[0]).sum()) == 26

    model = _model(2)
    log = IMP(model, _trainer(2), 0.2, amount=0.3, scope="layer", progress=False).run()
    assert ticket_sparsity(model).tolist() == [math.floor(0.2 * PRUNABLE + 0.5) / PRUNABLE] * 2
    assert int((~model[0].weight_masks[0]).sum()) > 0  # every layer loses weights


def test_ranking_uses_each_tickets_trained_weights():
    model = _model(2)
    patterns = {name: torch.randn(2, *m.weight.shape) for name, m in routed_modules(model)}

    def train_fn(model, ticket, round_idx):  # "training" lands each ticket on its own weights
        with torch.no_grad():
            for name, m in routed_modules(model):
                m.weight.copy_(patterns[name][ticket])

    IMP(model, train_fn, 0.25, amount=300, progress=False).run()
    ref = _model(2)
    magnitude_prune_(ref, math.floor(0.25 * PRUNABLE + 0.5), importance={name: p.abs() for name, p in patterns.items()})
    assert all(torch.equal(a, b) for a, b in zip(_masks(model).values(), _masks(ref).values()))
    assert not torch.equal(model[4].weight_masks[0], model[4].weight_masks[1])


def _assert_structured(model, tiling):
    for _, m in routed_modules(model):
        tiles = m.weight_masks.reshape(m.num_tickets, m.weight.shape[0], -1)
        bn, bk = tiling(tiles.shape[2])
        for r in range(0, tiles.shape[1], bn):
            for c in range(0, tiles.shape[2], bk):
                tile = tiles[:, r : r + bn, c : c + bk].flatten(1)
                assert bool((tile.all(1) | ~tile.any(1)).all())


def test_block_rounds_are_exact_and_stay_block_structured():
    model = _model(2)
    linear = lambda name, m: isinstance(m, nn.Linear)  # noqa: E731  (10 x 256 tiles exactly in 2 x 8 blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        log = IMP(
            model, _trainer(2), 0.4, amount=256, granularity=("block", 2, 8), filter_fn=linear, progress=False
        ).run()
    assert [entry["removed"] for entry in log] == [{0: 256, 1: 256}] * 4
    assert ticket_sparsity(model, linear).tolist() == [0.4, 0.4]
    assert bool(model[0].weight_masks.all())
    _assert_structured(model, lambda cols: (2, 8))


@pytest.mark.parametrize(
    "granularity, amount, largest",
    [(("vector", 4), 0.2, 4), ("channel", 256, 256), (("block", 2, 8), 64, 16), ("unstructured", 77, 1)],
)
def test_structured_rounds_never_exceed_request_and_end_within_a_group(granularity, amount, largest):
    model = _model(2)
    target = math.floor(0.4 * PRUNABLE + 0.5)
    with warnings.catch_warnings(record=True):  # a last request smaller than every group stops the ticket
        warnings.simplefilter("always")
        log = IMP(model, _trainer(2), 0.4, amount=amount, granularity=granularity, progress=False).run()
    removed = 0
    for entry in log:
        removed += entry["removed"][0]
        if isinstance(amount, int):
            assert entry["removed"][0] <= amount
    assert 0 <= target - removed < largest
    assert (PRUNABLE - sum(m.weight_masks[0].sum() for _, m in routed_modules(model))) == removed
    if granularity == "unstructured":
        assert removed == target
    else:
        tiling = {"vector": lambda cols: (1, 4), "channel": lambda cols: (1, cols), "block": lambda cols: (2, 8)}[
            granularity if isinstance(granularity, str) else granularity[0]
        ]
        _assert_structured(model, tiling)


def test_structured_ticket_that_cannot_progress_stops_with_warning():
    model = _model(2)
    imp = IMP(
        model,
        _trainer(2),
        0.5,
        amount=8,
        granularity="channel",
        progress=False,
        filter_fn=lambda n, m: isinstance(m, nn.Linear),
    )
    with pytest.warns(RuntimeWarning, match=r"a round removed no weight of ticket \d.*below the target 0.5"):
        log = imp.run()
    assert len(log) == 1 and imp.stopped == [0, 1]
    assert bool(model[4].weight_masks.all())


def test_masks_only_shrink_between_rounds():
    model = _model(2)
    history = []
    IMP(
        model,
        _trainer(2),
        0.3,
        amount=200,
        progress=False,
        callbacks=[lambda imp, entry: history.append(_masks(imp.model))],
    ).run()
    for before, after in zip(history, history[1:]):
        assert all(not bool((after[k] & ~before[k]).any()) for k in before)


def test_tickets_subset_and_target_zero():
    model = _model(3)
    log = IMP(model, _trainer(3), 0.2, amount=0.25, tickets=[1], progress=False).run()
    assert all(entry["tickets"] == [1] for entry in log)
    sparsity = ticket_sparsity(model).tolist()
    assert sparsity[0] == sparsity[2] == 0.0 and sparsity[1] == math.floor(0.2 * PRUNABLE + 0.5) / PRUNABLE
    assert IMP(_model(3), _trainer(3), 0.0, amount=10, progress=False).run() == []


# -- rewinding ------------------------------------------------------------------------------------------------------
def test_rewind_restores_parameters_and_bn_buffers_bit_exactly():
    model = _model(3)
    theta0 = _state(model)
    record = []
    IMP(model, _trainer(3, record=record), 0.15, amount=150, progress=False).run()
    assert len(record) == 9  # 3 rounds x 3 tickets
    # Every training started from theta0 and the model ends there, BN running statistics included.
    assert all(_same_state(state, theta0) for _, _, state in record)
    assert _same_state(_state(model), theta0)
    assert all(p.grad is None for p in model.parameters())
    # The check can fail: training really moves weights and BN buffers.
    trained = _model(3)
    _trainer(3)(trained, 0, 0)
    assert not torch.equal(trained[1].running_mean, theta0["1.running_mean"])
    assert not torch.equal(trained[0].weight, theta0["0.weight"])


def test_late_rewinding_to_step():
    model = _model(2)
    theta0 = _state(model)
    record, after_steps = [], []

    def train_fn(model, ticket, round_idx):
        record.append(_state(model))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data(2)
        for step in range(3):
            loss = F.cross_entropy(rtl.RoutedModel(model)(x[ticket], torch.full((6,), ticket)), y[ticket])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if not after_steps and step == 1:
                after_steps.append(_state(model))

    attributes = {n: set(vars(m)) for n, m in model.named_modules()}
    imp = IMP(model, train_fn, 0.1, amount=100, rewind=2, progress=False)
    imp.run()
    assert attributes == {n: set(vars(m)) for n, m in model.named_modules()}  # snapshots live off-module
    assert _same_state(record[0], theta0)  # the first training starts at theta0 ...
    assert all(_same_state(state, after_steps[0]) for state in record[1:])  # ... every later one at step 2
    assert _same_state(_state(model), after_steps[0])
    assert _same_state(imp.theta0, theta0) and _same_state(imp.rewind_point, after_steps[0])

    with pytest.raises(ValueError, match=r"rewind=5 needs that many optimizer steps .* train_fn took 3"):
        IMP(_model(2), train_fn, 0.1, amount=100, rewind=5, progress=False).run()


def test_round_that_raises_leaves_model_at_round_start():
    model = _model(3)
    theta0 = _state(model)
    inner = _trainer(3)

    def train_fn(model, ticket, round_idx):
        inner(model, ticket, round_idx)
        if round_idx == 1 and ticket == 2:
            raise RuntimeError("boom")

    imp = IMP(model, train_fn, 0.3, amount=100, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        imp.run()
    assert imp.round == 1 and len(imp.log) == 1
    assert ticket_sparsity(model).tolist() == [100 / PRUNABLE] * 3
    assert _same_state(_state(model), theta0)


# -- resume ---------------------------------------------------------------------------------------------------------
def _strip(log):
    return [{k: v for k, v in entry.items() if k != "wall_time"} for entry in log]


class _Stop(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_gives_identical_masks_and_log(tmp_path):
    kwargs = dict(target_sparsity=0.12, amount=0.05, progress=False)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    full_model = _model(3)
    full_log = IMP(full_model, _trainer(3, noisy=True), **kwargs).run()
    assert len(full_log) == 3

    def stop_after_round_1(imp, entry):
        if entry["round"] == 1:
            raise _Stop

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    model = _model(3)
    with pytest.raises(_Stop):
        IMP(model, _trainer(3, noisy=True), checkpoint_dir=tmp_path, callbacks=[stop_after_round_1], **kwargs).run()
    ckpt = torch.load(tmp_path / "imp_checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2 and len(ckpt["log"]) == 2
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []

    # A fresh process: other weights in the model, other RNG states; the checkpoint restores both.
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resumed_model = _model(3, seed=42)
    imp = IMP(resumed_model, _trainer(3, noisy=True), checkpoint_dir=tmp_path, **kwargs)
    resumed_log = imp.run()
    assert _strip(resumed_log) == _strip(full_log)
    assert all(torch.equal(a, b) for a, b in zip(_masks(resumed_model).values(), _masks(full_model).values()))
    assert _same_state(_state(resumed_model), _state(full_model))
    # A finished run only reloads.
    again = _model(3, seed=5)
    assert _strip(IMP(again, _trainer(3, noisy=True), checkpoint_dir=tmp_path, **kwargs).run()) == _strip(full_log)
    assert all(torch.equal(a, b) for a, b in zip(_masks(again).values(), _masks(full_model).values()))


def test_resume_depends_on_restored_rng(tmp_path):
    """Guard for the test above: without the RNG restore the noisy trainer would give different masks."""
    torch.manual_seed(7)
    a = _model(3)
    IMP(a, _trainer(3, noisy=True), 0.05, amount=0.05, progress=False).run()
    torch.manual_seed(8)
    b = _model(3, seed=7)
    IMP(b, _trainer(3, noisy=True), 0.05, amount=0.05, progress=False).run()
    assert any(not torch.equal(x, y) for x, y in zip(_masks(a).values(), _masks(b).values()))


def test_checkpoint_mismatch_raises_and_keeps_the_file(tmp_path):
    model = _model(2)
    IMP(model, _trainer(2), 0.05, amount=50, checkpoint_dir=tmp_path, progress=False).run()
    path = tmp_path / "imp_checkpoint.pt"
    content = path.read_bytes()
    other = _model(2, seed=3)
    before_state, before_masks = _state(other), _masks(other)
    with pytest.raises(ValueError, match=r"written for another model or settings \(amount: checkpoint 50 vs now 60"):
        IMP(other, _trainer(2), 0.05, amount=60, checkpoint_dir=tmp_path, progress=False).run()
    with pytest.raises(ValueError, match=r"target_sparsity: checkpoint 0.05 vs now 0.1"):
        IMP(other, _trainer(2), 0.1, amount=50, checkpoint_dir=tmp_path, progress=False).run()
    with pytest.raises(ValueError, match=r"scope: checkpoint 'global' vs now 'layer'"):
        IMP(other, _trainer(2), 0.05, amount=50, scope="layer", checkpoint_dir=tmp_path, progress=False).run()
    assert _same_state(_state(other), before_state)
    assert all(torch.equal(before_masks[k], v) for k, v in _masks(other).items())
    wider = nn.Sequential(
        RoutedSparseConv2d(1, 5, 3, 2, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(320, 10, 2),
    )
    with pytest.raises(ValueError, match=r"the model's .*shapes differ"):
        IMP(wider, _trainer(2), 0.05, amount=50, checkpoint_dir=tmp_path, progress=False).run()
    assert path.read_bytes() == content
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read the IMP checkpoint"):
        IMP(other, _trainer(2), 0.05, amount=50, checkpoint_dir=tmp_path, progress=False).run()


def test_progress_bar_and_callbacks(capsys):
    seen = []
    imp = IMP(_model(2), _trainer(2), 0.1, amount=130, progress=True, callbacks=[lambda i, e: seen.append((i, e))])
    log = imp.run()
    assert [e for _, e in seen] == log and all(i is imp for i, _ in seen)
    assert set(log[0]) == {"round", "tickets", "removed", "sparsity", "train", "wall_time"}
    assert "IMP" in capsys.readouterr().err


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_sparsity=1.5), ValueError, r"target_sparsity must be a number in \[0, 1\], got 1.5"),
        (dict(target_sparsity=-0.1), ValueError, r"target_sparsity must be a number in \[0, 1\]"),
        (dict(amount=0), ValueError, r"amount must be an int >= 1 \(weights per round\), got 0"),
        (dict(amount=0.0), ValueError, r"amount must be a float in \(0, 1\).*got 0.0"),
        (dict(amount=1.0), ValueError, r"amount must be a float in \(0, 1\)"),
        (dict(amount="1"), TypeError, r"amount must be an int count or a float fraction, got str"),
        (dict(rewind="late"), ValueError, r"rewind must be \"init\" or an int >= 0 \(optimizer steps\), got 'late'"),
        (dict(rewind=-1), ValueError, r"rewind must be \"init\" or an int >= 0"),
        (dict(scope="all"), ValueError, r"unknown scope 'all'"),
        (dict(granularity=("block", 2)), ValueError, r"granularity \('block', 2\) must be"),
        (dict(tickets=[5]), ValueError, r"ticket 5 in tickets is outside \[0, 2\)"),
        (dict(callbacks=[1]), TypeError, r"callbacks must be callables"),
        (dict(train_fn=None), TypeError, r"train_fn must be callable\(model, ticket, round_idx\), got NoneType"),
        (dict(filter_fn=lambda n, m: False), ValueError, r"no routed layers selected by filter_fn"),
    ],
)
def test_errors(kwargs, error, match):
    args = dict(train_fn=_trainer(2), target_sparsity=0.1, amount=10)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        IMP(_model(2), **args)


def test_model_without_routed_layers():
    with pytest.raises(ValueError, match=r"the model has no routed layers"):
        IMP(nn.Sequential(nn.Linear(2, 2)), lambda *a: None, 0.5)
