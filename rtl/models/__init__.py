"""The paper's models as plain torch modules, each naming the layers the paper prunes.

Every model is built from nn.Conv2d / nn.ConvTranspose2d / nn.Linear / nn.BatchNorm2d and has a method
``prunable_filter(name, module) -> bool`` selecting its pruning scope, to pass to :func:`rtl.convert_`:

    >>> model = GhostNet(num_classes=10)
    >>> rtl.convert_(model, num_tickets=10, filter_fn=model.prunable_filter)

Models (prunable weights):
    - :class:`GhostNet` (125,832): CIFAR-10/100, paper App. A.1.
    - :class:`SpeechUNet` (37,368): complex-mask speech enhancement, paper App. D.2.
    - :class:`FourierINR` (53,888): implicit neural representation of an image, paper App. C.3.
    - :class:`SmallCNN` (22,160): 8x8 digits, rtl's quick CPU model (not in the paper).
"""

from torch import nn

from .ghostnet import GhostNet
from .inr import FourierINR, coords
from .small_cnn import SmallCNN
from .unet import SpeechUNet, apply_complex_mask

__all__ = [
    "MODELS",
    "FourierINR",
    "GhostNet",
    "SmallCNN",
    "SpeechUNet",
    "apply_complex_mask",
    "coords",
    "count_prunable",
]

MODELS = {
    "ghostnet": GhostNet,
    "unet": SpeechUNet,
    "inr": FourierINR,
    "small_cnn": SmallCNN,
}


def count_prunable(model: nn.Module) -> int:
    """Number of weights in the model's pruning scope: the weights of the layers ``model.prunable_filter`` selects.

    Biases are never counted, as in the paper's figures. Works before and after :func:`rtl.convert_`.

    Args:
        model: a model of this package (anything with ``prunable_filter(name, module)``).

    Returns:
        The count, e.g. 125,832 for GhostNet().

    Example:
        >>> count_prunable(FourierINR())
        53888
    """
    filter_fn = getattr(model, "prunable_filter", None)
    if not callable(filter_fn):
        raise TypeError(f"model must have a prunable_filter(name, module) method, got {type(model).__name__}")
    return sum(m.weight.numel() for n, m in model.named_modules() if filter_fn(n, m))
