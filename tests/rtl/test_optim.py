"""Tests of rtl.optim.TicketMaskedOptimizer: weights and their optimizer state outside the active tickets stay put."""

import pickle

import pytest
import torch
from torch import nn

import rtl
from rtl.nn import RoutedSparseConv2d, RoutedSparseConvTranspose2d, RoutedSparseLinear, routed_modules
from rtl.optim import TicketMaskedOptimizer


def make_model(num_tickets: int, seed: int = 0, density: float = 0.6) -> nn.Module:
    """Conv -> BN -> ReLU -> ConvTranspose -> Linear (routed) -> Linear (dense); random masks, some positions pruned
    in every ticket. Inputs (B, 1, 7, 7)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        RoutedSparseConv2d(1, 5, 3, num_tickets, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        RoutedSparseConvTranspose2d(5, 3, 3, num_tickets, padding=1),
        nn.Flatten(),
        RoutedSparseLinear(3 * 7 * 7, 6, num_tickets),
        nn.ReLU(),
        nn.Linear(6, 4),
    )
    with torch.no_grad():
        for _, layer in routed_modules(model):
            keep = torch.rand(layer.weight_masks.shape, generator=gen) < density
            keep &= torch.rand(layer.weight.shape, generator=gen) < 0.9  # pruned for every ticket
            layer.weight_masks.copy_(keep)
    return model


def batch(size: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 7, 7, generator=gen), torch.randint(0, 4, (size,), generator=gen)


def train_step(model, opt, route, seed: int = 1):
    x, y = batch(route.shape[0], seed)
    opt.zero_grad()
    with rtl.use_route(model, route):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def routed_weights(model):
    return {name: layer.weight for name, layer in routed_modules(model)}


def snapshot(model, inner):
    """(weights, {name: {state key: tensor}}) copies for every routed weight."""
    weights = {n: w.detach().clone() for n, w in routed_weights(model).items()}
    states = {
        n: {k: v.clone() for k, v in inner.state.get(w, {}).items() if torch.is_tensor(v) and v.shape == w.shape}
        for n, w in routed_weights(model).items()
    }
    return weights, states


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("num_tickets,ticket", [(3, 1), (1, 0), (4, 3)])
def test_outside_active_mask_bit_identical_with_prior_momentum(name, num_tickets, ticket):
    model = make_model(num_tickets)
    inner = OPTIMIZERS[name](model.parameters())
    opt = TicketMaskedOptimizer(inner, model)
    # First step with every ticket present builds momentum everywhere in the union of the masks.
    train_step(model, opt, torch.arange(6) % num_tickets, seed=2)
    before_w, before_s = snapshot(model, inner)
    dense_before = model[7].weight.detach().clone()
    bn_before = model[1].weight.detach().clone()
    for seed in range(3, 6):
        with opt.active_tickets(ticket):
            train_step(model, opt, torch.full((6,), ticket), seed=seed)
    after_w, after_s = snapshot(model, inner)
    for layer_name, layer in routed_modules(model):
        outside = ~layer.weight_masks[ticket]
        inside = layer.weight_masks[ticket]
        assert torch.equal(after_w[layer_name][outside], before_w[layer_name][outside])
        if inside.any():
            assert not torch.equal(after_w[layer_name][inside], before_w[layer_name][inside])
        assert before_s[layer_name], "the optimizer holds no per-weight state to check"
        for key, value in after_s[layer_name].items():
            assert torch.equal(value[outside], before_s[layer_name][key][outside]), key
    assert not torch.equal(model[7].weight, dense_before)
    assert not torch.equal(model[1].weight, bn_before)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum"])
def test_unwrapped_optimizer_leaks_so_the_check_can_fail(name):
    # The same run with the bare optimizer moves weights outside ticket 1's mask: what the wrapper prevents.
    model = make_model(3)
    inner = OPTIMIZERS[name](model.parameters())
    train_step(model, inner, torch.arange(6) % 3, seed=2)
    before, _ = snapshot(model, inner)
    train_step(model, inner, torch.full((6,), 1), seed=3)
    layer_name, layer = next(iter(routed_modules(model)))
    outside = ~layer.weight_masks[1]
    assert not torch.equal(layer.weight[outside], before[layer_name][outside])


def test_new_state_starts_at_zero_outside_active_mask():
    # Adam with L2 weight decay: grad + wd * w is nonzero everywhere, so without the wrapper exp_avg would be too.
    model = make_model(3)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = TicketMaskedOptimizer(inner, model)
    before, _ = snapshot(model, inner)
    with opt.active_tickets(2):
        train_step(model, opt, torch.full((6,), 2))
    for name, layer in routed_modules(model):
        outside = ~layer.weight_masks[2]
        state = inner.state[layer.weight]
        assert torch.equal(layer.weight[outside], before[name][outside])
        assert torch.all(state["exp_avg"][outside] == 0)
        assert torch.all(state["exp_avg_sq"][outside] == 0)
        assert torch.any(state["exp_avg"][layer.weight_masks[2]] != 0)


def test_automatic_detection_from_forward_route():
    model = make_model(3)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    opt = TicketMaskedOptimizer(inner, model)
    train_step(model, opt, torch.arange(6) % 3, seed=2)
    before, before_s = snapshot(model, inner)
    route = torch.tensor([0, 2, 2, 0, 0, 2])
    train_step(model, opt, route, seed=3)  # no explicit tickets: recorded by the layers
    for name, layer in routed_modules(model):
        allowed = layer.weight_masks[0] | layer.weight_masks[2]
        assert torch.equal(layer.weight[~allowed], before[name][~allowed])
        assert torch.equal(inner.state[layer.weight]["exp_avg"][~allowed], before_s[name]["exp_avg"][~allowed])
        assert not torch.equal(layer.weight[allowed], before[name][allowed])


def test_recording_covers_direct_layer_calls_and_forgets_after_step():
    layer = RoutedSparseLinear(7, 5, 3)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.5)
    inner = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    opt = TicketMaskedOptimizer(inner, layer)
    layer(torch.randn(4, 7), torch.tensor([1, 1, 1, 1])).square().sum().backward()
    opt.step()
    opt.zero_grad()
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 7), torch.tensor([2, 2, 2, 2])).square().sum().backward()
    opt.step()  # momentum from the ticket-1 step must not leak: ticket 1 is no longer recorded
    outside = ~layer.weight_masks[2]
    assert torch.equal(layer.weight[outside], before[outside])
    assert not torch.equal(layer.weight[~outside], before[~outside])


def test_no_grad_forward_is_not_recorded():
    layer = RoutedSparseLinear(7, 5, 3)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.5)
    inner = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    opt = TicketMaskedOptimizer(inner, layer)
    layer(torch.randn(4, 7), torch.tensor([0, 1, 2, 0])).square().sum().backward()
    opt.step()
    opt.zero_grad()
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer(torch.randn(3, 7), torch.tensor([0, 1, 2]))  # an evaluation forward
    layer(torch.randn(4, 7), torch.tensor([1, 1, 1, 1])).square().sum().backward()
    opt.step()
    outside = ~layer.weight_masks[1]
    assert torch.equal(layer.weight[outside], before[outside])


def test_layer_not_run_keeps_all_its_weights():
    # Momentum alone would move the second layer; it did not run since the previous step, so it is frozen.
    first, second = RoutedSparseLinear(6, 5, 2), RoutedSparseLinear(5, 3, 2)
    model = nn.Sequential(first, second)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = TicketMaskedOptimizer(inner, model)
    with rtl.use_route(model, torch.tensor([0, 1, 1])):
        model(torch.randn(3, 6)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = second.weight.detach().clone()
    first(torch.randn(2, 6), torch.tensor([0, 1])).sum().backward()
    opt.step()
    assert torch.equal(second.weight, before)


def test_nothing_recorded_means_every_ticket():
    layer = RoutedSparseLinear(7, 5, 3)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.4)
        layer.weight_masks[:, 0, :] = False  # row 0 pruned in every ticket
    inner = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.5)
    opt = TicketMaskedOptimizer(inner, layer)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.randn_like(layer.weight)  # a gradient made by hand: no forward recorded
    opt.step()
    union = layer.weight_masks.any(0)
    assert torch.equal(layer.weight[~union], before[~union])
    assert torch.all(layer.weight[union] != before[union])


def test_explicit_overrides_recorded_and_context_restores():
    layer = RoutedSparseLinear(7, 5, 3)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.5)
    opt = TicketMaskedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.5), layer)
    opt.set_active_tickets([0])
    with opt.active_tickets(torch.tensor([2, 1, 2])):
        assert opt._explicit == (1, 2)
        before = layer.weight.detach().clone()
        layer(torch.randn(4, 7), torch.tensor([0, 0, 0, 0])).square().sum().backward()
        opt.step()
        allowed = layer.weight_masks[1] | layer.weight_masks[2]
        assert torch.equal(layer.weight[~allowed], before[~allowed])
    assert opt._explicit == (0,)
    opt.set_active_tickets(None)
    assert opt._explicit is None


def test_empty_ticket_set_freezes_routed_weights_only():
    model = make_model(3)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = TicketMaskedOptimizer(inner, model)
    before, _ = snapshot(model, inner)
    bias_before = model[0].bias.detach().clone()
    with opt.active_tickets([]):
        train_step(model, opt, torch.arange(6) % 3)
    for name, weight in routed_weights(model).items():
        assert torch.equal(weight, before[name])
    assert not torch.equal(model[0].bias, bias_before)


def test_empty_mask_ticket_moves_nothing_in_that_layer():
    model = make_model(3)
    layer = model[5]
    with torch.no_grad():
        layer.weight_masks[1] = False
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = TicketMaskedOptimizer(inner, model)
    train_step(model, opt, torch.arange(6) % 3, seed=2)
    before = layer.weight.detach().clone()
    with opt.active_tickets(1):
        train_step(model, opt, torch.full((6,), 1), seed=3)
    assert torch.equal(layer.weight, before)


def test_tied_weight_allowed_region_is_union_over_layers():
    first, second = RoutedSparseLinear(5, 5, 2, bias=False), RoutedSparseLinear(5, 5, 2, bias=False)
    second.weight = first.weight
    with torch.no_grad():
        first.weight_masks.copy_(torch.rand(2, 5, 5) < 0.4)
        second.weight_masks.copy_(torch.rand(2, 5, 5) < 0.4)
    model = nn.Sequential(first, second)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    opt = TicketMaskedOptimizer(inner, model)
    before = first.weight.detach().clone()
    with rtl.use_route(model, torch.tensor([1, 1, 1])):
        model(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    allowed = first.weight_masks[1] | second.weight_masks[1]
    assert torch.equal(first.weight[~allowed], before[~allowed])
    assert not torch.equal(first.weight[allowed], before[allowed])


def test_state_dict_round_trip_continues_identically():
    def run(steps_before_copy: int, total: int, reload: bool):
        model = make_model(3, seed=4)
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt = TicketMaskedOptimizer(inner, model)
        for s in range(steps_before_copy):
            with opt.active_tickets(s % 3):
                train_step(model, opt, torch.full((6,), s % 3), seed=10 + s)
        if reload:
            saved_model, saved_opt = model.state_dict(), opt.state_dict()
            assert saved_opt["state"].keys() == inner.state_dict()["state"].keys()
            model = make_model(3, seed=99)
            model.load_state_dict(saved_model)
            opt = TicketMaskedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model)
            opt.load_state_dict(saved_opt)
        for s in range(steps_before_copy, total):
            with opt.active_tickets(s % 3):
                train_step(model, opt, torch.full((6,), s % 3), seed=10 + s)
        return model.state_dict()

    straight, reloaded = run(3, 6, False), run(3, 6, True)
    for key in straight:
        assert torch.equal(straight[key], reloaded[key]), key


def test_delegation_and_lr_scheduler():
    model = make_model(2)
    inner = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    opt = TicketMaskedOptimizer(inner, model)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, torch.tensor([0, 1, 0, 1, 0, 1]))
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.5
    extra = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra
    calls = []
    handle = opt.register_step_post_hook(lambda o, a, k: calls.append(o))
    train_step(model, opt, torch.tensor([0, 1, 0, 1, 0, 1]))
    handle.remove()
    assert calls == [inner]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "num_tickets=2" in repr(opt)
    inner.custom_setting = 5
    assert opt.custom_setting == 5  # other attributes are the inner optimizer's
    with pytest.raises(AttributeError):
        opt.no_such_attribute


def test_remove_hooks_stops_recording():
    layer = RoutedSparseLinear(4, 3, 2)
    opt = TicketMaskedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), layer)
    opt.remove_hooks()
    layer(torch.randn(2, 4), torch.tensor([0, 1])).sum().backward()
    assert all(p is None for p in opt._recorded)


def test_accepts_ddp_free_wrappers_and_routed_model():
    model = make_model(2)
    routed = rtl.RoutedModel(model)
    opt = TicketMaskedOptimizer(torch.optim.SGD(routed.parameters(), lr=0.1), routed)
    assert opt.num_tickets == 2 and not opt.sync_tickets


@pytest.mark.parametrize(
    "tickets,error,match",
    [
        (3, ValueError, r"tickets holds ticket 3, outside \[0, 3\)"),
        (-1, ValueError, r"tickets holds ticket -1, outside \[0, 3\)"),
        ([0, 7], ValueError, r"tickets holds ticket 7"),
        (True, TypeError, r"tickets must be an int, a sequence of ints or a tensor, got True"),
        ([0, 1.5], TypeError, r"tickets must hold ints, got 1.5"),
        (torch.tensor([0.0, 1.0]), TypeError, r"integer ticket ids, got a tensor of dtype torch.float32"),
        ("01", TypeError, r"tickets must be an int, a sequence of ints or a tensor, got str"),
    ],
)
def test_bad_tickets(tickets, error, match):
    model = make_model(3)
    opt = TicketMaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(error, match=match):
        opt.set_active_tickets(tickets)


def test_bad_construction():
    model = make_model(2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        TicketMaskedOptimizer([inner], model)
    with pytest.raises(TypeError, match="already a TicketMaskedOptimizer"):
        TicketMaskedOptimizer(TicketMaskedOptimizer(inner, model), model)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        TicketMaskedOptimizer(inner, {})
    with pytest.raises(ValueError, match="the model has no routed layers"):
        TicketMaskedOptimizer(inner, nn.Linear(3, 3))
    with pytest.raises(TypeError, match="sync_tickets must be a bool or None, got 1"):
        TicketMaskedOptimizer(inner, model, sync_tickets=1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(TicketMaskedOptimizer(inner, model))


def test_grad_scaler_steps_through_the_wrapper():
    model = make_model(3)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = TicketMaskedOptimizer(inner, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    train_step(model, opt, torch.arange(6) % 3, seed=2)
    before, _ = snapshot(model, inner)
    x, y = batch(6, 3)
    opt.zero_grad()
    with opt.active_tickets(0), rtl.use_route(model, torch.zeros(6, dtype=torch.int64)):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
    scaler.update()
    for name, layer in routed_modules(model):
        outside = ~layer.weight_masks[0]
        assert torch.equal(layer.weight[outside], before[name][outside])
        assert not torch.equal(layer.weight[~outside], before[name][~outside])


def test_presence_tensor_union_equals_ticket_id_union():
    # The accelerator path combines the masks with a (T,) bool presence instead of ticket ids read back to the host.
    layer = RoutedSparseConv2d(3, 4, 3, 4)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.4)
    for bits in range(16):
        tickets = tuple(t for t in range(4) if bits >> t & 1)
        presence = torch.tensor([bool(bits >> t & 1) for t in range(4)])
        assert torch.equal(TicketMaskedOptimizer._union(layer, presence), TicketMaskedOptimizer._union(layer, tickets))


def test_union_is_the_or_of_the_chosen_masks():
    # Against a plain loop of ORs, on a mask whose shape is odd in every dimension.
    layer = RoutedSparseConv2d(5, 3, 3, 6)
    with torch.no_grad():
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) < 0.3)
    masks = layer.weight_masks
    for tickets in [(0,), (2, 5), (0, 1, 3, 4), tuple(range(6))]:
        expected = torch.zeros(masks.shape[1:], dtype=torch.bool)
        for t in tickets:
            expected = expected | masks[t]
        presence = torch.zeros(6, dtype=torch.bool)
        presence[list(tickets)] = True
        assert torch.equal(TicketMaskedOptimizer._union(layer, tickets), expected)
        assert torch.equal(TicketMaskedOptimizer._union(layer, presence), expected)


@pytest.mark.parametrize("name", ["adam", "sgd_momentum"])
def test_device_side_ticket_path_steps_bit_identically(name, monkeypatch):
    # On a GPU the recorded tickets stay on the device (no host sync): force that path on CPU and compare.
    def run():
        model = make_model(4, seed=5)
        inner = OPTIMIZERS[name](model.parameters())
        opt = TicketMaskedOptimizer(inner, model)
        for step, route in enumerate([torch.arange(6) % 4, torch.tensor([1, 1, 3, 3, 1, 3]), torch.full((6,), 2)]):
            train_step(model, opt, route, seed=10 + step)
        return snapshot(model, inner)

    host_weights, host_states = run()
    monkeypatch.setattr("rtl.optim._reads_back_freely", lambda device: False)
    device_weights, device_states = run()
    for key in host_weights:
        assert torch.equal(host_weights[key], device_weights[key])
        for state_key in host_states[key]:
            assert torch.equal(host_states[key][state_key], device_states[key][state_key])


@pytest.mark.gpu
def test_step_with_recorded_tickets_does_not_sync_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = make_model(3).cuda()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = TicketMaskedOptimizer(inner, model)
    x, y = batch(6, 2)
    route = (torch.arange(6) % 3).cuda()
    for _ in range(2):  # the second step runs with Adam's state already created
        opt.zero_grad()
        with rtl.use_route(model, route):
            nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host read inside the step raises
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
