"""rtl: Routing the Lottery (arXiv 2601.22141) for PyTorch: one shared weight, one pruning mask per ticket.

This package holds the method (routed modules, model conversion, routing, pruning, joint retraining and the
mask-similarity diagnostic); the routed kernels it runs on live in :mod:`rtl_kernels`, which never imports rtl.

Three levels of use:
    - convert a model: ``rtl.convert_(model, num_tickets)``, then ``rtl.RoutedModel(model)(x, route)``;
    - build with the layers: :class:`rtl.nn.RoutedSparseLinear`, :class:`rtl.nn.RoutedSparseConv2d`, ...;
    - call the ops: :func:`rtl_kernels.routed_masked_linear` and friends.
"""
from . import nn
from .convert import convert_, extract_ticket
from .nn import RoutedSparseConv2d, RoutedSparseConvTranspose2d, RoutedSparseLinear, routed_modules
from .routing import RoutedModel, model_num_tickets, use_route

__version__ = "0.1.0"

__all__ = [
    "RoutedModel",
    "RoutedSparseConv2d",
    "RoutedSparseConvTranspose2d",
    "RoutedSparseLinear",
    "convert_",
    "extract_ticket",
    "model_num_tickets",
    "nn",
    "routed_modules",
    "use_route",
]
