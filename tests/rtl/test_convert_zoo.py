"""Converted models from the zoo: the routed model computes, for every ticket, what `extract_ticket`'s plain model
computes, or the routed call refuses the model and names the layer whose masks it would skip."""

import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import rtl
from rtl.models import SpeechUNet

T = 3


def _small_swin():
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=10
    )


ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "googlenet_with_aux_heads": (
        lambda: torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False),
        (3, 64, 64),
    ),
    "vit": (
        lambda: VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
        ),
        (3, 32, 32),
    ),
    "lraspp_segmentation": (
        lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3
        ),
        (3, 64, 64),
    ),
    "speech_unet_transposed_convs": (lambda: SpeechUNet(), (2, 16, 64)),
}


def _randomise_masks(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in rtl.nn.routed_modules(model):
            m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < 0.6)


def _output(y):
    return y["out"] if isinstance(y, dict) else y


def _check_equal_to_extracted(model, shape, seed=0):
    model.eval()
    _randomise_masks(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((2 * T,) + shape, generator=g)
    route = torch.arange(2 * T) % T
    with torch.no_grad():
        routed = _output(rtl.RoutedModel(model)(x, route))
        for t in range(T):
            plain = rtl.extract_ticket(model, t).eval()
            want = _output(plain(x[route == t]))
            got = routed[route == t]
            scale = want.abs().max().clamp_min(1e-6)
            assert (got - want).abs().max() / scale < 1e-4, t


@pytest.mark.parametrize("name", list(ZOO))
def test_converted_model_equals_its_extracted_tickets(name):
    build, shape = ZOO[name]
    torch.manual_seed(0)
    model = rtl.convert_(build(), T)
    assert any(True for _ in rtl.nn.routed_modules(model))
    _check_equal_to_extracted(model, shape)


def test_swin_is_refused_with_the_layer_named_then_runs_with_those_layers_dense():
    torch.manual_seed(0)
    model = rtl.convert_(_small_swin(), T)
    _randomise_masks(model, 0)
    with pytest.raises(RuntimeError, match=r"layer 'features\.1\.0\.attn\.qkv' .*read outside its own forward"):
        rtl.RoutedModel(model.eval())(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    # the layers are still usable afterwards (the route is detached even though the call raised)
    assert all(m._route_state is None for _, m in rtl.nn.routed_modules(model))
    functional = lambda name, m: not (name.endswith("attn.qkv") or name.endswith("attn.proj"))
    kept_dense = rtl.convert_(_small_swin(), T, filter_fn=functional)
    _check_equal_to_extracted(kept_dense, (3, 32, 32))


def test_full_swin_t_is_refused():
    model = rtl.convert_(torchvision.models.swin_t(), T).eval()
    names = [n for n, _ in rtl.nn.routed_modules(model)]
    assert len(names) == 53 and sum(n.endswith(("attn.qkv", "attn.proj")) for n in names) == 24
    with pytest.raises(RuntimeError, match=r"attn\.qkv"):
        with torch.no_grad():
            rtl.RoutedModel(model)(torch.randn(1, 3, 64, 64), torch.tensor([2]))


def test_reading_a_weight_outside_a_routed_call_or_through_parameters_is_allowed():
    model = rtl.convert_(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), T)
    assert model[0].weight.shape == (3, 4)  # no route attached: plain attribute access
    with rtl.use_route(model, torch.tensor([1, 2])):
        y = model(torch.randn(2, 4))
        penalty = sum(p.square().sum() for n, p in model.named_parameters() if n.endswith("weight"))
        with pytest.raises(RuntimeError, match=r"layer '2' \(RoutedSparseLinear\)"):
            model[2].weight
    (y.sum() + penalty).backward()
    assert model[0].weight.grad is not None
