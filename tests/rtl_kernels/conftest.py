"""Inputs shared by the rtl_kernels test files that need a small routed linear case and its float64 answer."""

import pytest
import torch


def _linear_case(batch, n, k, tickets, density, seed=0, dtype=torch.float32):
    """x (B, K), weight (N, K), masks (T, N, K), route (B,), bias (N,) drawn from one seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=gen, dtype=dtype)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    b = torch.randn(n, generator=gen, dtype=dtype)
    masks = torch.rand(tickets, n, k, generator=gen) < density
    route = torch.randint(0, tickets, (batch,), generator=gen)
    return x, w, masks, route, b


def _linear_oracle(x, weight, masks, route, bias):
    """float64 y (B, N) with y[i] = x[i] @ (W * M[route[i]]).T + b, one masked weight per row."""
    w = weight.double()[None] * masks[route.long()].double()
    return torch.einsum("bk,bnk->bn", x.double(), w) + bias.double()


@pytest.fixture
def linear_case():
    """``linear_case(batch, n, k, tickets, density, seed=0, dtype=float32) -> (x, weight, masks, route, bias)``."""
    return _linear_case


@pytest.fixture
def linear_oracle():
    """``linear_oracle(x, weight, masks, route, bias) -> y`` in float64."""
    return _linear_oracle
