"""The layout cache itself (rtl_kernels.layout_cache): one compile per kind and mask version, a recompile after any
in-place edit, none after a write through ``.data`` until the cache is cleared, and no entry outliving its masks.
Every backend's use of it is part of the linear contract (test_in_place_mask_and_weight_edits_are_seen)."""

import gc

import torch

from rtl_kernels import layout_cache


def _compiler(calls):
    def compile_fn(masks):
        calls.append(masks._version)
        return masks.sum().item()  # a stand-in layout that depends on the masks' values

    return compile_fn


def test_one_compile_per_kind_and_version():
    masks = torch.rand(3, 4, 5) > 0.5
    calls = []
    first = layout_cache.get_layout("kind_a", masks, _compiler(calls))
    assert layout_cache.get_layout("kind_a", masks, _compiler(calls)) == first
    assert len(calls) == 1
    layout_cache.get_layout("kind_b", masks, _compiler(calls))  # another kind of layout compiles on its own
    assert len(calls) == 2
    masks[0, 0, 0] = not bool(masks[0, 0, 0])  # an in-place edit bumps the version
    edited = layout_cache.get_layout("kind_a", masks, _compiler(calls))
    assert len(calls) == 3 and edited == int(masks.sum())


def test_writes_through_data_need_a_clear():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    calls = []
    assert layout_cache.get_layout("k", masks, _compiler(calls)) == 0
    masks.data[0] = True  # bypasses the version counter: the cache cannot see it
    assert layout_cache.get_layout("k", masks, _compiler(calls)) == 0 and len(calls) == 1
    layout_cache.clear_layout_cache()
    assert layout_cache.get_layout("k", masks, _compiler(calls)) == 9 and len(calls) == 2


def test_an_entry_dies_with_its_masks_and_a_reused_id_never_hits():
    calls = []
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    layout_cache.get_layout("k", masks, _compiler(calls))
    entries = layout_cache.layout_cache_stats()["entries"]
    del masks
    gc.collect()
    assert layout_cache.layout_cache_stats()["entries"] == entries - 1
    fresh = torch.zeros(2, 4, 4, dtype=torch.bool)  # may reuse the freed tensor's id and memory
    assert layout_cache.get_layout("k", fresh, _compiler(calls)) == 0 and len(calls) == 2


class _Layout:
    """A layout object that can be weakly referenced, to see when the cache lets it go."""

    def __init__(self, masks):
        self.count = int(masks.sum())


def test_layouts_read_during_graph_capture_outlive_mask_edits_until_released(monkeypatch):
    # a CUDA graph replays the addresses it captured: a layout read under capture must stay alive after its masks
    # change or die, and the first recompile says the graph replays the old masks (capture is simulated: no GPU here)
    import warnings
    import weakref

    layout_cache.release_captured_layouts()
    masks = torch.rand(2, 3, 4) > 0.5
    monkeypatch.setattr(layout_cache, "_capturing", lambda m: True)
    captured = weakref.ref(layout_cache.get_layout("kind_g", masks, _Layout))
    assert layout_cache.layout_cache_stats()["pinned"] == 1
    monkeypatch.setattr(layout_cache, "_capturing", lambda m: False)
    masks.logical_not_()  # the user edits the masks after capture
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = layout_cache.get_layout("kind_g", masks, _Layout)
        assert fresh is not captured() and fresh.count == int(masks.sum())  # eager calls see the edit
        layout_cache.get_layout("kind_g", masks.clone(), _Layout)  # unrelated masks: no warning
        masks[0, 0, 0] = not bool(masks[0, 0, 0])
        layout_cache.get_layout("kind_g", masks, _Layout)  # warned once per capture
    assert [str(w.message)[:44] for w in caught] == ["routed masks changed after a CUDA graph capt"]
    del masks, fresh
    gc.collect()
    assert captured() is not None  # pinned: the graph's layout is alive though its masks are gone
    assert layout_cache.release_captured_layouts() == 1
    gc.collect()
    assert captured() is None
    assert layout_cache.layout_cache_stats()["pinned"] == 0


def test_layouts_outside_capture_are_not_pinned():
    layout_cache.release_captured_layouts()
    masks = torch.rand(2, 3, 4) > 0.5
    ref = __import__("weakref").ref(layout_cache.get_layout("kind_h", masks, _Layout))
    del masks
    gc.collect()
    assert ref() is None and layout_cache.layout_cache_stats()["pinned"] == 0
