"""Backend choice: names, availability, auto fallback, the per-thread choice and the process default, lean import."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import rtl_kernels as rk
from rtl_kernels import _extension

HAS_CPU_EXT = _extension.load("_C")[0] is not None
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_EXT else [])
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")


@needs_cpu_ext
def test_auto_falls_back_to_reference_with_one_warning(linear_case, linear_oracle):
    from rtl_kernels import backends

    backends._warned.clear()
    x, w, masks, route, b = linear_case(9, 5, 6, 3, 0.5, seed=13, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = rk.routed_masked_linear(x, w, masks, route, b)
        rk.routed_masked_linear(x, w, masks, route, b)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and "'reference'" in messages[0] and "float32 only" in messages[0]
    torch.testing.assert_close(y1, linear_oracle(x, w, masks, route, b).y)


def test_unknown_and_unavailable_backends_raise_clearly(linear_case):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rk.set_backend("fast")
    x, w, masks, route, b = linear_case(6, 4, 5, 3, 0.5, seed=41)
    with rk.set_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run.*reference: available"):
            rk.routed_masked_linear(x, w, masks, route, b)
    if HAS_CPU_EXT:
        with rk.set_backend("cpu"):
            with pytest.raises(RuntimeError, match="float32 only"):
                rk.routed_masked_linear(x.double(), w.double(), masks, route, b.double())


def test_set_backend_is_a_context_manager_and_env_sets_default():
    before = rk.get_backend()
    with rk.set_backend("reference"):
        assert rk.get_backend() == "reference"
    assert rk.get_backend() == before
    code = "import rtl_kernels as rk; print(rk.get_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, RTL_BACKEND="reference"), capture_output=True, text=True
    )
    assert out.stdout.strip() == "reference", out.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, RTL_BACKEND="nope"), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown backend 'nope'" in bad.stderr


def test_available_backends_and_info():
    names = rk.available_backends("cpu")
    assert "reference" in names and ("cpu" in names) == HAS_CPU_EXT
    from rtl_kernels.info import report

    text = report()
    assert "reference" in text and "torch" in text


@pytest.mark.skipif(os.environ.get("RTL_BUILD_CPU") != "1", reason="only where the build promised the extension")
def test_cpu_extension_was_built():
    assert HAS_CPU_EXT, _extension.load("_C")[1]


def test_import_is_lean():
    code = (
        "import sys, rtl_kernels\n"
        "bad = [m for m in ('triton', 'rtl', 'rtl_kernels._C_cuda') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_backend_choice_belongs_to_the_thread_that_made_it():
    before = rk.get_backend()
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen = {}
    errors = []

    def thread_a():
        try:
            with rk.set_backend("reference"):
                a_entered.set()
                b_entered.wait(10)
                seen["a_inside_after_b_entered"] = rk.get_backend()
            a_exited.set()
            seen["a_after"] = rk.get_backend()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def thread_b():
        try:
            a_entered.wait(10)
            with rk.set_backend("cpu"):
                b_entered.set()
                a_exited.wait(10)  # A leaves its block while B is still inside its own
                seen["b_inside_after_a_exited"] = rk.get_backend()
            seen["b_after"] = rk.get_backend()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert seen == {
        "a_inside_after_b_entered": "reference",
        "a_after": before,
        "b_inside_after_a_exited": "cpu",
        "b_after": before,
    }
    assert rk.get_backend() == before


def test_plain_set_backend_stays_in_its_thread_and_default_is_process_wide():
    before = rk.get_backend()
    seen = {}

    def worker():
        rk.set_backend("reference")
        seen["worker"] = rk.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["worker"] == "reference" and rk.get_backend() == before
    try:
        rk.set_default_backend("reference")
        other = {}
        t = threading.Thread(target=lambda: other.setdefault("value", rk.get_backend()))
        t.start()
        t.join()
        assert other["value"] == "reference"
    finally:
        rk.set_default_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        rk.set_default_backend("fastest")


@pytest.mark.skipif(not HAS_CPU_EXT, reason="rtl_kernels._C was not built")
def test_backward_runs_on_the_backend_of_its_forward(linear_case):
    from rtl_kernels.backends.cpu import trace

    x, w, masks, route, b = linear_case(12, 7, 9, 3, 0.2)
    x.requires_grad_()
    with rk.set_backend("reference"):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    with rk.set_backend("cpu"), trace.record_calls() as calls:
        y.sum().backward()
    assert calls == []  # the reference backend ran the gradients: the cpu backend recorded nothing
    x.grad = None
    with rk.set_backend("cpu"):
        y = rk.routed_masked_linear(x, w, masks, route, b)
    with rk.set_backend("reference"), trace.record_calls() as calls:
        y.sum().backward()
    assert [c["op"] for c in calls] == ["linear_grad_input"]
