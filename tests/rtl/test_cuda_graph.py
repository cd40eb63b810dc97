"""A converted model's forward and backward captured in one CUDA graph (GPU only): replays with new inputs and a new
routing match eager, and masks edited after capture neither crash a replay nor go unnoticed (the layout cache keeps
the captured layout alive and warns on the first recompile)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import rtl
import rtl_kernels as rk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def _model(tickets):
    torch.manual_seed(0)
    model = rtl.convert_(_Net(), tickets).cuda()
    with torch.no_grad():
        for _, layer in rtl.routed_modules(model):
            layer.weight_masks.bernoulli_(0.4)
    return model


def _step(routed, x, route):
    out = routed(x, route)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("backend", ["triton"])
def test_forward_and_backward_capture_and_replay_new_routes(backend, monkeypatch):
    if rk.unavailable_reasons(torch.device("cuda"), torch.float32).get(backend):
        pytest.skip(rk.unavailable_reasons(torch.device("cuda"), torch.float32)[backend])
    monkeypatch.setenv("RTL_KERNELS_SYNC_CHECKS", "0")
    rk.release_captured_layouts()
    tickets, batch = 4, 24
    model = _model(tickets)
    eager = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    static_x = torch.randn(batch, 8, 12, 12, device="cuda", generator=gen)
    static_route = torch.randint(0, tickets, (batch,), device="cuda", generator=gen)
    with rk.set_backend(backend):
        routed = rtl.RoutedModel(model).eval()  # eval: BatchNorm's running statistics stay fixed across replays
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: compiles kernels and layouts
            for _ in range(2):
                model.zero_grad(set_to_none=False)
                _step(routed, static_x, static_route)
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a host sync anywhere in forward or backward fails the capture
            static_out = _step(routed, static_x, static_route)
        assert rk.layout_cache_stats()["pinned"] > 0

        eager_routed = rtl.RoutedModel(eager).eval()
        for replay in range(3):
            x = torch.randn(batch, 8, 12, 12, device="cuda", generator=gen)
            route = torch.randint(0, tickets, (batch,), device="cuda", generator=gen)
            if replay == 2:
                route[route == 1] = 2  # a ticket without rows
            static_x.copy_(x)
            static_route.copy_(route)
            for p in model.parameters():
                p.grad.zero_()
            graph.replay()
            eager.zero_grad(set_to_none=True)
            want = _step(eager_routed, x, route)
            torch.testing.assert_close(static_out, want, rtol=2e-3, atol=2e-3)
            for (_, a), (_, b) in zip(rtl.routed_modules(model), rtl.routed_modules(eager)):
                torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=2e-3, atol=2e-3)

        # masks edited after capture: replays keep the captured masks (their layout is alive) and the next eager call
        # says the graph must be captured again
        before = static_out.clone()
        with torch.no_grad():
            for _, layer in rtl.routed_modules(model):
                layer.weight_masks.logical_not_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, before)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                routed(static_x, static_route)
        assert any("capture the graph again" in str(w.message) for w in caught)
    del graph
    assert rk.release_captured_layouts() > 0
