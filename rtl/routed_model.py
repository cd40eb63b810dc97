"""Routing a whole model: one route (a ticket per sample) handed to every routed layer for one call.

No hooks and no in-place weight masking: the route is attached to the routed layers for the length of the call
and removed afterwards (also when the call raises), and every layer applies its own masks on the fly. While it is
attached, reading a routed layer's ``weight`` anywhere but in its own forward raises: a model that did so (a
functional on ``layer.weight``) would use the weight unmasked and silently differ from its tickets.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from torch import Tensor, nn

from .nn import RoutedSparseModule, RouteState, check_route, routed_modules

__all__ = ["RoutedModel", "model_num_tickets", "use_route"]


def model_num_tickets(model: nn.Module) -> int:
    """T shared by every routed layer of ``model``; ValueError if it has none or they disagree."""
    counts = {name: m.num_tickets for name, m in routed_modules(model)}
    if not counts:
        raise ValueError("the model has no routed layers: convert it first with rtl.convert_(model, num_tickets)")
    values = set(counts.values())
    if len(values) != 1:
        raise ValueError(f"routed layers disagree on num_tickets: {counts}")
    return values.pop()


@contextlib.contextmanager
def use_route(model: nn.Module, route, batch: Optional[int] = None) -> Iterator[Tensor]:
    """Route every routed layer of ``model`` by ``route`` inside the ``with`` block.

    Args:
        model: a model holding routed layers (after :func:`rtl.convert_` or built from :mod:`rtl.nn`).
        route (B,) int: one ticket per sample in [0, T). Layers that see B * n rows (tokens, positions) repeat each
            sample's ticket n times.
        batch: expected B, or None not to check.

    Yields:
        The validated route (B,) int64.

    Example:
        >>> with rtl.use_route(model, torch.tensor([0, 3, 1])):
        ...     logits = model(x)
    """
    named = list(routed_modules(model))
    layers: List[RoutedSparseModule] = [m for _, m in named]
    num_tickets = model_num_tickets(model)
    device = layers[0].weight_masks.device
    route = check_route(route, num_tickets, batch=batch, device=device)
    busy = [m for m in layers if m._route_state is not None]
    if busy:
        raise RuntimeError("the model is already being routed (nested use_route on the same layers)")
    state = RouteState(route, num_tickets, names={id(m): name for name, m in named})
    for m in layers:
        m._route_state = state
    try:
        yield route
    finally:
        for m in layers:
            m._route_state = None


class RoutedModel(nn.Module):
    """Wraps a model with routed layers so that ``routed(x, route)`` runs ``model(x)`` with every layer routed.

    The wrapped model is registered as ``self.model``, so ``state_dict`` keys gain the prefix ``model.``; save
    ``routed.model.state_dict()`` to keep the original names.

    Args:
        model: the model (converted with :func:`rtl.convert_`, or built from rtl.nn layers).

    Shapes:
        x (B, ...) as the model takes it; route (B,) int tickets in [0, T). Returns what the model returns.

    Example:
        >>> model = rtl.convert_(torchvision.models.resnet18(num_classes=10), num_tickets=10)
        >>> routed = rtl.RoutedModel(model)
        >>> routed(torch.randn(4, 3, 32, 32), torch.tensor([0, 7, 7, 2])).shape
        torch.Size([4, 10])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_tickets = model_num_tickets(model)

    def forward(self, x, route, *args, **kwargs):
        batch = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None
        with use_route(self.model, route, batch=batch):
            return self.model(x, *args, **kwargs)
