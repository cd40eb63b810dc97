"""The README's code examples run as written and compute what their comments say."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _check_convert_example(ns):
    import rtl

    model, routed, plain, x = ns["model"], ns["routed"], ns["plain"], ns["x"]
    assert torch.isfinite(ns["loss"])
    assert not any(True for _ in rtl.nn.routed_modules(plain))  # a plain torch model
    # every ticket kept its 50 % largest weights: half of each routed layer's weights, per ticket
    kept = sum(m.weight_masks.flatten(1).sum(1) for _, m in rtl.nn.routed_modules(model))
    total = sum(m.weight.numel() for _, m in rtl.nn.routed_modules(model))
    assert torch.all((kept.double() / total - 0.5).abs() < 1e-3)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), routed(x, route=torch.full((x.shape[0],), 3)), rtol=1e-4, atol=1e-4)


def _check_op_example(ns):
    y, weight, masks, route, N = ns["y"], ns["weight"], ns["masks"], ns["route"], ns["N"]
    assert y.shape == (2048, N)
    used = masks[route.unique()].any(0)
    assert weight.grad is not None and bool((weight.grad[~used] == 0).all())


# Each block is recognised by what it calls; a block without a check fails, so a new example gets one.
CHECKS = {"rtl.extract_ticket": _check_convert_example, "rk.routed_masked_linear": _check_op_example}


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs_and_computes_what_it_says(index):
    pytest.importorskip("torchvision")
    block = _python_blocks()[index]
    checks = [check for key, check in CHECKS.items() if key in block]
    assert checks, f"README block {index} has no check in tests/test_readme.py"
    torch.manual_seed(0)
    ns = {"__name__": "readme"}
    exec(compile(block, f"README.md block {index}", "exec"), ns)
    for check in checks:
        check(ns)
