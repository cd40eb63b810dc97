"""torch.compile of a converted model: the routed forward and backward trace as one graph (fullgraph=True) and
match eager, and a bad route is still refused inside the compiled call."""

import copy

import pytest
import torch

import rtl

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def converted_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    rtl.convert_(model, 4)
    with torch.no_grad():
        for _, layer in rtl.routed_modules(model):
            layer.weight_masks.bernoulli_(0.3)
    return model


def _weight_grads(model):
    return [layer.weight.grad for _, layer in rtl.routed_modules(model)]


def test_converted_resnet18_compiles_fullgraph_and_matches_eager(converted_resnet18):
    eager, compiled_model = copy.deepcopy(converted_resnet18), copy.deepcopy(converted_resnet18)
    x = torch.randn(6, 3, 32, 32)
    route = torch.tensor([0, 3, 1, 3, 2, 0])

    expected = rtl.RoutedModel(eager)(x, route)
    expected.square().mean().backward()
    compiled = torch.compile(rtl.RoutedModel(compiled_model), fullgraph=True)
    out = compiled(x, route)
    out.square().mean().backward()

    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(_weight_grads(compiled_model), _weight_grads(eager)):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # a new route, and one with a ticket missing, reuse the graph (no recompile) and stay exact
    for other in (torch.tensor([2, 2, 1, 0, 3, 1]), torch.tensor([1, 1, 1, 1, 1, 1])):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, other), rtl.RoutedModel(eager)(x, other), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="route holds ticket id 7, outside"):
        compiled(x, torch.tensor([0, 1, 2, 7, 0, 1]))


def test_converted_model_has_no_graph_break(converted_resnet18):
    explanation = torch._dynamo.explain(rtl.RoutedModel(copy.deepcopy(converted_resnet18)))(
        torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
