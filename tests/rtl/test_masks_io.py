"""rtl.masks_io: bit-packed mask files (round trip, size, safe loading, atomic writes, errors) and mask gathering."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
from torch import nn

from rtl.masks_io import collect_masks, load_masks, load_masks_, save_masks
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear

# Odd sizes (none a multiple of 8 except where noted) so the packed tail byte is exercised.
SHAPES = [(1, 1, 1), (3, 5, 7), (2, 13), (4, 3, 3, 5, 5), (5, 8, 8)]


def _tiny_model(num_tickets: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(4 * 8 * 8, 10, num_tickets),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if hasattr(m, "weight_masks"):
                m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < 0.4)
    return model


def _random_masks(shapes, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.rand(shape, generator=g) < density for i, shape in enumerate(shapes)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.37, 1.0])
def test_round_trip_bit_exact(tmp_path, shape, density):
    masks = {"a": torch.rand(shape, generator=torch.Generator().manual_seed(1)) < density}
    path = tmp_path / "m.pt"
    save_masks(masks, path)
    loaded, config = load_masks(path)
    assert list(loaded) == ["a"]
    assert loaded["a"].dtype == torch.bool and loaded["a"].shape == shape
    assert torch.equal(loaded["a"], masks["a"])
    assert config == {}


def test_round_trip_many_layers_keeps_order(tmp_path):
    masks = _random_masks([(3, 11, 9), (3, 1), (3, 4, 3, 3)], seed=2)
    masks = {"z.last": masks["layer0"], "a.first": masks["layer1"], "m": masks["layer2"]}
    save_masks(masks, str(tmp_path / "m.pt"))
    loaded, _ = load_masks(str(tmp_path / "m.pt"))
    assert list(loaded) == ["z.last", "a.first", "m"]
    for name in masks:
        assert torch.equal(loaded[name], masks[name])


def test_file_is_about_one_eighth_of_bool_bytes(tmp_path):
    masks = _random_masks([(4, 301, 257), (4, 99, 3, 3)], seed=3)
    path = tmp_path / "m.pt"
    save_masks(masks, path)
    bool_bytes = sum(m.numel() for m in masks.values())
    size = os.path.getsize(path)
    # Packed payload is bool_bytes / 8; the archive adds a few KB of fixed overhead.
    assert size < bool_bytes / 8 + 8192
    assert size > bool_bytes / 8


def test_loads_with_weights_only(tmp_path):
    path = tmp_path / "m.pt"
    save_masks(_random_masks([(2, 9, 5)]), path, config={"k": 1})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "rtl.masks" and payload["version"] == 1 and payload["num_tickets"] == 2
    assert payload["layers"]["layer0"]["packed"].dtype == torch.uint8
    assert payload["layers"]["layer0"]["packed"].numel() == math.ceil(2 * 9 * 5 / 8)


def test_config_round_trip(tmp_path):
    config = {
        "sparsity": 0.75,
        "rounds": 23,
        "name": "cifar10",
        "tickets": [0, 1, 2],
        "nested": {"a": None, "b": True},
        "pair": (1, 2),
    }
    path = tmp_path / "m.pt"
    save_masks(_random_masks([(3, 7)]), path, config=config)
    _, loaded = load_masks(path)
    expected = dict(config, pair=[1, 2])  # json turns tuples into lists
    assert loaded == expected


def test_config_errors(tmp_path):
    with pytest.raises(TypeError, match="config must be a dict"):
        save_masks(_random_masks([(2, 3)]), tmp_path / "m.pt", config=[1, 2])
    with pytest.raises(TypeError, match="config must be json-serialisable"):
        save_masks(_random_masks([(2, 3)]), tmp_path / "m.pt", config={"x": object()})
    assert not os.listdir(tmp_path)  # nothing written, not even a temporary file


def test_model_round_trip_in_place(tmp_path):
    src, dst = _tiny_model(3, seed=0), _tiny_model(3, seed=1)
    path = tmp_path / "m.pt"
    save_masks(src, path, config={"seed": 0})
    target = dst[3].weight_masks
    version = target._version
    result = load_masks_(dst, path)
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.config == {"seed": 0}
    assert dst[3].weight_masks is target and target._version > version  # in place: kernels see the edit
    for i in (0, 3):
        assert torch.equal(dst[i].weight_masks, src[i].weight_masks)


def test_load_into_model_errors_and_leaves_model_unchanged(tmp_path):
    src = _tiny_model(3, seed=0)
    path = tmp_path / "m.pt"
    save_masks(src, path)

    other_t = _tiny_model(2, seed=1)
    before = [m.clone() for m in (other_t[0].weight_masks, other_t[3].weight_masks)]
    with pytest.raises(
        ValueError,
        match=r"layer '0': saved masks have shape \(3, 4, 1, 3, 3\) but the model's "
        r"weight_masks have shape \(2, 4, 1, 3, 3\)",
    ):
        load_masks_(other_t, path)
    assert torch.equal(other_t[0].weight_masks, before[0]) and torch.equal(other_t[3].weight_masks, before[1])

    bigger = nn.Sequential(_tiny_model(3, seed=2), RoutedSparseLinear(10, 5, 3))
    with pytest.raises(ValueError, match=r"missing layers \['0.0', '0.3', '1'\], unexpected layers \['0', '3'\]"):
        load_masks_(bigger, path)

    extra = nn.Sequential(*list(_tiny_model(3, seed=2)), RoutedSparseLinear(10, 5, 3))
    with pytest.raises(ValueError, match=r"missing layers \['4'\], unexpected layers \[\]"):
        load_masks_(extra, path)
    result = load_masks_(extra, path, strict=False)
    assert result.missing_keys == ["4"] and result.unexpected_keys == []
    assert torch.equal(extra[3].weight_masks, src[3].weight_masks)

    with pytest.raises(ValueError, match="model has no routed layers"):
        load_masks_(nn.Linear(3, 4), path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_masks_({"0": src[0].weight_masks}, path)


def test_shape_mismatch_same_t(tmp_path):
    path = tmp_path / "m.pt"
    save_masks({"0": torch.rand(2, 5, 3) < 0.5}, path)
    model = nn.Sequential(RoutedSparseLinear(4, 5, 2))
    with pytest.raises(ValueError, match=r"layer '0': saved masks have shape \(2, 5, 3\)"):
        load_masks_(model, path)


def test_foreign_files(tmp_path):
    plain = tmp_path / "state.pt"
    torch.save({"weight": torch.randn(3, 3)}, plain)
    with pytest.raises(ValueError, match="is not an rtl mask file \\(no format tag 'rtl.masks'\\)"):
        load_masks(plain)

    class Evil:
        def __reduce__(self):
            return (print, ("should never run",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "rtl.masks", "x": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="is not an rtl mask file \\(torch.load with weights_only=True failed"):
        load_masks(evil)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(257))
    with pytest.raises(ValueError, match="is not an rtl mask file"):
        load_masks(junk)

    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "absent.pt")


def test_unknown_version_and_corrupt_payload(tmp_path):
    path = tmp_path / "m.pt"
    save_masks(_random_masks([(2, 9)]), path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"has rtl mask format version 99; this rtl reads versions \[1\]"):
        load_masks(path)

    payload["version"] = 1
    payload["layers"]["layer0"]["packed"] = payload["layers"]["layer0"]["packed"][:-1]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"is corrupt: layer 'layer0' \(shape \[2, 9\]\) holds 2"):
        load_masks(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    old = _random_masks([(2, 5, 5)], seed=4)
    save_masks(old, path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_masks(_random_masks([(2, 5, 5)], seed=5), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]  # the temporary file is gone
    loaded, _ = load_masks(path)
    assert torch.equal(loaded["layer0"], old["layer0"])


def test_overwrite_existing(tmp_path):
    path = tmp_path / "m.pt"
    save_masks(_random_masks([(2, 5)], seed=6), path)
    new = _random_masks([(3, 4, 4)], seed=7)
    save_masks(new, path)
    loaded, _ = load_masks(path)
    assert torch.equal(loaded["layer0"], new["layer0"])


def test_collect_masks_checks():
    model = _tiny_model(2)
    masks = collect_masks(model)
    assert list(masks) == ["0", "3"] and masks["3"] is model[3].weight_masks
    with pytest.raises(ValueError, match="model_or_masks: the model has no routed layers"):
        collect_masks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="the mask dict is empty"):
        collect_masks({})
    with pytest.raises(TypeError, match="must be an nn.Module or a dict"):
        collect_masks([torch.ones(2, 3, dtype=torch.bool)])
    with pytest.raises(TypeError, match="layer names must be str, got 3"):
        collect_masks({3: torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks of layer 'a' must be a bool tensor, got list"):
        collect_masks({"a": [[True]]})
    with pytest.raises(TypeError, match="masks of layer 'a' must be bool, got torch.float32"):
        collect_masks({"a": torch.rand(2, 3)})
    with pytest.raises(ValueError, match=r"masks of layer 'a' must be \(T, \*weight.shape\), got shape \(3,\)"):
        collect_masks({"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"layers disagree on the number of tickets T: \{'a': 2, 'b': 3\}"):
        collect_masks({"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks hold no ticket \(T = 0\)"):
        collect_masks({"a": torch.ones(0, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="model_or_masks: layers disagree"):
        collect_masks(nn.Sequential(RoutedSparseLinear(2, 2, 2), RoutedSparseLinear(2, 2, 3)))
