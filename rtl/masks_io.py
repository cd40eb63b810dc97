"""Saving and loading ticket masks: bit-packed files that ``torch.load(path, weights_only=True)`` reads safely.

A mask file holds, for every routed layer, the bool masks (T, *weight.shape) packed 8 bits per byte, their shape,
the number of tickets T, a format version and an optional json-serialisable config dict (the run's settings). It
holds only tensors, strings, ints, lists and dicts, so loading it never runs code. Files are written atomically
(temporary file in the same folder, then ``os.replace``): an interrupted save leaves the previous file intact.

This module also holds the private helpers the diagnostics and metrics share to gather masks from either a model
(every submodule with a bool buffer ``weight_masks``) or a plain dict {layer name: bool tensor (T, ...)}.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .state_io import atomic_save

__all__ = ["MaskLoadResult", "collect_masks", "load_masks", "load_masks_", "save_masks"]

# Written into every file; load_masks refuses anything else, so foreign pickles and future layouts fail loudly.
_FORMAT = "rtl.masks"
_VERSION = 1
_SUPPORTED_VERSIONS = (1,)
# Little-endian bit order inside each byte: bit i of the flattened mask lands in byte i // 8 at bit i % 8.
_BITORDER = "little"


# -- gathering masks (shared with rtl.diagnostics and rtl.metrics) ---------------------------------------------------
def _routed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: module} for every submodule holding a tensor ``weight_masks``, in ``named_modules()`` order.

    Duck-typed on the buffer rather than on rtl.nn classes so that any module following the routed-layer contract
    counts, and so this module does not depend on rtl.nn.
    """
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight_masks", None), Tensor)}


def collect_masks(model_or_masks, arg: str = "model_or_masks") -> Dict[str, Tensor]:
    """{layer name: bool masks (T, ...)} from a model or a dict, checked: bool, at least 2-D, one T for all layers.

    Args:
        model_or_masks: an nn.Module with routed layers, or a mapping {layer name: bool tensor (T, ...)}.
        arg: the argument name used in error messages.

    Returns:
        An ordered dict of the mask tensors themselves (not copies).
    """
    if isinstance(model_or_masks, nn.Module):
        layers = _routed_layers(model_or_masks)
        if not layers:
            raise ValueError(
                f"{arg}: the model has no routed layers (no submodule holds a weight_masks buffer); "
                "convert it first with rtl.convert_(model, num_tickets)"
            )
        masks = {name: m.weight_masks for name, m in layers.items()}
    elif isinstance(model_or_masks, Mapping):
        if len(model_or_masks) == 0:
            raise ValueError(f"{arg}: the mask dict is empty")
        masks = {}
        for name, mask in model_or_masks.items():
            if not isinstance(name, str):
                raise TypeError(f"{arg}: layer names must be str, got {name!r}")
            if not isinstance(mask, Tensor):
                raise TypeError(f"{arg}: masks of layer {name!r} must be a bool tensor, got {type(mask).__name__}")
            masks[name] = mask
    else:
        raise TypeError(
            f"{arg} must be an nn.Module or a dict {{layer name: bool tensor (T, ...)}}, "
            f"got {type(model_or_masks).__name__}"
        )
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise TypeError(f"{arg}: masks of layer {name!r} must be bool, got {mask.dtype}")
        if mask.dim() < 2:
            raise ValueError(
                f"{arg}: masks of layer {name!r} must be (T, *weight.shape), got shape {tuple(mask.shape)}"
            )
    counts = {name: mask.shape[0] for name, mask in masks.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{arg}: layers disagree on the number of tickets T: {counts}")
    if next(iter(counts.values())) < 1:
        raise ValueError(f"{arg}: masks hold no ticket (T = 0)")
    return masks


# -- save / load -----------------------------------------------------------------------------------------------------
def _pack(mask: Tensor) -> Tensor:
    """uint8 (ceil(numel / 8),) holding the flattened bool mask 8 bits per byte."""
    bits = mask.detach().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, bitorder=_BITORDER))


def _unpack(packed: Tensor, shape: List[int]) -> Tensor:
    """The bool mask of ``shape`` from its packed bytes."""
    count = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=count, bitorder=_BITORDER)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def save_masks(model_or_masks, path: Union[str, os.PathLike], config: Optional[dict] = None) -> None:
    """Write every layer's ticket masks, bit-packed, with their shapes, T and ``config``, atomically to ``path``.

    Args:
        model_or_masks: a model with routed layers (its ``weight_masks`` buffers are saved) or a dict
            {layer name: bool tensor (T, *weight.shape)}; all layers share one T.
        path: the file to write (replaced atomically if it exists).
        config: an optional json-serialisable dict saved beside the masks (e.g. the pruning settings). It goes
            through json, so tuples come back as lists.

    Returns:
        None.

    Example:
        >>> masks = {"fc": torch.rand(3, 5, 7) < 0.5}
        >>> save_masks(masks, "tickets.pt", config={"sparsity": 0.5})
        >>> loaded, config = load_masks("tickets.pt")
        >>> torch.equal(loaded["fc"], masks["fc"]), config
        (True, {'sparsity': 0.5})
    """
    masks = collect_masks(model_or_masks)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    try:
        # Stored as json text: weights_only loading accepts it, and the caller gets back exactly what json gives.
        config_json = json.dumps(config if config is not None else {}, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be json-serialisable: {e}") from e
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "num_tickets": int(next(iter(masks.values())).shape[0]),
        "layers": {
            name: {"shape": [int(s) for s in mask.shape], "packed": _pack(mask)} for name, mask in masks.items()
        },
        "config_json": config_json,
    }
    atomic_save(payload, os.fspath(path))


def load_masks(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a file written by :func:`save_masks` (with ``weights_only=True``): the masks and the config.

    Args:
        path: the mask file.

    Returns:
        (masks, config): masks is a dict {layer name: bool tensor (T, *weight.shape)} on the CPU, in the saved
        order; config is the saved dict ({} when none was given).

    Example:
        >>> masks, config = load_masks("tickets.pt")
        >>> {name: tuple(m.shape) for name, m in masks.items()}
        {'fc': (3, 5, 7)}
    """
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # weights_only refusals and corrupt archives come as several exception types
        raise ValueError(
            f"{os.fspath(path)!r} is not an rtl mask file (torch.load with weights_only=True failed: "
            f"{type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not an rtl mask file (no format tag {_FORMAT!r}); "
            "write mask files with rtl.masks_io.save_masks"
        )
    version = payload.get("version")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(
            f"{os.fspath(path)!r} has rtl mask format version {version!r}; this rtl reads versions "
            f"{list(_SUPPORTED_VERSIONS)}: upgrade rtl to read it"
        )
    num_tickets = payload["num_tickets"]
    masks = {}
    for name, entry in payload["layers"].items():
        shape, packed = list(entry["shape"]), entry["packed"]
        expected = -(-math.prod(shape) // 8)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected or shape[0] != num_tickets:
            raise ValueError(
                f"{os.fspath(path)!r} is corrupt: layer {name!r} (shape {shape}) holds "
                f"{packed.numel()} {packed.dtype} bytes, expected {expected} uint8 bytes and "
                f"T = {num_tickets}"
            )
        masks[name] = _unpack(packed, shape)
    return masks, json.loads(payload["config_json"])


class MaskLoadResult(NamedTuple):
    """What :func:`load_masks_` did: layers the file lacked, layers the model lacked, and the saved config."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    config: Dict[str, Any]


def load_masks_(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> MaskLoadResult:
    """Copy the masks saved at ``path`` into ``model``'s ``weight_masks`` buffers, in place.

    Everything is checked before anything is copied, so a failed load leaves the model unchanged. In-place copies
    bump the buffers' versions, so the kernels recompile their cached layouts.

    Args:
        model: a model with routed layers, named as when the masks were saved.
        path: a file written by :func:`save_masks`.
        strict: if True, a layer in the model but not in the file (missing) or in the file but not in the model
            (unexpected) raises; if False they are skipped and listed in the result. A shape mismatch (including
            a different T) always raises.

    Returns:
        MaskLoadResult(missing_keys, unexpected_keys, config).

    Example:
        >>> save_masks(model, "tickets.pt")
        >>> result = load_masks_(other_model, "tickets.pt")
        >>> result.missing_keys, result.unexpected_keys
        ([], [])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    collect_masks(model, arg="model")  # checks: routed layers present, bool, one T
    layers = _routed_layers(model)
    masks, config = load_masks(path)
    missing = [name for name in layers if name not in masks]
    unexpected = [name for name in masks if name not in layers]
    if strict and (missing or unexpected):
        raise ValueError(
            f"masks in {os.fspath(path)!r} do not match the model's routed layers: missing layers "
            f"{missing}, unexpected layers {unexpected} (pass strict=False to load the common ones)"
        )
    for name, mask in masks.items():
        if name in layers and tuple(layers[name].weight_masks.shape) != tuple(mask.shape):
            raise ValueError(
                f"layer {name!r}: saved masks have shape {tuple(mask.shape)} but the model's "
                f"weight_masks have shape {tuple(layers[name].weight_masks.shape)}"
            )
    with torch.no_grad():
        for name, mask in masks.items():
            if name in layers:
                target = layers[name].weight_masks
                target.copy_(mask.to(device=target.device))
    return MaskLoadResult(missing, unexpected, config)
