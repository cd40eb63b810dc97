"""rtl: Routing the Lottery (arXiv 2601.22141) for PyTorch: one shared weight, one pruning mask per ticket.

This package holds the method (routed modules, model conversion, routing, pruning, joint retraining and the
mask-similarity diagnostic); the routed kernels it runs on live in :mod:`rtl_kernels`, which never imports rtl.

Three levels of use:
    - convert a model: ``rtl.convert_(model, num_tickets)``, then ``rtl.RoutedModel(model)(x, route)``;
    - build with the layers: :class:`rtl.nn.RoutedSparseLinear`, :class:`rtl.nn.RoutedSparseConv2d`, ...;
    - call the ops: :func:`rtl_kernels.routed_masked_linear` and friends.
"""

import importlib
import sys
import types
import warnings

from rtl_kernels import __version__ as __version__  # one version for both packages

from . import nn
from .convert import convert_, extract_ticket
from .nn import RoutedSparseConv2d, RoutedSparseConvTranspose2d, RoutedSparseLinear, routed_modules
from .routed_model import RoutedModel, model_num_tickets, use_route

# Submodules that pull in scikit-learn, tqdm, matplotlib or the datasets load on first use, so `import rtl`
# stays as light as torch itself.
_LAZY_MODULES = (
    "data",
    "diagnostics",
    "experiments",
    "iterative_pruning",
    "masks_io",
    "metrics",
    "models",
    "optim",
    "prune",
    "routers",
    "sync_batch_norm",
    "train",
)
_LAZY_NAMES = {
    "IMP": "iterative_pruning",
    "magnitude_prune_": "prune",
    "TicketMaskedOptimizer": "optim",
    "train_sequential": "train",
    "train_mixed": "train",
    "jaccard_matrix": "diagnostics",
    "ticket_similarity_scores": "diagnostics",
    "save_masks": "masks_io",
    "load_masks_": "masks_io",
    "LabelRouter": "routers",
    "ClusterRouter": "routers",
    "EnvironmentRouter": "routers",
}


# Former module names -> their new homes: ``import rtl.imp`` and ``from rtl.routing import use_route`` keep working,
# with a DeprecationWarning on first use of a name (rtl.imp shadowed the standard library's module of that name;
# rtl.routing was a near-homonym of rtl.routers).
_MOVED_MODULES = {"imp": "iterative_pruning", "routing": "routed_model"}


class _MovedModule(types.ModuleType):
    """A placeholder in sys.modules for a renamed submodule: attribute reads warn and go to the new module."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(f"{__name__}.{old}", f"Deprecated: moved to {__name__}.{new}.")
        self._new = f"{__name__}.{new}"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(
            f"{self.__name__} moved: use {self._new} (or the rtl top-level names)", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(self._new), name)


for _old, _new in _MOVED_MODULES.items():
    sys.modules.setdefault(f"{__name__}.{_old}", _MovedModule(_old, _new))


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _MOVED_MODULES:
        return sys.modules[f"{__name__}.{name}"]
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'rtl' has no attribute {name!r}")


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
    *_LAZY_MODULES,
    *_LAZY_NAMES,
]
