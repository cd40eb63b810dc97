"""Tests of rtl.train: Alg. 2's balanced cyclic order, sequential and mixed joint retraining, resume, DDP."""

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import rtl
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear, routed_modules
from rtl.optim import TicketMaskedOptimizer
from rtl.train import StepInfo, TrainResult, balanced_cyclic_batches, train_mixed, train_sequential

HERE = os.path.dirname(os.path.abspath(__file__))


def make_model(
    num_tickets: int, seed: int = 0, bn: bool = False, dropout: float = 0.0, density: float = 0.7
) -> nn.Module:
    """Routed conv -> (BN) -> ReLU -> (Dropout) -> routed linear -> dense linear; inputs (B, 1, 5, 5), 3 classes."""
    torch.manual_seed(seed)
    layers = [RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        RoutedSparseLinear(4 * 5 * 5, 6, num_tickets),
        nn.ReLU(),
        nn.Linear(6, 3),
    ]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, layer in routed_modules(model):
            layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape, generator=gen) < density)
    return model


def make_batches(num: int, size: int = 6, seed: int = 0, ticket: int = 0):
    """(x, y) batches of a learnable task: the class is the argmax of three fixed projections of x, per ticket."""
    gen = torch.Generator().manual_seed(1000 * ticket + seed)
    proj = torch.randn(3, 25, generator=torch.Generator().manual_seed(ticket))
    out = []
    for _ in range(num):
        x = torch.randn(size, 1, 5, 5, generator=gen)
        out.append((x, (x.flatten(1) @ proj.T).argmax(1)))
    return out


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- balanced cyclic batches -----------------------------------------------------------------------------------
def test_balanced_cyclic_order_hand_sized():
    got = list(balanced_cyclic_batches([["a0", "a1", "a2"], ["b0"], ["c0", "c1"]]))
    assert got == [
        (0, 0, "a0"),
        (0, 1, "b0"),
        (0, 2, "c0"),
        (1, 0, "a1"),
        (1, 1, "b0"),
        (1, 2, "c1"),
        (2, 0, "a2"),
        (2, 1, "b0"),
        (2, 2, "c0"),
    ]


@pytest.mark.parametrize("sizes", [(1,), (4,), (3, 1, 2), (2, 5), (0, 3, 1), (7, 7, 7), (1, 0, 0, 5), (0, 0)])
def test_balanced_cyclic_order_sweep(sizes):
    loaders = [[(k, i) for i in range(n)] for k, n in enumerate(sizes)]
    got = list(balanced_cyclic_batches(loaders))
    num_batches = max(sizes)
    present = [k for k, n in enumerate(sizes) if n]
    assert len(got) == num_batches * len(present)
    expected = [(m, k, (k, m % sizes[k])) for m in range(num_batches) for k in present]
    assert got == expected


def test_balanced_cyclic_reiterates_dataloaders():
    data = [torch.arange(10), torch.arange(3) + 100]
    loaders = [DataLoader(d, batch_size=2, shuffle=True) for d in data]  # 5 and 2 batches
    got = list(balanced_cyclic_batches(loaders))
    assert [(m, k) for m, k, _ in got] == [(m, k) for m in range(5) for k in range(2)]
    short = [b for _, k, b in got if k == 1]
    # Cycles of the short subset: each full pass (2 batches) holds all of its 3 samples once.
    for start in (0, 2):
        assert sorted(torch.cat(short[start : start + 2]).tolist()) == [100, 101, 102]
    assert sorted(torch.cat([b for _, k, b in got if k == 0]).tolist()) == list(range(10))


class _Liar:
    """Claims two batches, yields one: re-iterating it finds it empty the second time."""

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 2

    def __iter__(self):
        self.calls += 1
        return iter(["x"] if self.calls == 1 else [])


def test_balanced_cyclic_errors():
    with pytest.raises(TypeError, match="loaders must be a sequence of iterables .* got generator"):
        balanced_cyclic_batches(x for x in [[1]])
    with pytest.raises(TypeError, match=r"loaders\[1\] \(generator\) has no len\(\)"):
        balanced_cyclic_batches([[1], (i for i in range(3))])
    with pytest.raises(TypeError, match=r"loaders\[0\] must be an iterable of batches, got int"):
        balanced_cyclic_batches([3])
    with pytest.raises(ValueError, match=r"loaders\[1\] yielded no batch when iterated again"):
        list(balanced_cyclic_batches([["a", "b", "c"], _Liar()]))


# -- sequential training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tickets", [1, 3])
def test_sequential_decreases_loss(num_tickets):
    model = make_model(num_tickets)
    loaders = [make_batches(3 + k, size=8, ticket=k) for k in range(num_tickets)]
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    result = train_sequential(model, loaders, opt, nn.CrossEntropyLoss(), epochs=8, progress=False)
    assert isinstance(result, TrainResult)
    assert len(result.epoch_losses) == 8 and len(result.ticket_losses) == 8
    assert result.steps == 8 * (num_tickets + 2) * num_tickets
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    for k in range(num_tickets):
        assert result.ticket_losses[-1][k] < result.ticket_losses[0][k]


def test_pruned_weights_never_move_and_ticket_a_only_weights_move_on_b_steps():
    model = make_model(2, density=1.0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in routed_modules(model):
            u = torch.rand(layer.weight.shape, generator=gen)
            layer.weight_masks[0] = u >= 0.5  # ticket A
            layer.weight_masks[1] = u >= 0.2  # ticket B: also keeps [0.2, 0.5)
            layer.weight_masks[:, u < 0.2] = False  # pruned in both
    layers = [layer for _, layer in routed_modules(model)]
    weights = [layer.weight.detach().clone() for layer in layers]
    initial = [w.clone() for w in weights]
    moved_on_b = [torch.zeros_like(layer.weight_masks[0]) for layer in layers]

    def check(info: StepInfo):
        for i, layer in enumerate(layers):
            changed = layer.weight.detach() != weights[i]
            assert not (changed & ~layer.weight_masks[info.ticket]).any(), (info.ticket, i)
            if info.ticket == 1:
                moved_on_b[i] |= changed & ~layer.weight_masks[0]
            weights[i] = layer.weight.detach().clone()

    loaders = [make_batches(2, ticket=0), make_batches(3, ticket=1)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # momentum would leak without the masked step
    train_sequential(model, loaders, opt, nn.CrossEntropyLoss(), epochs=2, progress=False, callbacks=[check])
    for i, layer in enumerate(layers):
        pruned = ~layer.weight_masks.any(0)
        assert torch.equal(layer.weight[pruned], initial[i][pruned])
        only_b = layer.weight_masks[1] & ~layer.weight_masks[0]
        assert moved_on_b[i][only_b].float().mean() > 0.5


def test_step_info_sequence():
    model = make_model(3)
    seen = []
    loaders = [make_batches(3, ticket=0), make_batches(1, ticket=1), make_batches(2, ticket=2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_sequential(
        model, loaders, opt, nn.CrossEntropyLoss(), epochs=2, progress=False, callbacks=[lambda info: seen.append(info)]
    )
    assert [(i.epoch, i.step, i.batch_index, i.ticket) for i in seen] == [
        (e, 3 * m + k, m, k) for e in range(2) for m in range(3) for k in range(3)
    ]
    assert [i.global_step for i in seen] == list(range(18))
    assert [i.last_in_epoch for i in seen] == ([False] * 8 + [True]) * 2
    assert all(torch.equal(i.route, torch.full((6,), i.ticket)) for i in seen)
    assert all(i.loss.dim() == 0 and torch.isfinite(i.loss) for i in seen)


def test_empty_ticket_gets_no_step():
    model = make_model(3)
    before = state_of(model)
    loaders = [make_batches(2, ticket=0), [], make_batches(1, ticket=2)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    result = train_sequential(model, loaders, opt, nn.CrossEntropyLoss(), epochs=1, progress=False)
    assert result.steps == 4
    assert math.isnan(result.ticket_losses[0][1]) and not math.isnan(result.ticket_losses[0][0])
    for name, layer in routed_modules(model):
        untouched = ~(layer.weight_masks[0] | layer.weight_masks[2])
        assert torch.equal(layer.weight[untouched], before[name + ".weight"][untouched])


def test_mixed_equals_sequential_with_one_ticket():
    batches = make_batches(4, ticket=0)
    results, states = [], []
    for kind in ("sequential", "mixed"):
        model = make_model(1, seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if kind == "sequential":
            r = train_sequential(model, [batches], opt, nn.CrossEntropyLoss(), epochs=2, progress=False)
        else:
            r = train_mixed(
                model,
                batches,
                lambda x, y: torch.zeros(len(y), dtype=torch.int64),
                opt,
                nn.CrossEntropyLoss(),
                epochs=2,
                progress=False,
            )
        results.append(r)
        states.append(state_of(model))
    assert_states_equal(*states)
    assert results[0].epoch_losses == results[1].epoch_losses


def test_mixed_moves_only_tickets_in_batch_and_reports_per_ticket_losses():
    model = make_model(4)
    before = state_of(model)
    batches = [(x, y, torch.tensor([0, 2, 2, 0, 0, 2])) for x, y in make_batches(3)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    result = train_mixed(model, batches, None, opt, nn.CrossEntropyLoss(reduction="none"), epochs=2, progress=False)
    for name, layer in routed_modules(model):
        allowed = layer.weight_masks[0] | layer.weight_masks[2]
        assert torch.equal(layer.weight[~allowed], before[name + ".weight"][~allowed])
        assert not torch.equal(layer.weight[allowed], before[name + ".weight"][allowed])
    losses = result.ticket_losses[0]
    assert not math.isnan(losses[0]) and not math.isnan(losses[2])
    assert math.isnan(losses[1]) and math.isnan(losses[3])
    # The per-ticket means recombine into the epoch mean (3 of 6 samples each, every batch).
    assert result.epoch_losses[0] == pytest.approx((losses[0] + losses[2]) / 2)
    scalar = train_mixed(model, batches, None, opt, nn.CrossEntropyLoss(), epochs=1, progress=False)
    assert all(math.isnan(v) for v in scalar.ticket_losses[0])


def test_loss_gets_route_or_ticket_by_keyword():
    model = make_model(3)
    got_routes, got_tickets = [], []

    def one_vs_rest(logits, y, route):
        # A detector per ticket: the ticket's logit against "label == ticket".
        got_routes.append(route.clone())
        return F.binary_cross_entropy_with_logits(
            logits.gather(1, route[:, None]).squeeze(1), (y == route).double().float()
        )

    class TicketLoss(nn.Module):
        def forward(self, logits, y, ticket):
            got_tickets.append(ticket)
            return F.cross_entropy(logits, y)

    loaders = [make_batches(1, ticket=k) for k in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_sequential(model, loaders, opt, one_vs_rest, progress=False)
    assert [r.tolist() for r in got_routes] == [[k] * 6 for k in range(3)]
    train_sequential(model, loaders, opt, TicketLoss(), progress=False)
    assert got_tickets == [0, 1, 2]
    # F.cross_entropy's third positional parameter is `weight`: it must not receive the route.
    train_sequential(model, loaders, opt, F.cross_entropy, progress=False)
    mixed = [(x, y, torch.tensor([0, 1, 2, 2, 1, 0])) for x, y in make_batches(2)]
    got_routes.clear()
    train_mixed(model, mixed, None, opt, one_vs_rest, progress=False)
    assert [r.tolist() for r in got_routes] == [[0, 1, 2, 2, 1, 0]] * 2
    with pytest.raises(TypeError, match="loss_fn asks for `ticket`, but a mixed batch holds several tickets"):
        train_mixed(model, mixed, None, opt, TicketLoss(), progress=False)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_batchnorm_shared_or_frozen_and_modes_restored(freeze_bn):
    model = make_model(2, bn=True)
    bn = model[1]
    model.eval()
    mean_before = bn.running_mean.clone()
    seen_modes = []
    loaders = [make_batches(2, ticket=0), make_batches(1, ticket=1)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_sequential(
        model,
        loaders,
        opt,
        nn.CrossEntropyLoss(),
        progress=False,
        freeze_bn=freeze_bn,
        callbacks=[lambda info: seen_modes.append((model.training, bn.training))],
    )
    assert seen_modes == [(True, not freeze_bn)] * 4
    assert torch.equal(bn.running_mean, mean_before) == freeze_bn
    assert not model.training and not bn.training  # the modes the model came in with


def test_routed_model_and_plain_model_train_alike():
    states = []
    loaders = [make_batches(2, ticket=0), make_batches(1, ticket=1)]
    for wrap in (False, True):
        model = make_model(2, seed=7)
        target = rtl.RoutedModel(model) if wrap else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_sequential(target, loaders, opt, nn.CrossEntropyLoss(), epochs=2, progress=False)
        states.append(state_of(model))
    assert_states_equal(*states)


def test_optimizer_wrapper_ownership():
    model = make_model(2)
    loaders = [make_batches(1, ticket=0), make_batches(1, ticket=1)]
    train_sequential(model, loaders, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=False)
    assert all(not layer._forward_hooks for _, layer in routed_modules(model))  # our wrapper is gone
    opt = TicketMaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    train_sequential(model, loaders, opt, nn.CrossEntropyLoss(), progress=False)
    assert all(layer._forward_hooks for _, layer in routed_modules(model))  # the caller's wrapper keeps its hooks
    assert opt._explicit is None
    # The loop sets each step's tickets itself: it does not depend on the wrapper's forward recording.
    opt.remove_hooks()
    silent = TicketMaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5), model)
    silent.remove_hooks()
    before = state_of(model)
    train_sequential(model, [make_batches(2, ticket=0), []], silent, nn.CrossEntropyLoss(), progress=False)
    for name, layer in routed_modules(model):
        outside = ~layer.weight_masks[0]
        assert torch.equal(layer.weight[outside], before[name + ".weight"][outside])
    other = make_model(2)
    with pytest.raises(ValueError, match="TicketMaskedOptimizer built on another model"):
        train_sequential(other, loaders, opt, nn.CrossEntropyLoss(), progress=False)


def test_distributed_sampler_told_the_epoch():
    from torch.utils.data.distributed import DistributedSampler

    model = make_model(1)
    x, y = make_batches(1, size=8)[0]
    dataset = list(zip(x, y))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    epochs_seen = []
    set_epoch = sampler.set_epoch
    sampler.set_epoch = lambda e: (epochs_seen.append(e), set_epoch(e))
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    train_sequential(
        model, [loader], torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=3, progress=False
    )
    assert epochs_seen == [0, 1, 2]


class Stream(torch.utils.data.IterableDataset):
    """Batches (x, y, route) of unknown count."""

    def __iter__(self):
        for x, y in make_batches(3):
            yield x, y, torch.tensor([0, 1, 1, 0, 1, 0])


def test_mixed_over_an_iterable_without_len():
    model = make_model(2)
    seen = []
    result = train_mixed(
        model,
        DataLoader(Stream(), batch_size=None),
        None,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        epochs=2,
        progress=True,
        callbacks=[seen.append],
    )
    assert result.steps == 6 and len(result.epoch_losses) == 2
    assert [(i.epoch, i.step, i.batch_index, i.ticket) for i in seen] == [
        (e, m, m, None) for e in range(2) for m in range(3)
    ]
    assert not any(i.last_in_epoch for i in seen)


def test_progress_bar_and_device(capsys):
    model = make_model(2)
    loaders = [make_batches(1, ticket=0), make_batches(2, ticket=1)]
    result = train_sequential(
        model, loaders, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=True, device="cpu"
    )
    assert result.steps == 4


# -- checkpoints and resume -------------------------------------------------------------------------------------
class NoisyDataset(Dataset):
    """Draws from torch's and Python's global RNGs in __getitem__, as random augmentations do."""

    def __init__(self, ticket: int, n: int):
        self.batches = make_batches(1, size=n, ticket=ticket)[0]

    def __len__(self):
        return len(self.batches[1])

    def __getitem__(self, i):
        x, y = self.batches[0][i], self.batches[1][i]
        return x + 0.1 * torch.randn_like(x) * random.random(), y


def build_run(kind: str, model_seed: int):
    """Model (with dropout), optimizer and shuffling loaders; the global RNGs are seeded first."""
    torch.manual_seed(11)
    random.seed(11)
    model = make_model(3, seed=model_seed, dropout=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "sequential":
        data = [DataLoader(NoisyDataset(k, n), batch_size=4, shuffle=True) for k, n in enumerate((12, 4, 8))]
    else:
        gen = torch.Generator().manual_seed(3)
        data = DataLoader(
            list(
                zip(
                    torch.randn(20, 1, 5, 5, generator=gen),
                    torch.randint(0, 3, (20,), generator=gen),
                    torch.randint(0, 3, (20,), generator=gen),
                )
            ),
            batch_size=4,
            shuffle=True,
        )
    torch.manual_seed(12)
    random.seed(12)
    return model, opt, data


def run_kind(kind, model, data, opt, **kw):
    fn = train_sequential if kind == "sequential" else train_mixed
    args = (model, data, opt) if kind == "sequential" else (model, data, None, opt)
    return fn(*args, nn.CrossEntropyLoss(), progress=False, **kw)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "kind,stop_at", [("sequential", None), ("sequential", 4), ("sequential", 16), ("mixed", None), ("mixed", 7)]
)
def test_resume_continues_identically(tmp_path, kind, stop_at):
    model, opt, data = build_run(kind, model_seed=0)
    reference = run_kind(kind, model, data, opt, epochs=2)
    expected = state_of(model)

    path = str(tmp_path / "ckpt.pt")
    model, opt, data = build_run(kind, model_seed=0)
    if stop_at is None:
        first = run_kind(kind, model, data, opt, epochs=1, checkpoint=path)
        assert first.epoch_losses == reference.epoch_losses[:1]
    else:

        def stop(info):
            if info.global_step == stop_at:
                raise Interrupt

        with pytest.raises(Interrupt):
            run_kind(kind, model, data, opt, epochs=2, checkpoint=path, checkpoint_every=1, callbacks=[stop])
    assert torch.load(path, weights_only=True)["format"] == "rtl.train"
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # written atomically, no temporary file left

    model, opt, data = build_run(kind, model_seed=99)  # other weights and RNG states: all must come from the file
    torch.manual_seed(1234)
    resumed = run_kind(kind, model, data, opt, epochs=2, checkpoint=path)
    assert_states_equal(state_of(model), expected)
    assert resumed.epoch_losses == pytest.approx(reference.epoch_losses, rel=1e-12)
    assert resumed.steps == reference.steps
    # A finished run resumed again does nothing and reports the same history.
    again = run_kind(kind, model, data, opt, epochs=2, checkpoint=path)
    assert again.epoch_losses == resumed.epoch_losses
    assert_states_equal(state_of(model), expected)


def test_resume_without_rng_restore_differs(tmp_path):
    # Guard on the test above: with dropout, shuffling and noisy batches, not restoring the RNGs changes the run.
    model, opt, data = build_run("sequential", model_seed=0)
    run_kind("sequential", model, data, opt, epochs=2)
    expected = state_of(model)
    model, opt, data = build_run("sequential", model_seed=0)
    run_kind("sequential", model, data, opt, epochs=1)
    torch.manual_seed(1234)
    run_kind("sequential", model, data, opt, epochs=1)
    assert not torch.equal(state_of(model)["0.weight"], expected["0.weight"])


def test_checkpoint_errors(tmp_path):
    model, opt, data = build_run("sequential", model_seed=0)
    path = str(tmp_path / "ckpt.pt")
    run_kind("sequential", model, data, opt, epochs=1, checkpoint=path)
    _, _, mixed_data = build_run("mixed", model_seed=0)
    with pytest.raises(ValueError, match="was written by sequential, not mixed"):
        run_kind("mixed", model, mixed_data, opt, epochs=2, checkpoint=path)
    two = make_model(2)
    with pytest.raises(ValueError, match="has 3 tickets, the model has 2"):
        train_sequential(
            two,
            [make_batches(1, ticket=0), make_batches(1, ticket=1)],
            torch.optim.SGD(two.parameters(), lr=0.1),
            nn.CrossEntropyLoss(),
            checkpoint=path,
            progress=False,
        )
    junk = str(tmp_path / "junk.pt")
    torch.save({"hello": 1}, junk)
    with pytest.raises(ValueError, match="is not an rtl.train checkpoint"):
        run_kind("sequential", model, data, opt, epochs=2, checkpoint=junk)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint path"):
        run_kind("sequential", model, data, opt, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1 or None, got 0"):
        run_kind("sequential", model, data, opt, checkpoint=path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint must be a path or None, got int"):
        run_kind("sequential", model, data, opt, checkpoint=3)


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_arguments():
    model = make_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ce = nn.CrossEntropyLoss()
    good = [make_batches(1, ticket=0), make_batches(1, ticket=1)]
    with pytest.raises(ValueError, match="loaders has 3 loaders but the model has 2 tickets"):
        train_sequential(model, good + [[]], opt, ce, progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 0, got -1"):
        train_sequential(model, good, opt, ce, epochs=-1, progress=False)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        train_sequential(model, good, "adam", ce, progress=False)
    with pytest.raises(TypeError, match="loss_fn must be callable, got int"):
        train_sequential(model, good, opt, 3, progress=False)
    with pytest.raises(TypeError, match=r"callbacks\[0\] must be callable, got int"):
        train_sequential(model, good, opt, ce, progress=False, callbacks=[1])
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        train_sequential("model", good, opt, ce, progress=False)
    with pytest.raises(TypeError, match=r"loaders\[1\] must yield \(x, y\) batches, got Tensor"):
        train_sequential(model, [good[0], [torch.randn(2, 1, 5, 5)]], opt, ce, progress=False)
    with pytest.raises(ValueError, match=r"loaders\[0\] yielded a batch of 3 items, expected \(x, y\)"):
        train_sequential(model, [[good[0][0] + (1,)], good[1]], opt, ce, progress=False)
    with pytest.raises(ValueError, match=r"loss_fn returned shape \(5,\): return a scalar or per-sample values"):
        train_sequential(model, good, opt, lambda out, y: out.sum(1)[:5], progress=False)
    with pytest.raises(TypeError, match="loss_fn must return a tensor, got float"):
        train_sequential(model, good, opt, lambda out, y: 1.0, progress=False)
    assert all(not layer._forward_hooks for _, layer in routed_modules(model))  # cleaned up after every error

    x, y = good[0][0]
    with pytest.raises(ValueError, match=r"the loader yields \(x, y\) batches without a route"):
        train_mixed(model, [(x, y)], None, opt, ce, progress=False)
    with pytest.raises(ValueError, match=r"the loader yields \(x, y, route\) and router_or_route_fn is given too"):
        train_mixed(model, [(x, y, torch.zeros(6, dtype=torch.int64))], lambda x, y: y, opt, ce, progress=False)
    with pytest.raises(ValueError, match=r"route holds ticket 2, outside \[0, 2\)"):
        train_mixed(model, [(x, y, torch.full((6,), 2))], None, opt, ce, progress=False)
    with pytest.raises(ValueError, match="route has 5 entries but the batch has 6 samples"):
        train_mixed(model, [(x, y)], lambda x, y: torch.zeros(5, dtype=torch.int64), opt, ce, progress=False)
    with pytest.raises(TypeError, match="router_or_route_fn must be callable or None, got int"):
        train_mixed(model, [(x, y)], 5, opt, ce, progress=False)
    with pytest.raises(TypeError, match="loader must be an iterable of batches, got int"):
        train_mixed(model, 5, None, opt, ce, progress=False)
    with pytest.raises(TypeError, match=r"loader must yield \(x, y\) batches or \(x, y, route\), got str"):
        train_mixed(model, ["batch"], None, opt, ce, progress=False)


# -- DistributedDataParallel ------------------------------------------------------------------------------------
def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is not available")
def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path, gloo_workers):
    module = gloo_workers(os.path.join(HERE, "_ddp_worker.py"))
    reference = module.run(0, 1)  # one process, the full global batches
    initial = module.make_model().state_dict()
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        for kind, ref_state, state in zip(("sequential", "mixed"), reference, got):
            for key, ref in ref_state.items():
                if ref.dtype.is_floating_point:
                    assert not torch.equal(ref, initial[key]), (kind, key)  # training did move it
                    torch.testing.assert_close(state[key], ref, rtol=1e-6, atol=1e-9, msg=f"{kind} {key} rank {rank}")
                else:
                    assert torch.equal(state[key], ref), (kind, key)
    for kind in ("sequential", "mixed"):
        ckpt = torch.load(os.path.join(tmp_path, f"{kind}.ckpt"), weights_only=True)
        assert ckpt["epoch"] == 2 and len(ckpt["rng"]) == 2  # written by process 0, with every process's RNG
