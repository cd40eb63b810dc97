"""A small CNN for 8x8 images (scikit-learn's digits): rtl's quick CPU model for examples and tests.

Not from the paper; it mirrors the paper's vision setup (App. A.1) at a size that trains in seconds on a CPU: the
convs and the hidden Linear are the pruning scope, batch norm and the classifier stay dense, as the paper keeps
GhostNet's classifier dense. Prunable weights: 144 + 4,608 + 9,216 + 8,192 = 22,160.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._filters import check_filter_args

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv 3x3 -> 16, max pool 2, conv 3x3 -> 32, conv 3x3 -> 32, avg pool to 2x2, Linear 128 -> 64 -> classes.

    Every conv has padding 1, no bias and is followed by BN and ReLU. Pooling right after the first conv runs
    the two wider convs on 4x4 maps (8x8 digits), which halves the cost of a step against pooling after the
    second. The adaptive 2x2 pooling accepts any input size from 2x2 up; on digits it averages 2x2 blocks.
    Weights are Kaiming-normal (fan_in, ReLU gain), biases zero, BN weight one and bias zero.

    Args:
        num_classes: C, outputs of the (dense) classifier.
        in_channels: input channels (1 for digits).

    Shapes:
        x (B, in_channels, H, W) -> logits (B, num_classes); H, W >= 2 (8 for digits).

    Example:
        >>> model = SmallCNN()
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> routed = rtl.convert_(model, num_tickets=10, filter_fn=model.prunable_filter)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 2 * 2, 64)
        self.classifier = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, in_channels, H, W) -> logits (B, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < 2:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W) with H, W >= 2, got shape {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.classifier(F.relu(self.fc(x)))

    def prunable_filter(self, name: str, module: nn.Module) -> bool:
        """True for the pruning scope: the three convs and the hidden Linear ``fc``; the classifier stays dense.

        Usable as ``filter_fn`` of :func:`rtl.convert_`; it judges by type and by the last name component, so it
        also holds after conversion and for names with a prefix. It reads nothing from
        ``self``: the class's function serves any instance.

        Args:
            name: the module's name as ``named_modules`` gives it.
            module: the module.

        Returns:
            Whether the module is in the pruning scope.

        Example:
            >>> model = SmallCNN()
            >>> sum(m.weight.numel() for n, m in model.named_modules() if model.prunable_filter(n, m))
            22160
        """
        check_filter_args(name, module)
        if isinstance(module, nn.Conv2d):
            return True
        return isinstance(module, nn.Linear) and name.split(".")[-1] != "classifier"
