"""Conversion of existing models: torch layers swapped in place for routed layers, and tickets exported back."""

from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import nn

from .nn import ROUTED_TYPES, RoutedSparseModule, routed_modules

__all__ = ["convert_", "extract_ticket"]


def convert_(model: nn.Module, num_tickets: int, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None):
    """Swap every nn.Linear / nn.Conv2d / nn.ConvTranspose2d of ``model`` for its routed layer, in place.

    The routed layers share the original Parameter objects, so an optimizer built before conversion keeps
    updating them; with all-ones masks the converted model computes what the original did. Layers that are
    already routed are left alone, and so are subclasses of the torch layers (their forward may differ).

    Args:
        model: any model (e.g. a torchvision model); a bare layer is converted too and returned.
        num_tickets: T >= 1.
        filter_fn: ``filter_fn(name, module) -> bool`` chooses which layers to convert (names as
            ``named_modules`` gives them); e.g. keep the classifier dense as the paper does:
            ``lambda name, m: name != "fc"``.

    Returns:
        The model (the same object), or the routed layer when ``model`` itself is a convertible layer.

    Example:
        >>> model = rtl.convert_(torchvision.models.resnet18(), 8, filter_fn=lambda n, m: n != "fc")
    """
    if not isinstance(num_tickets, int) or isinstance(num_tickets, bool) or num_tickets < 1:
        raise ValueError(f"num_tickets must be an int >= 1, got {num_tickets!r}")
    if type(model) in ROUTED_TYPES and (filter_fn is None or filter_fn("", model)):
        return ROUTED_TYPES[type(model)].from_dense(model, num_tickets)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in ROUTED_TYPES and (filter_fn is None or filter_fn(full, child)):
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, ROUTED_TYPES[type(child)].from_dense(child, num_tickets))
    return model


def extract_ticket(model: nn.Module, ticket: int) -> nn.Module:
    """A plain torch copy of ``model`` computing ticket ``ticket``: routed layers become torch layers with W * M_t.

    The copy holds no routed layer and no masks, so it runs, exports and scripts like any torch model.

    Args:
        model: a model with routed layers (or a RoutedModel).
        ticket: in [0, T).

    Returns:
        A new model; ``model`` is untouched.
    """
    if isinstance(model, nn.Module) and hasattr(model, "model") and type(model).__name__ == "RoutedModel":
        model = model.model
    if isinstance(model, RoutedSparseModule):
        return model.to_dense(ticket)
    if not any(True for _ in routed_modules(model)):
        raise ValueError("the model has no routed layers")
    exported = copy.deepcopy(model)
    targets = []
    for name, module in exported.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, RoutedSparseModule):
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, child.to_dense(ticket))
    return exported
