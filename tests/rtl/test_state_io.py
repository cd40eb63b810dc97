"""rtl.state_io: atomic writes keep the previous file on failure; RNG states round-trip, old layouts included."""

import random

import numpy as np
import pytest
import torch

from rtl.state_io import atomic_json, atomic_save, atomic_write, rng_state, set_rng_state


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic_save({"a": torch.arange(3)}, str(path))
    before = path.read_bytes()

    def half_then_fail(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), half_then_fail)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    atomic_json({"b": [1, 2]}, str(tmp_path / "x.json"))
    assert (tmp_path / "x.json").read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}'


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    atomic_save(rng_state(), str(tmp_path / "rng.pt"))
    first = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == first


def test_layouts_written_by_earlier_versions_still_restore():
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    state = rng_state(cuda=False)
    first = _draws()
    old = dict(state)
    old["numpy"] = {k if k != "cached" else "cached_gaussian": v for k, v in state["numpy"].items()}
    py = state["python"]
    old["python"] = [py["version"], list(py["state"].tolist()), py["gauss_next"]]  # a list round trip of getstate()
    set_rng_state(old)
    assert _draws() == first
