"""GhostNet for 32x32 images as in the paper's vision experiments (arXiv 2601.22141, App. A.1, Table 4).

The network is a small GhostNet (Han et al., CVPR 2020): a stride-2 stem, nine Ghost bottlenecks and a 1x1
head. Its pruning scope is every convolution (the stem, the Ghost modules' primary and cheap convs, the
depthwise stride convs and the conv shortcuts, the 1x1 80->184 conv and the head conv): 125,832 weights at
width 1.0, the paper's "approximately 126K prunable parameters". Batch norm, the squeeze-and-excitation
convs and the final classifier stay dense.

Bottleneck configuration, (kernel, expansion, out, SE, stride), the one that reproduces 125,832 (docs/paper_notes.md):

    B1 (3,  16, 16, -,  1)   B2 (3,  48, 24, -,  2)   B3 (3,  72, 24, -,  1)
    B4 (5,  72, 40, SE, 2)   B5 (5, 120, 40, SE, 1)   B6 (3, 240, 80, -,  2)
    B7 (3, 200, 80, -,  1)   (3, 184, 80, -,  1)      (3, 184, 80, -,  1)

B5's kernel size (5, as in GhostNet's stage of B4) does not change the count: a stride-1 block with an identity
shortcut has no depthwise kxk conv.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._filters import check_filter_args

__all__ = ["GhostBottleneck", "GhostModule", "GhostNet", "SqueezeExcite"]

# (kernel, expansion, out_channels, squeeze-excitation, stride) of the nine bottlenecks, paper Table 4.
GHOSTNET_CIFAR_CONFIG = (
    (3, 16, 16, False, 1),
    (3, 48, 24, False, 2),
    (3, 72, 24, False, 1),
    (5, 72, 40, True, 2),
    (5, 120, 40, True, 1),
    (3, 240, 80, False, 2),
    (3, 200, 80, False, 1),
    (3, 184, 80, False, 1),
    (3, 184, 80, False, 1),
)


def _make_divisible(value: float, divisor: int = 4) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never going more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class GhostModule(nn.Module):
    """Ghost module: a 1x1 primary conv to ceil(out/ratio) channels, a cheap depthwise 3x3 conv on them, concat.

    Args:
        in_channels: input channels C.
        out_channels: output channels O.
        ratio: 2 in the paper; the primary conv makes ceil(O / ratio) channels, the cheap conv the rest.
        dw_size: kernel of the cheap depthwise conv (3).
        relu: apply ReLU after both convs (the expanding module does, the projecting one does not).

    Shapes:
        x (B, C, H, W) -> (B, O, H, W).

    Example:
        >>> GhostModule(16, 48)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 48, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, ratio: int = 2, dw_size: int = 3, relu: bool = True):
        super().__init__()
        self.out_channels = out_channels
        init_channels = math.ceil(out_channels / ratio)
        cheap_channels = init_channels * (ratio - 1)
        act = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_channels, init_channels, 1, bias=False), nn.BatchNorm2d(init_channels), act
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, cheap_channels, dw_size, padding=dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(cheap_channels),
            act,
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, O, H, W)."""
        primary = self.primary_conv(x)
        cheap = self.cheap_operation(primary)
        return torch.cat([primary, cheap], dim=1)[:, : self.out_channels]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in GhostNet: pool, 1x1 reduce (x0.25, multiple of 4), ReLU, 1x1 expand, hard sigmoid.

    Kept dense by the paper: not part of the pruning scope.

    Args:
        channels: C.
        se_ratio: reduction ratio (0.25).

    Shapes:
        x (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> SqueezeExcite(72)(torch.randn(2, 72, 4, 4)).shape
        torch.Size([2, 72, 4, 4])
    """

    def __init__(self, channels: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = _make_divisible(channels * se_ratio, 4)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.conv_expand(F.relu(self.conv_reduce(scale)))
        return x * F.hardsigmoid(scale)


class GhostBottleneck(nn.Module):
    """Ghost bottleneck: ghost (expand, ReLU) -> [depthwise kxk stride s + BN] -> [SE] -> ghost (project) + shortcut.

    The shortcut is the identity when in == out and stride == 1, else depthwise kxk stride s + BN + 1x1 conv + BN.

    Args:
        in_channels: C.
        mid_channels: expansion width.
        out_channels: O.
        kernel_size: k of the depthwise stride conv and of the shortcut's depthwise conv.
        stride: 1 or 2.
        se: insert squeeze-and-excitation on the expanded features.

    Shapes:
        x (B, C, H, W) -> (B, O, ceil(H / s), ceil(W / s)).

    Example:
        >>> GhostBottleneck(16, 48, 24, 3, stride=2)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 24, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        se: bool = False,
    ):
        super().__init__()
        self.ghost1 = GhostModule(in_channels, mid_channels, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_channels,
                mid_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=mid_channels,
                bias=False,
            )
            self.bn_dw = nn.BatchNorm2d(mid_channels)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = SqueezeExcite(mid_channels) if se else None
        self.ghost2 = GhostModule(mid_channels, out_channels, relu=False)
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(
                    in_channels,
                    in_channels,
                    kernel_size,
                    stride=stride,
                    padding=kernel_size // 2,
                    groups=in_channels,
                    bias=False,
                ),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, O, ceil(H / s), ceil(W / s))."""
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class GhostNet(nn.Module):
    """The paper's GhostNet for CIFAR (Table 4): stem, nine Ghost bottlenecks, 1x1 80->184, head 184->128, Linear.

    Layout at width 1.0: stem Conv 3->16 3x3 stride 2 + BN + ReLU; bottlenecks B1..B7 (see the module docstring);
    Conv 1x1 80->184 + BN + ReLU; global average pool; head Conv 1x1 184->128 (with bias, no BN) + ReLU;
    Linear 128 -> num_classes. All conv and linear weights are Kaiming-normal (fan_in, ReLU gain; paper App. A.2),
    biases zero, BN weight one and bias zero.

    Args:
        num_classes: C, outputs of the (dense) classifier: 10 for CIFAR-10, 100 for CIFAR-100.
        width: channel multiplier; every width is rounded to a multiple of 4 (as GhostNet does). Only width 1.0
            is the paper's network.

    Shapes:
        x (B, 3, H, W) -> logits (B, num_classes); the paper uses H = W = 32.

    Example:
        >>> model = GhostNet(num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> routed = rtl.convert_(model, num_tickets=10, filter_fn=model.prunable_filter)
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width must be a number > 0, got {width!r}")
        self.num_classes = num_classes
        self.width = float(width)
        stem = _make_divisible(16 * width)
        self.conv_stem = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks = []
        channels = stem
        for kernel, expansion, out, se, stride in GHOSTNET_CIFAR_CONFIG:
            mid, out = _make_divisible(expansion * width), _make_divisible(out * width)
            blocks.append(GhostBottleneck(channels, mid, out, kernel, stride=stride, se=se))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        expand = _make_divisible(184 * width)
        self.conv_expand = nn.Conv2d(channels, expand, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(expand)
        head = _make_divisible(128 * width)
        # GhostNet's head conv comes after the pooling and has a bias (no BN follows it).
        self.conv_head = nn.Conv2d(expand, head, 1, bias=True)
        self.classifier = nn.Linear(head, num_classes)
        _kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> logits (B, num_classes)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W), got shape {tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.relu(self.bn_expand(self.conv_expand(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        x = F.relu(self.conv_head(x))
        return self.classifier(x.flatten(1))

    def prunable_filter(self, name: str, module: nn.Module) -> bool:
        """True for the layers the paper prunes: every conv except the squeeze-and-excitation ones; no Linear.

        Usable as ``filter_fn`` of :func:`rtl.convert_`; it judges by type and by the ``se`` name component, so it
        also holds for the routed layers after conversion and for names with a prefix. It reads nothing from
        ``self``: the class's function serves any instance.

        Args:
            name: the module's name as ``named_modules`` gives it.
            module: the module.

        Returns:
            Whether the module is in the pruning scope.

        Example:
            >>> model = GhostNet()
            >>> sum(m.weight.numel() for n, m in model.named_modules() if model.prunable_filter(n, m))
            125832
        """
        check_filter_args(name, module)
        return isinstance(module, nn.Conv2d) and "se" not in name.split(".")


def _kaiming_init_(model: nn.Module) -> None:
    """Kaiming-normal weights (fan_in, ReLU gain) on every conv and linear, zero biases, unit BN."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
