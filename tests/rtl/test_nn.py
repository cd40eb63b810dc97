"""rtl.nn routed layers, rtl.RoutedModel / use_route, convert_ and extract_ticket."""

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

import rtl
from rtl.nn import RoutedSparseConv2d, RoutedSparseConvTranspose2d, RoutedSparseLinear


def _random_masks_(module, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight_masks.copy_(torch.rand(module.weight_masks.shape, generator=gen) < density)
    return module


def _per_sample(fn, x, route, masks, weight):
    """float64 oracle: each sample through its own masked weight."""
    outs = [fn(x[i : i + 1].double(), (weight * masks[route[i]]).double()) for i in range(x.shape[0])]
    return torch.cat(outs)


# -- layers against a float64 oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13, 5), (1, 3, 1), (9, 33, 17)])
@pytest.mark.parametrize("num_tickets", [1, 4])
def test_linear_matches_oracle(shape, num_tickets):
    batch, k, n = shape
    layer = _random_masks_(RoutedSparseLinear(k, n, num_tickets), seed=batch)
    x = torch.randn(batch, k)
    route = torch.randint(0, num_tickets, (batch,))
    y = layer(x, route)
    ref = _per_sample(lambda xi, w: F.linear(xi, w, layer.bias.double()), x, route, layer.weight_masks, layer.weight)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_flattens_leading_dims_and_expands_route():
    layer = _random_masks_(RoutedSparseLinear(6, 5, 3))
    x = torch.randn(4, 7, 6)  # (B, tokens, features)
    route = torch.tensor([2, 0, 1, 2])
    y = layer(x, route)
    assert y.shape == (4, 7, 5)
    per_row = layer(x.reshape(-1, 6), route.repeat_interleave(7)).reshape(4, 7, 5)
    torch.testing.assert_close(y, per_row)
    for i in range(4):
        torch.testing.assert_close(
            y[i], F.linear(x[i], layer.weight * layer.weight_masks[route[i]], layer.bias), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)),
        dict(kernel_size=3, groups=3, padding=1, bias=False),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=1, dilation=2),
        dict(kernel_size=3, padding="same", dilation=2),
    ],
)
def test_conv2d_matches_oracle(kwargs):
    conv = _random_masks_(RoutedSparseConv2d(3, 6, num_tickets=3, **kwargs), seed=3)
    dense = nn.Conv2d(3, 6, **kwargs).double()
    x = torch.randn(5, 3, 11, 9)
    route = torch.tensor([0, 2, 2, 1, 0])
    y = conv(x, route)
    bias = None if conv.bias is None else conv.bias.double()

    def one(xi, w):
        dense.weight.data, dense.bias = w, (None if bias is None else nn.Parameter(bias))
        return dense(xi)

    torch.testing.assert_close(
        y.double(), _per_sample(one, x, route, conv.weight_masks, conv.weight), rtol=1e-5, atol=1e-5
    )
    assert conv(x[0], route[:1]).shape == y.shape[1:]  # unbatched input


def test_conv_transpose2d_matches_oracle_and_output_size():
    up = _random_masks_(RoutedSparseConvTranspose2d(4, 2, (3, 5), 3, stride=(1, 2), padding=(1, 2)), seed=5)
    x = torch.randn(3, 4, 6, 7)
    route = torch.tensor([2, 0, 2])
    y = up(x, route, output_size=(6, 14))
    assert y.shape == (3, 2, 6, 14)
    ref = _per_sample(
        lambda xi, w: F.conv_transpose2d(xi, w, up.bias.double(), (1, 2), (1, 2), (0, 1)),
        x,
        route,
        up.weight_masks,
        up.weight,
    )
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_weight_gradient_zero_outside_present_tickets():
    layer = _random_masks_(RoutedSparseLinear(9, 7, 4), density=0.3)
    x = torch.randn(6, 9)
    route = torch.tensor([1, 1, 3, 3, 1, 3])
    layer(x, route).pow(2).sum().backward()
    allowed = layer.weight_masks[1] | layer.weight_masks[3]
    assert torch.all(layer.weight.grad[~allowed] == 0)
    assert torch.any(layer.weight.grad[allowed] != 0)


# -- routes and bad input ---------------------------------------------------------------------------------------


def test_single_ticket_layer_needs_no_route():
    layer = RoutedSparseLinear(4, 3, 1)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize(
    "route, exc, match",
    [
        (None, ValueError, "got no route"),
        (torch.tensor([0, 1, 2]), ValueError, "not a multiple"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer ticket ids"),
        (torch.tensor([0, 4]), ValueError, "ticket 4, outside"),
        (torch.tensor([-1, 0]), ValueError, "ticket -1, outside"),
        (torch.tensor([[0, 1]]), ValueError, "must be 1-D"),
        ("ab", TypeError, "route must"),
    ],
)
def test_bad_routes(route, exc, match):
    layer = RoutedSparseLinear(4, 3, 4)
    with pytest.raises(exc, match=match):
        layer(torch.randn(2, 4), route)


@pytest.mark.parametrize("num_tickets", [0, -2, 1.5, True])
def test_bad_num_tickets(num_tickets):
    with pytest.raises(ValueError, match="num_tickets must be an int >= 1"):
        RoutedSparseLinear(4, 3, num_tickets)
    with pytest.raises(ValueError, match="num_tickets must be an int >= 1"):
        rtl.convert_(nn.Sequential(nn.Linear(2, 2)), num_tickets)


def test_routed_model_route_length_must_match_batch():
    model = rtl.convert_(nn.Sequential(nn.Linear(4, 3)), 2)
    with pytest.raises(ValueError, match="route has 3 entries but the batch has 2"):
        rtl.RoutedModel(model)(torch.randn(2, 4), torch.tensor([0, 1, 1]))


def test_model_without_routed_layers():
    with pytest.raises(ValueError, match="no routed layers"):
        rtl.RoutedModel(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no routed layers"):
        rtl.extract_ticket(nn.Sequential(nn.ReLU()), 0)


def test_use_route_clears_state_after_an_error():
    model = rtl.convert_(nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)), 2)  # shapes do not chain: raises
    with pytest.raises(ValueError, match="x has 3 features"):
        rtl.RoutedModel(model)(torch.randn(2, 4), torch.tensor([0, 1]))
    assert all(m._route_state is None for _, m in rtl.routed_modules(model))
    with pytest.raises(ValueError, match="got no route"):
        model[0](torch.randn(2, 4))


def test_nested_use_route_refused():
    model = rtl.convert_(nn.Sequential(nn.Linear(4, 3)), 2)
    with rtl.use_route(model, torch.tensor([0, 1])):
        with pytest.raises(RuntimeError, match="already being routed"):
            with rtl.use_route(model, torch.tensor([1, 1])):
                pass


def test_masks_must_stay_bool():
    layer = RoutedSparseLinear(4, 3, 2)
    layer.weight_masks = layer.weight_masks.float()
    with pytest.raises(TypeError, match="weight_masks must be bool"):
        layer(torch.randn(2, 4), torch.tensor([0, 1]))


# -- conversion ---------------------------------------------------------------------------------------------------


def test_from_dense_shares_parameters_and_old_optimizer_keeps_working():
    dense = nn.Linear(5, 3)
    opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    routed = RoutedSparseLinear.from_dense(dense, 3)
    assert routed.weight is dense.weight and routed.bias is dense.bias
    before = routed.weight.detach().clone()
    routed(torch.randn(4, 5), torch.tensor([0, 1, 2, 0])).sum().backward()
    opt.step()
    assert not torch.equal(before, routed.weight)
    with pytest.raises(TypeError, match="takes an Linear"):
        RoutedSparseLinear.from_dense(nn.Conv2d(1, 1, 1), 2)


def test_to_dense_equals_the_routed_ticket():
    conv = _random_masks_(RoutedSparseConv2d(4, 5, 3, num_tickets=3, stride=2, padding=1))
    x = torch.randn(3, 4, 9, 9)
    plain = conv.to_dense(2)
    assert type(plain) is nn.Conv2d and plain.stride == (2, 2)
    torch.testing.assert_close(plain(x), conv(x, torch.full((3,), 2)), rtol=1e-5, atol=1e-5)
    plain.weight.data.add_(1.0)  # a copy: the shared weight is untouched
    assert not torch.equal(plain.weight, conv.weight)
    with pytest.raises(ValueError, match=r"ticket must be an int in \[0, 3\)"):
        conv.to_dense(3)


def test_extra_repr_shows_density_per_ticket():
    layer = RoutedSparseLinear(4, 2, 2)
    with torch.no_grad():
        layer.weight_masks[1, 0] = False
    assert "num_tickets=2, density=[1.000, 0.500]" in repr(layer)


def _small_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def test_dense_checkpoint_loads_into_converted_model():
    source = _small_cnn()
    model = rtl.convert_(_small_cnn(), 3)
    _random_masks_(model[0])
    masks = model[0].weight_masks.clone()
    result = model.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model[0].weight, source[0].weight)
    assert torch.equal(model[0].weight_masks, masks)  # a dense checkpoint leaves the tickets alone


def test_state_dict_round_trip_and_mask_shape_mismatch():
    model = rtl.convert_(_small_cnn(), 3)
    _random_masks_(model[4], seed=9)
    other = rtl.convert_(_small_cnn(), 3)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other[4].weight_masks, model[4].weight_masks)
    wrong = rtl.convert_(_small_cnn(), 2)
    with pytest.raises(RuntimeError, match="weight_masks"):
        wrong.load_state_dict(model.state_dict())


def test_torch_prune_masks_import_as_tickets():
    dense = nn.Linear(8, 6)
    torch_prune.l1_unstructured(dense, "weight", amount=0.5)
    routed = RoutedSparseLinear.from_dense(dense, 2)
    assert routed.weight is dense.weight_orig
    assert torch.equal(routed.weight_masks[1], dense.weight_mask.bool())

    fresh = RoutedSparseLinear(8, 6, 3)
    other = nn.Linear(8, 6)
    torch_prune.random_unstructured(other, "weight", amount=0.25)
    fresh.import_prune_mask_(other, ticket=2)
    assert torch.equal(fresh.weight_masks[2], other.weight_mask.bool())
    assert fresh.weight_masks[:2].all()

    # a checkpoint of a pruned model (weight_orig / weight_mask) loads into the converted model
    model = rtl.convert_(nn.Sequential(nn.Linear(8, 6)), 2)
    model.load_state_dict(nn.Sequential(dense).state_dict())
    assert torch.equal(model[0].weight, dense.weight_orig)
    assert torch.equal(model[0].weight_masks[0], dense.weight_mask.bool())
    with pytest.raises(ValueError, match="differs from weight shape"):
        fresh.import_prune_mask_(torch.ones(3, 3), 0)


def test_convert_filter_and_idempotence():
    model = _small_cnn()
    rtl.convert_(model, 4, filter_fn=lambda name, m: name != "4")
    assert isinstance(model[0], RoutedSparseConv2d) and type(model[4]) is nn.Linear
    first = model[0]
    rtl.convert_(model, 4)
    assert model[0] is first and isinstance(model[4], RoutedSparseLinear)
    assert isinstance(rtl.convert_(nn.Linear(3, 2), 2), RoutedSparseLinear)


def test_extract_ticket_equals_routed_model():
    model = rtl.convert_(_small_cnn(), 3).eval()
    for _, layer in rtl.routed_modules(model):
        _random_masks_(layer, seed=4)
    x = torch.randn(4, 2, 6, 6)
    routed = rtl.RoutedModel(model)
    for t in range(3):
        plain = rtl.extract_ticket(routed, t)
        assert not any(True for _ in rtl.routed_modules(plain))
        torch.testing.assert_close(plain(x), routed(x, torch.full((4,), t)), rtol=1e-5, atol=1e-5)


def test_mixed_route_equals_each_sample_alone():
    model = rtl.convert_(_small_cnn(), 3).eval()
    for _, layer in rtl.routed_modules(model):
        _random_masks_(layer, seed=7)
    routed = rtl.RoutedModel(model)
    x = torch.randn(5, 2, 6, 6)
    route = torch.tensor([2, 0, 1, 1, 2])
    y = routed(x, route)
    for i in range(5):
        torch.testing.assert_close(y[i : i + 1], routed(x[i : i + 1], route[i : i + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("resnet18", (2, 3, 32, 32)),
        ("mobilenet_v3_small", (2, 3, 32, 32)),
        ("vit_b_16", (1, 3, 224, 224)),
    ],
)
def test_torchvision_models_convert_with_all_ones_masks(name, shape):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        # vit_b_16's attention calls F.multi_head_attention_forward on out_proj's weight directly: that
        # NonDynamicallyQuantizableLinear subclass is left dense by convert_ (it is not an nn.Linear exactly)
        rtl.convert_(model, 2)
        assert sum(1 for _ in rtl.routed_modules(model)) > 3
        out = rtl.RoutedModel(model)(x, torch.tensor([1, 0][: shape[0]]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_torch_compile_converted_model():
    model = rtl.convert_(_small_cnn(), 3).eval()
    for _, layer in rtl.routed_modules(model):
        _random_masks_(layer, seed=2)
    routed = rtl.RoutedModel(model)
    x = torch.randn(4, 2, 6, 6)
    route = torch.tensor([0, 2, 1, 2])
    compiled = torch.compile(routed, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, route), routed(x, route))
