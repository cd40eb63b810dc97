"""No host synchronisation in the routed hot path on a GPU: the ops' route checks run on the device
(torch._assert_async) unless RTL_KERNELS_SYNC_CHECKS asks for clear errors, and a forward and backward of the
routed linear and conv run under CUDA's sync debug mode set to "error". On CPU: the two modes of the route check."""

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _checks


def test_sync_checks_follow_the_environment(monkeypatch):
    monkeypatch.setenv("RTL_KERNELS_SYNC_CHECKS", "1")
    assert _checks.sync_checks()
    monkeypatch.setenv("RTL_KERNELS_SYNC_CHECKS", "0")
    assert not _checks.sync_checks()
    # on CPU a bad id is a clear ValueError in either mode: reading a CPU tensor costs no device sync
    with pytest.raises(ValueError, match=r"ticket id 4, outside \[0, 3\)"):
        _checks.check_route_values(torch.tensor([0, 4, 1]), 3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_routed_ops_run_without_a_host_sync(backend, op, monkeypatch):
    if rk.unavailable_reasons(torch.device("cuda"), torch.float16).get(backend):
        pytest.skip(rk.unavailable_reasons(torch.device("cuda"), torch.float16)[backend])
    monkeypatch.setenv("RTL_KERNELS_SYNC_CHECKS", "0")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tickets, batch = 4, 64
    if op == "linear":
        x = torch.randn(batch, 256, device="cuda", dtype=torch.float16, generator=gen)
        weight = torch.randn(128, 256, device="cuda", dtype=torch.float16, requires_grad=True, generator=gen)
        call = rk.routed_masked_linear
    else:
        x = torch.randn(batch, 16, 8, 8, device="cuda", dtype=torch.float16, generator=gen)
        weight = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.float16, requires_grad=True, generator=gen)
        call = rk.routed_masked_conv2d
    masks = torch.rand((tickets, *weight.shape), device="cuda", generator=gen) > 0.7
    route = torch.randint(0, tickets, (batch,), device="cuda", generator=gen)
    with rk.set_backend(backend):
        call(x, weight, masks, route).float().sum().backward()  # warm-up: compiles kernels and layouts
        torch.cuda.synchronize()
        weight.grad = None
        grouping = rk.group_by_ticket(route, tickets)
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = call(x, weight, masks, route, grouping=grouping)
            y.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
