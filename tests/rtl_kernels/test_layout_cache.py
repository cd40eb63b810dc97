"""The layout cache: masks compile once per version; in-place edits recompile; weights are never copied."""

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")


@needs_cpu_ext
def test_layout_cache_follows_in_place_mask_edits(linear_case, linear_oracle):
    x, w, masks, route, b = linear_case(40, 10, 12, 2, 0.3, seed=31)
    with rk.set_backend("cpu"):
        before = rk.layout_cache_stats()["compiles"]
        y1 = rk.routed_masked_linear(x, w, masks, route, b)
        compiles = rk.layout_cache_stats()["compiles"]
        assert compiles > before
        rk.routed_masked_linear(x, w, masks, route, b)
        assert rk.layout_cache_stats()["compiles"] == compiles, "an unchanged mask must hit the cache"
        masks[0, 3, :] = ~masks[0, 3, :]  # in-place edit: every layout of these masks compiles again
        y2 = rk.routed_masked_linear(x, w, masks, route, b)
        assert rk.layout_cache_stats()["compiles"] == compiles + (compiles - before)
    torch.testing.assert_close(y2.double(), linear_oracle(x, w, masks, route, b), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y1, y2)
    # weights are read through the layout, never copied: an in-place weight update is seen at once
    with torch.no_grad():
        w.mul_(2)
    with rk.set_backend("cpu"):
        y3 = rk.routed_masked_linear(x, w, masks, route, b)
    torch.testing.assert_close(y3.double(), linear_oracle(x, w, masks, route, b), rtol=1e-4, atol=1e-4)
