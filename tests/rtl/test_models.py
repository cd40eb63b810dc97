"""rtl.models: the paper's pruning scopes (exact weight counts), shapes, conversion to routed layers, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rtl
from rtl.models import MODELS, FourierINR, GhostNet, SmallCNN, SpeechUNet, apply_complex_mask, coords, count_prunable
from rtl.models.ghostnet import GhostModule
from rtl.models.inr import FourierFeatures
from rtl.nn import RoutedSparseModule


DENSE_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

# (factory, input maker, expected prunable weights, expected number of prunable layers)
CASES = {
    # 16x16 inputs keep the tests quick; the 32x32 shape is checked in test_ghostnet_output_shape.
    "ghostnet": (lambda: GhostNet(num_classes=10), lambda b: torch.randn(b, 3, 16, 16), 125_832, 48),
    "unet": (lambda: SpeechUNet(), lambda b: torch.randn(b, 2, 6, 33), 37_368, 10),
    "inr": (lambda: FourierINR(), lambda b: torch.rand(b, 2) * 2 - 1, 53_888, 5),
    "small_cnn": (lambda: SmallCNN(), lambda b: torch.randn(b, 1, 8, 8), 22_160, 4),
}


def _selected(model):
    return [(n, m) for n, m in model.named_modules() if model.prunable_filter(n, m)]


def _random_masks_(model, density=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in rtl.routed_modules(model):
            m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=gen) < density)


# -- pruning scopes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_prunable_weight_count_is_exact(name):
    make, _, expected, layers = CASES[name]
    model = make()
    selected = _selected(model)
    assert sum(m.weight.numel() for _, m in selected) == expected
    assert len(selected) == layers
    assert count_prunable(model) == expected
    assert all(isinstance(m, DENSE_TYPES) for _, m in selected)
    # The filters do not depend on the instance: callers may use the class's function on any model of it.
    unbound = [(n, m) for n, m in model.named_modules() if type(model).prunable_filter(None, n, m)]
    assert unbound == selected


def test_ghostnet_scope_is_every_conv_but_squeeze_excitation():
    model = GhostNet(num_classes=100)
    selected = {n for n, _ in _selected(model)}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    se_convs = {n for n in convs if ".se." in n}
    # B4 and B5 carry squeeze-excitation: two convs each, none pruned.
    assert len(se_convs) == 4 and {n.split(".")[1] for n in se_convs} == {"3", "4"}
    assert selected == convs - se_convs
    assert "conv_stem" in selected and "conv_head" in selected and "classifier" not in selected
    # Names with a prefix (the model inside a wrapper) select the same layers.
    wrapped = nn.Sequential(model)
    assert {n for n, m in wrapped.named_modules() if model.prunable_filter(n, m)} == {f"0.{n}" for n in selected}


def test_ghostnet_bottleneck_counts_follow_table_4():
    # Per-block prunable weights of the configuration that reproduces 125,832 (docs/paper_notes.md): ghost modules,
    # depthwise stride convs and conv shortcuts.
    model = GhostNet()
    expected = [400, 2244, 2160, 6168, 5520, 21560, 17260, 15908, 15908]
    got = [
        sum(m.weight.numel() for n, m in block.named_modules() if model.prunable_filter(n, m)) for block in model.blocks
    ]
    assert got == expected
    assert model.conv_stem.weight.shape == (16, 3, 3, 3) and model.conv_stem.stride == (2, 2)
    assert model.conv_expand.weight.shape == (184, 80, 1, 1)
    assert model.conv_head.weight.shape == (128, 184, 1, 1)
    assert model.classifier.in_features == 128
    shortcut = [not isinstance(b.shortcut, nn.Identity) for b in model.blocks]
    assert shortcut == [False, True, False, True, False, True, False, False, False]


def test_unet_scope_is_all_ten_convs():
    model = SpeechUNet()
    selected = _selected(model)
    assert [type(m) for _, m in selected] == [nn.Conv2d] * 5 + [nn.ConvTranspose2d] * 5
    kernels = [m.kernel_size for _, m in selected]
    assert kernels == [(3, 5)] + [(3, 3)] * 8 + [(3, 5)]
    chans = [(m.in_channels, m.out_channels) for _, m in selected]
    assert chans == [(2, 12), (12, 12), (12, 12), (12, 24), (24, 48), (48, 24), (48, 12), (24, 12), (24, 12), (24, 2)]
    assert all(m.stride == (1, 2) for _, m in selected)


def test_small_cnn_keeps_classifier_dense():
    model = SmallCNN(num_classes=7)
    names = [n for n, _ in _selected(model)]
    assert names == ["conv1", "conv2", "conv3", "fc"]


def test_filters_reject_bad_arguments():
    for model in (GhostNet(), SpeechUNet(), FourierINR(), SmallCNN()):
        with pytest.raises(TypeError, match="name must be a str"):
            model.prunable_filter(3, nn.Linear(2, 2))
        with pytest.raises(TypeError, match="module must be an nn.Module"):
            model.prunable_filter("fc", "fc")
    with pytest.raises(TypeError, match="prunable_filter"):
        count_prunable(nn.Linear(2, 2))


def test_registry():
    assert MODELS == {"ghostnet": GhostNet, "unet": SpeechUNet, "inr": FourierINR, "small_cnn": SmallCNN}
    for name, cls in MODELS.items():
        assert count_prunable(cls()) == CASES[name][2]


# -- shapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,num_classes,size", [(1, 10, 32), (3, 100, 32), (2, 7, 19)])
def test_ghostnet_output_shape(batch, num_classes, size):
    model = GhostNet(num_classes=num_classes).eval()
    assert model(torch.randn(batch, 3, size, size)).shape == (batch, num_classes)


@pytest.mark.parametrize("width", [0.5, 0.75, 1.3])
def test_ghostnet_width(width):
    model = GhostNet(width=width)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert (count_prunable(model) < 125_832) == (width < 1)
    # Block widths (ghost module outputs), the stem, the 1x1 expand and the head are rounded to multiples of 4.
    widths = [m.out_channels for m in model.modules() if isinstance(m, GhostModule)]
    widths += [model.conv_stem.out_channels, model.conv_expand.out_channels, model.conv_head.out_channels]
    assert all(c % 4 == 0 for c in widths)
    assert model.conv_stem.out_channels == max(4, round(16 * width / 4) * 4)


@pytest.mark.parametrize("shape", [(2, 2, 16, 65), (1, 2, 5, 64), (3, 2, 7, 33), (2, 2, 4, 100), (2, 2, 3, 1)])
def test_unet_output_shape_equals_input_shape(shape):
    model = SpeechUNet()
    x = torch.randn(*shape)
    assert model(x).shape == shape
    assert model.predict_mask(x).shape == shape


def test_unet_applies_its_mask_as_a_complex_product():
    model = SpeechUNet().double().eval()
    x = torch.randn(2, 2, 5, 17, dtype=torch.float64)
    mask = model.predict_mask(x)
    assert mask.abs().max() < 1  # tanh-bounded
    ref = torch.view_as_real(torch.complex(x[:, 0], x[:, 1]) * torch.complex(mask[:, 0], mask[:, 1]))
    torch.testing.assert_close(model(x), ref.permute(0, 3, 1, 2))
    unbounded = SpeechUNet(mask_activation=None).double().eval()
    unbounded.load_state_dict(model.state_dict())
    torch.testing.assert_close(torch.tanh(unbounded.predict_mask(x)), mask)


def test_apply_complex_mask_matches_complex_multiplication():
    spec, mask = torch.randn(3, 2, 4, 9, dtype=torch.float64), torch.randn(3, 2, 4, 9, dtype=torch.float64)
    ref = torch.complex(spec[:, 0], spec[:, 1]) * torch.complex(mask[:, 0], mask[:, 1])
    torch.testing.assert_close(apply_complex_mask(spec, mask), torch.stack((ref.real, ref.imag), 1))


@pytest.mark.parametrize("lead", [(7,), (2, 5), ()])
def test_inr_output_shape_and_range(lead):
    model = FourierINR()
    y = model(torch.rand(*lead, 2) * 2 - 1)
    assert y.shape == (*lead, 3)
    assert ((y > 0) & (y < 1)).all()
    raw = FourierINR(output_sigmoid=False, out_features=1, depth=2, hidden=9)
    assert raw(torch.rand(*lead, 2)).shape == (*lead, 1)


def test_fourier_features_match_formula_in_float64():
    feats = FourierFeatures(8)
    p = torch.rand(11, 2, dtype=torch.float64) * 2 - 1
    out = feats(p)
    assert out.shape == (11, 34) and FourierINR().in_features == 34
    freqs = [2.0**k * math.pi for k in range(8)]
    sin = torch.cat([torch.sin(f * p) for f in freqs], 1)
    cos = torch.cat([torch.cos(f * p) for f in freqs], 1)
    # The frequencies are held in float32; the tolerance covers their rounding times |p| <= 1.
    torch.testing.assert_close(out, torch.cat([p, sin, cos], 1), rtol=0, atol=2e-5)
    torch.testing.assert_close(FourierFeatures(3, scale=0.5).freqs, torch.tensor([0.5 * math.pi, math.pi, 2 * math.pi]))
    assert FourierFeatures(0)(p) is p
    assert "freqs" not in feats.state_dict()


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (4, 2)])
def test_coords(h, w):
    c = coords(h, w)
    assert c.shape == (h * w, 2) and FourierINR.coords(h, w).shape == (h * w, 2)
    assert c.min() >= -1 and c.max() <= 1
    # Row-major over pixels, (x along the width, y along the height).
    grid = c.reshape(h, w, 2)
    if w > 1:
        assert torch.equal(grid[0, :, 0], torch.linspace(-1, 1, w))
        assert (grid[:, -1, 0] == 1).all()
    if h > 1:
        assert torch.equal(grid[:, 0, 1], torch.linspace(-1, 1, h))
    assert coords(2, 3, dtype=torch.float64).dtype == torch.float64


def test_inr_conditioning_inputs():
    model = FourierINR(cond_features=16)
    assert model.in_features == 50 and count_prunable(model) == 53_888 + 16 * 128
    p, cond = torch.rand(6, 2), torch.randn(6, 16)
    assert model(p, cond).shape == (6, 3)
    with pytest.raises(ValueError, match=r"cond must be \(\*, 16\)"):
        model(p)
    with pytest.raises(ValueError, match=r"cond must be \(\*, 16\)"):
        model(p, torch.randn(5, 16))
    with pytest.raises(ValueError, match="cond_features=0"):
        FourierINR()(p, cond)


@pytest.mark.parametrize("batch,size", [(1, 8), (5, 8), (3, 13)])
def test_small_cnn_output_shape(batch, size):
    model = SmallCNN(num_classes=4, in_channels=2)
    assert model(torch.randn(batch, 2, size, size)).shape == (batch, 4)


# -- initialisation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,fan_in",
    [
        (lambda: GhostNet().conv_expand, 80),
        (lambda: FourierINR().layers[2], 128),
        (lambda: SmallCNN().conv3, 288),
        (lambda: SpeechUNet().encoder[4][0], 24 * 9),
        (lambda: SpeechUNet().decoder[0][0], 48 * 9),
    ],
)
def test_kaiming_normal_init(layer, fan_in):
    module = layer()
    std = math.sqrt(2.0 / fan_in)
    assert abs(module.weight.std().item() / std - 1) < 0.06
    assert abs(module.weight.mean().item()) < 0.05 * std
    assert module.bias is None or (module.bias == 0).all()


# -- conversion to routed layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_tickets", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_convert_with_all_ones_masks_keeps_the_output(name, num_tickets, dtype):
    make, make_input, expected, layers = CASES[name]
    torch.manual_seed(num_tickets)
    model = make().to(dtype).eval()
    x = make_input(4).to(dtype)
    ref = model(x)
    scope = [n for n, _ in _selected(model)]
    rtl.convert_(model, num_tickets, filter_fn=model.prunable_filter)
    routed = dict(rtl.routed_modules(model))
    assert sorted(routed) == sorted(scope)
    assert count_prunable(model) == expected  # the filter still holds on routed layers
    # Everything outside the scope stays a plain torch layer.
    for n, m in model.named_modules():
        if isinstance(m, DENSE_TYPES) and n not in routed:
            assert not isinstance(m, RoutedSparseModule)
    route = torch.randint(0, num_tickets, (x.shape[0],))
    out = rtl.RoutedModel(model)(x, route)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, **tol)
    if num_tickets == 1:
        torch.testing.assert_close(model(x), ref, **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_routed_samples_follow_their_ticket(name):
    # With distinct random masks, sample i of a mixed-route batch equals ticket route[i]'s exported model on it.
    make, make_input, _, _ = CASES[name]
    torch.manual_seed(1)
    model = make().double().eval()
    rtl.convert_(model, 3, filter_fn=model.prunable_filter)
    _random_masks_(model)
    x = make_input(4).double()
    route = torch.tensor([2, 0, 2, 1])
    out = rtl.RoutedModel(model)(x, route)
    for ticket in range(3):
        ticket_model = rtl.extract_ticket(model, ticket).eval()
        rows = route == ticket
        torch.testing.assert_close(out[rows], ticket_model(x[rows]), rtol=1e-9, atol=1e-11)
    other = rtl.RoutedModel(model)(x, (route + 1) % 3)
    assert not torch.allclose(out, other)


# -- gradients ------------------------------------------------------------------------------------------------


def _loss(name, model, x):
    y = model(x)
    if name in ("ghostnet", "small_cnn"):
        return F.cross_entropy(y, torch.randint(0, y.shape[1], (y.shape[0],)))
    return (y - torch.rand_like(y)).pow(2).mean()


@pytest.mark.parametrize("converted", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reach_every_parameter(name, converted):
    make, make_input, _, _ = CASES[name]
    torch.manual_seed(2)
    model = make().train()
    x = make_input(4)
    if converted:
        rtl.convert_(model, 2, filter_fn=model.prunable_filter)
        route = torch.tensor([0, 1, 1, 0])
        with rtl.use_route(model, route):
            loss = _loss(name, model, x)
    else:
        loss = _loss(name, model, x)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_gradients_skip_pruned_weights():
    model = SmallCNN()
    rtl.convert_(model, 2, filter_fn=model.prunable_filter)
    _random_masks_(model, density=0.5, seed=4)
    with rtl.use_route(model, torch.zeros(6, dtype=torch.int64)):
        F.cross_entropy(model(torch.randn(6, 1, 8, 8)), torch.randint(0, 10, (6,))).backward()
    for _, m in rtl.routed_modules(model):
        assert (m.weight.grad[~m.weight_masks[0]] == 0).all()


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GhostNet(num_classes=0), "num_classes must be an int >= 1, got 0"),
        (lambda: GhostNet(num_classes=2.0), "num_classes must be an int >= 1, got 2.0"),
        (lambda: GhostNet(width=0), "width must be a number > 0, got 0"),
        (lambda: GhostNet(width="1"), "width must be a number > 0, got '1'"),
        (lambda: SpeechUNet(mask_activation="sigmoid"), "mask_activation must be 'tanh' or None, got 'sigmoid'"),
        (lambda: FourierINR(num_fourier=-1), "num_fourier must be an int >= 0, got -1"),
        (lambda: FourierINR(scale=0.0), "scale must be a number > 0, got 0.0"),
        (lambda: FourierINR(hidden=0), "hidden must be an int >= 1, got 0"),
        (lambda: FourierINR(depth=0), "depth must be an int >= 1, got 0"),
        (lambda: FourierINR(out_features=True), "out_features must be an int >= 1, got True"),
        (lambda: FourierINR(cond_features=-2), "cond_features must be an int >= 0, got -2"),
        (lambda: SmallCNN(num_classes=-1), "num_classes must be an int >= 1, got -1"),
        (lambda: SmallCNN(in_channels=0), "in_channels must be an int >= 1, got 0"),
        (lambda: coords(0, 3), "h must be an int >= 1, got 0"),
        (lambda: coords(3, 2.5), "w must be an int >= 1, got 2.5"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "model,x,match",
    [
        (GhostNet(), torch.randn(2, 1, 32, 32), r"x must be \(B, 3, H, W\), got shape \(2, 1, 32, 32\)"),
        (GhostNet(), torch.randn(3, 32, 32), r"x must be \(B, 3, H, W\), got shape \(3, 32, 32\)"),
        (SpeechUNet(), torch.randn(2, 3, 4, 9), r"x must be \(B, 2, T, F\), got shape \(2, 3, 4, 9\)"),
        (FourierINR(), torch.randn(4, 3), r"coordinates must have 2 values in their last dim, got shape \(4, 3\)"),
        (SmallCNN(), torch.randn(2, 3, 8, 8), r"x must be \(B, 1, H, W\) with H, W >= 2, got shape \(2, 3, 8, 8\)"),
        (SmallCNN(), torch.randn(2, 1, 1, 8), r"x must be \(B, 1, H, W\) with H, W >= 2, got shape \(2, 1, 1, 8\)"),
    ],
)
def test_bad_inputs_raise(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x)


def test_apply_complex_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"spec must be \(B, 2, T, F\), got shape \(2, 3, 4, 5\)"):
        apply_complex_mask(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"mask shape \(2, 2, 4, 4\) differs from spec shape \(2, 2, 4, 5\)"):
        apply_complex_mask(torch.randn(2, 2, 4, 5), torch.randn(2, 2, 4, 4))
