"""Fourier-feature MLP for implicit neural representations as in the paper (arXiv 2601.22141, App. C.3).

A pixel coordinate (x, y) in [-1, 1]^2 is encoded as [x, y, sin(f_k x), sin(f_k y), cos(f_k x), cos(f_k y)]
over num_fourier frequencies f_k (input dim 2 + 4 * 8 = 34, as the paper), then a ReLU MLP
34-128-128-128-128-3 maps it to RGB. The five Linear layers are the pruning scope: 53,888 weights.

Decisions where the paper is silent (docs/paper_notes.md, choice 16):
    - Frequencies f_k = scale * 2^k * pi for k = 0 .. num_fourier - 1 (the NeRF positional encoding), scale 1.0:
      the coarsest is one period across the image, the finest (k = 7) 128 periods, about the Nyquist limit of a
      256-pixel side. The raw coordinates are kept in the input.
    - The output goes through a sigmoid, for RGB targets in [0, 1] (``output_sigmoid=False`` gives raw outputs).
    - Weights are Kaiming-normal (fan_in, ReLU gain; paper App. A.2), biases zero.
    - ``cond_features`` > 0 appends that many conditioning inputs after the Fourier features: the paper's
      single-mask baseline feeds a 16-dim class embedding (input dim 50), and the paper derives the RTL model's
      init from the baseline's by deleting those input columns of the first layer ("fair init").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._filters import check_filter_args

__all__ = ["FourierFeatures", "FourierINR", "coords"]


def coords(h: int, w: int, device=None, dtype=None) -> Tensor:
    """Pixel-centre coordinates of an h x w image in row-major order, each axis spanning [-1, 1].

    Args:
        h: image height (rows), >= 1.
        w: image width (columns), >= 1.
        device, dtype: of the result (float32 by default).

    Returns:
        (h * w, 2): row ``i * w + j`` holds (x_j, y_i), x along the width and y along the height, both
        ``linspace(-1, 1, n)`` (an axis of one pixel sits at -1).

    Example:
        >>> coords(2, 3)
        tensor([[-1., -1.],
                [ 0., -1.],
                [ 1., -1.],
                [-1.,  1.],
                [ 0.,  1.],
                [ 1.,  1.]])
    """
    for arg, value in (("h", h), ("w", w)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)


class FourierFeatures(nn.Module):
    """Positional encoding [p, sin(f_k p), cos(f_k p)] with f_k = scale * 2^k * pi, k < num_fourier.

    Args:
        num_fourier: number of frequencies (>= 0).
        scale: multiplies every frequency (> 0).
        in_features: coordinate dimension D (2 for images).

    Shapes:
        p (*, D) -> (*, D + 2 * D * num_fourier), ordered [p, sin(f_0 p), ..., sin(f_{K-1} p), cos(f_0 p), ...],
        each sin/cos block holding the D coordinates.

    Example:
        >>> FourierFeatures(8)(torch.rand(5, 2)).shape
        torch.Size([5, 34])
    """

    def __init__(self, num_fourier: int = 8, scale: float = 1.0, in_features: int = 2):
        super().__init__()
        if not isinstance(num_fourier, int) or isinstance(num_fourier, bool) or num_fourier < 0:
            raise ValueError(f"num_fourier must be an int >= 0, got {num_fourier!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        self.num_fourier = num_fourier
        self.scale = float(scale)
        self.in_features = in_features
        self.out_features = in_features * (1 + 2 * num_fourier)
        freqs = self.scale * math.pi * 2.0 ** torch.arange(num_fourier, dtype=torch.float64)
        # Derived from the constructor arguments, so not saved in checkpoints.
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, p: Tensor) -> Tensor:
        """p (*, D) -> (*, D * (1 + 2 * num_fourier))."""
        if p.shape[-1] != self.in_features:
            raise ValueError(
                f"coordinates must have {self.in_features} values in their last dim, got shape {tuple(p.shape)}"
            )
        if self.num_fourier == 0:
            return p
        angles = (p.unsqueeze(-2) * self.freqs.to(p.dtype).unsqueeze(-1)).flatten(-2)  # (*, K * D)
        return torch.cat((p, torch.sin(angles), torch.cos(angles)), dim=-1)


class FourierINR(nn.Module):
    """The paper's INR: Fourier features then a ReLU MLP of ``depth`` Linear layers, sigmoid output.

    Args:
        num_fourier: number of frequencies (8 gives the paper's input dim 34).
        hidden: width of the hidden layers (128).
        depth: number of Linear layers, >= 1 (5: 34-128-128-128-128-3).
        out_features: outputs per coordinate (3 for RGB).
        scale: multiplies every frequency scale * 2^k * pi (1.0).
        output_sigmoid: squash the outputs to (0, 1).
        cond_features: extra conditioning inputs appended after the Fourier features (0; the paper's baseline
            uses a 16-dim class embedding).

    Shapes:
        coords (*, 2) in [-1, 1] (see :func:`coords`), cond (*, cond_features) or None -> (*, out_features).

    Example:
        >>> model = FourierINR()
        >>> model(FourierINR.coords(4, 5)).shape
        torch.Size([20, 3])
        >>> routed = rtl.convert_(model, num_tickets=6, filter_fn=model.prunable_filter)
    """

    coords = staticmethod(coords)

    def __init__(
        self,
        num_fourier: int = 8,
        hidden: int = 128,
        depth: int = 5,
        out_features: int = 3,
        scale: float = 1.0,
        output_sigmoid: bool = True,
        cond_features: int = 0,
    ):
        super().__init__()
        for arg, value, low in (
            ("hidden", hidden, 1),
            ("depth", depth, 1),
            ("out_features", out_features, 1),
            ("cond_features", cond_features, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
        self.features = FourierFeatures(num_fourier, scale)
        self.cond_features = cond_features
        self.output_sigmoid = bool(output_sigmoid)
        widths = [self.features.out_features + cond_features] + [hidden] * (depth - 1) + [out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    @property
    def in_features(self) -> int:
        """Input width of the first Linear: Fourier features plus conditioning inputs (34 by default)."""
        return self.layers[0].in_features

    def forward(self, coords: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """coords (*, 2), cond (*, cond_features) or None -> (*, out_features)."""
        x = self.features(coords)
        if self.cond_features:
            if cond is None or cond.shape[:-1] != coords.shape[:-1] or cond.shape[-1] != self.cond_features:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(
                    f"cond must be (*, {self.cond_features}) with the leading dims of coords "
                    f"{tuple(coords.shape[:-1])}, got {got}"
                )
            x = torch.cat((x, cond.to(x.dtype)), dim=-1)
        elif cond is not None:
            raise ValueError("cond given but the model has cond_features=0")
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        x = self.layers[-1](x)
        return torch.sigmoid(x) if self.output_sigmoid else x

    def prunable_filter(self, name: str, module: nn.Module) -> bool:
        """True for the layers the paper prunes: every Linear, the first and last included.

        Usable as ``filter_fn`` of :func:`rtl.convert_`; it judges by type, so it also holds after conversion.
        It reads nothing from ``self``: the class's function serves any instance.

        Args:
            name: the module's name as ``named_modules`` gives it.
            module: the module.

        Returns:
            Whether the module is in the pruning scope.

        Example:
            >>> model = FourierINR()
            >>> sum(m.weight.numel() for n, m in model.named_modules() if model.prunable_filter(n, m))
            53888
        """
        check_filter_args(name, module)
        return isinstance(module, nn.Linear)
