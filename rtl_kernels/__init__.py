"""rtl_kernels: routed masked ops for Routing-the-Lottery models (one shared weight, one mask per ticket).

Importing this package registers the ops with torch.library; it does not import Triton, load CUDA or need the
compiled extension (backends load lazily, see :mod:`rtl_kernels.backends`).
"""

from .backends import available_backends, get_backend, set_backend, set_default_backend, unavailable_reasons
from .grouping import TicketGrouping, group_by_ticket
from .layout_cache import clear_layout_cache, layout_cache_stats, release_captured_layouts
from .conv import routed_masked_conv2d, routed_masked_conv_transpose2d
from .linear import routed_masked_linear

__version__ = "0.1.0"

__all__ = [
    "TicketGrouping",
    "available_backends",
    "clear_layout_cache",
    "get_backend",
    "group_by_ticket",
    "layout_cache_stats",
    "release_captured_layouts",
    "routed_masked_conv2d",
    "routed_masked_conv_transpose2d",
    "routed_masked_linear",
    "set_backend",
    "set_default_backend",
    "unavailable_reasons",
]
