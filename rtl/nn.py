"""Routed sparse layers: one shared weight, one boolean mask per ticket, each input run through its ticket's mask.

``RoutedSparseLinear``, ``RoutedSparseConv2d`` and ``RoutedSparseConvTranspose2d`` subclass the torch layers they
replace, keep their Parameters ``weight`` and ``bias`` under the same names, and add the bool buffer
``weight_masks`` (T, *weight.shape). The weight is never masked in place: every ticket reads the same tensor and
the rtl_kernels ops apply each input's mask on the fly, so a step on one ticket can never corrupt another's
pruned positions.

A layer gets its route either as ``layer(x, route)`` or, for a whole model, from :class:`rtl.RoutedModel` /
:func:`rtl.use_route`, which hand one route to every routed layer for the length of one call.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rtl_kernels

__all__ = [
    "RoutedSparseConv2d",
    "RoutedSparseConvTranspose2d",
    "RoutedSparseLinear",
    "RoutedSparseModule",
    "routed_modules",
]


class RouteState:
    """The route of one call, shared by every routed layer of a model; groupings are made once per row count.
    ``names`` maps id(layer) to its name in the model, for errors."""

    def __init__(self, route: Tensor, num_tickets: int, names: Optional[Dict[int, str]] = None) -> None:
        self.route = route
        self.num_tickets = num_tickets
        self.names = names or {}
        self._groupings: Dict[int, Tuple[Tensor, rtl_kernels.TicketGrouping]] = {}

    def for_rows(self, rows: int) -> Tuple[Tensor, rtl_kernels.TicketGrouping]:
        """(route (rows,), grouping) for a layer that sees ``rows`` rows: a multiple of the batch expands it."""
        if rows not in self._groupings:
            route = _expand_route(self.route, rows)
            self._groupings[rows] = (route, rtl_kernels.group_by_ticket(route, self.num_tickets))
        return self._groupings[rows]


def _expand_route(route: Tensor, rows: int) -> Tensor:
    """A per-sample route (B,) repeated for layers whose input has ``rows = B * n`` rows (tokens, positions)."""
    batch = route.shape[0]
    if rows == batch:
        return route
    if batch == 0 or rows % batch:
        raise ValueError(
            f"route has {batch} entries but the layer sees {rows} rows, which is not a multiple of it: pass one "
            f"ticket per sample (B,) or per row"
        )
    return route.repeat_interleave(rows // batch)


def check_route(route, num_tickets: int, batch: Optional[int] = None, device=None) -> Tensor:
    """Validate a route and return it as int64 on ``device``.

    Args:
        route (B,) int tensor, or a sequence of ints: one ticket per sample, in [0, num_tickets).
        num_tickets: T.
        batch: expected B, or None not to check it.
        device: where the route must live (the input's device).

    Returns:
        route (B,) int64.
    """
    if not isinstance(route, Tensor):
        try:
            route = torch.as_tensor(route)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"route must be a tensor of ticket ids, got {type(route).__name__}") from exc
    if route.dtype == torch.bool or route.dtype.is_floating_point or route.dtype.is_complex:
        raise TypeError(f"route must hold integer ticket ids, got dtype {route.dtype}")
    if route.dim() != 1:
        raise ValueError(f"route must be 1-D (B,), got shape {tuple(route.shape)}")
    if batch is not None and route.shape[0] != batch:
        raise ValueError(f"route has {route.shape[0]} entries but the batch has {batch} samples")
    # The value check reads the route back: done here only in eager CPU calls, where that costs nothing. A GPU
    # route (the read would sync with the device) and a compiled call (the read would break the graph) are checked
    # by rtl_kernels inside the ops, which every routed layer calls.
    if route.numel() and not route.is_cuda and not torch.compiler.is_compiling():
        lo, hi = int(route.min()), int(route.max())
        if lo < 0 or hi >= num_tickets:
            bad = lo if lo < 0 else hi
            raise ValueError(f"route holds ticket {bad}, outside [0, {num_tickets})")
    if device is not None:
        route = route.to(device)
    return route.to(torch.int64)


class RoutedSparseModule:
    """Mixin of every routed layer: the masks buffer, the route plumbing, conversion to and from torch layers.

    Subclasses set ``_dense_cls`` (the torch layer they replace) and implement ``_routed_forward``.
    """

    _dense_cls: type = nn.Module
    weight: nn.Parameter
    weight_masks: Tensor

    def _init_masks(self, num_tickets: int) -> None:
        if not isinstance(num_tickets, int) or isinstance(num_tickets, bool) or num_tickets < 1:
            raise ValueError(f"num_tickets must be an int >= 1, got {num_tickets!r}")
        masks = torch.ones((num_tickets,) + tuple(self.weight.shape), dtype=torch.bool, device=self.weight.device)
        self.register_buffer("weight_masks", masks)
        self._route_state: Optional[RouteState] = None
        self._rtl_in_call = False  # inside its own forward while routed: reading the weight is allowed there

    @property
    def num_tickets(self) -> int:
        return self.weight_masks.shape[0]

    def __getattr__(self, name: str):
        value = nn.Module.__getattr__(self, name)
        # A model that reads a routed layer's weight itself (a functional call on `layer.weight`, as torchvision's
        # Swin attention does with its qkv and proj) would use it unmasked while the route is attached: refuse.
        if name == "weight":
            state = self.__dict__.get("_route_state")
            if state is not None and not self.__dict__.get("_rtl_in_call") and not torch.compiler.is_compiling():
                raise RuntimeError(_direct_read_message(state.names.get(id(self)), type(self).__name__))
        return value

    def _keeps_everything(self) -> bool:
        """Whether every ticket keeps every weight, checked once per mask version: the layer is then the torch layer
        it replaced (a converted model before pruning, a layer no ticket pruned) and runs as that, one dense call.
        Not while compiling: the check reads the masks."""
        if torch.compiler.is_compiling():
            return False
        return rtl_kernels.layout_cache.get_layout("rtl:keeps_everything", self.weight_masks, _all_true)

    def ticket_density(self) -> Tensor:
        """(T,) float64: the fraction of the weight each ticket keeps."""
        return self.weight_masks.flatten(1).double().mean(1)

    def _resolve_route(self, route, rows: int, device) -> Tuple[Tensor, Optional[rtl_kernels.TicketGrouping]]:
        if route is not None:
            route = check_route(route, self.num_tickets, device=device)
            return _expand_route(route, rows), None
        state = self._route_state
        if state is not None:
            if state.num_tickets != self.num_tickets:
                raise ValueError(
                    f"this layer has {self.num_tickets} tickets but the model is routed with {state.num_tickets}"
                )
            return state.for_rows(rows)
        if self.num_tickets == 1:
            return torch.zeros(rows, dtype=torch.int64, device=device), None
        raise ValueError(
            f"{type(self).__name__} has {self.num_tickets} tickets and got no route: call layer(x, route) or run "
            f"the model through rtl.RoutedModel(model)(x, route) / rtl.use_route(model, route)"
        )

    # -- conversion --------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Module, num_tickets: int):
        """The routed layer of a torch layer, SHARING its Parameters (an optimizer built on them keeps working).

        Every ticket starts with an all-ones mask, so the routed layer computes what ``module`` did. A layer pruned
        by ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``) keeps ``weight_orig`` as the shared weight
        and starts every ticket from its mask.

        Args:
            module: an instance of the torch layer this class replaces (nn.Linear, nn.Conv2d, nn.ConvTranspose2d).
            num_tickets: T >= 1.

        Returns:
            The routed layer, on the module's device and dtype.

        Example:
            >>> routed = RoutedSparseLinear.from_dense(nn.Linear(8, 4), num_tickets=3)
            >>> routed.weight_masks.shape
            torch.Size([3, 4, 8])
        """
        if type(module) is not cls._dense_cls:
            raise TypeError(
                f"{cls.__name__}.from_dense takes an {cls._dense_cls.__name__}, got {type(module).__name__}"
            )
        prune_mask = getattr(module, "weight_mask", None)
        weight = getattr(module, "weight_orig", None) if prune_mask is not None else module.weight
        routed = cls.__new__(cls)
        nn.Module.__init__(routed)
        _copy_layer_attributes(module, routed)
        routed.weight = weight
        routed.bias = module.bias
        routed._init_masks(num_tickets)
        if prune_mask is not None:
            routed.weight_masks.copy_(prune_mask.bool().unsqueeze(0).expand_as(routed.weight_masks))
        return routed

    def import_prune_mask_(self, mask, ticket: int):
        """Set ticket ``ticket``'s mask from a ``torch.nn.utils.prune`` mask (or a layer pruned by it).

        Args:
            mask: a tensor shaped like weight (nonzero = kept), or a module holding ``weight_mask``.
            ticket: which ticket to overwrite, in [0, T).

        Returns:
            self.
        """
        if isinstance(mask, nn.Module):
            if not hasattr(mask, "weight_mask"):
                raise ValueError("the module holds no weight_mask: prune it with torch.nn.utils.prune first")
            mask = mask.weight_mask
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(self.weight.shape)}")
        if not 0 <= ticket < self.num_tickets:
            raise ValueError(f"ticket {ticket} outside [0, {self.num_tickets})")
        with torch.no_grad():
            self.weight_masks[ticket] = mask.to(device=self.weight_masks.device) != 0
        return self

    def to_dense(self, ticket: int) -> nn.Module:
        """A plain torch layer computing ticket ``ticket``: a copy with weight * mask (the export path).

        Args:
            ticket: in [0, T).

        Returns:
            A new nn.Linear / nn.Conv2d / nn.ConvTranspose2d holding copies of the masked weight and the bias.
        """
        if not isinstance(ticket, int) or not 0 <= ticket < self.num_tickets:
            raise ValueError(f"ticket must be an int in [0, {self.num_tickets}), got {ticket!r}")
        dense = self._dense_cls.__new__(self._dense_cls)
        nn.Module.__init__(dense)
        _copy_layer_attributes(self, dense)
        with torch.no_grad():
            zero = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
            dense.weight = nn.Parameter(
                torch.where(self.weight_masks[ticket], self.weight, zero), requires_grad=self.weight.requires_grad
            )
            dense.bias = (
                None
                if self.bias is None
                else nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
            )
        return dense

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A dense checkpoint of the original model has no masks: keep the current ones (all-ones after
        # conversion). A checkpoint of a model pruned with torch.nn.utils.prune stores weight_orig / weight_mask:
        # the former is the weight, the latter becomes every ticket's mask.
        orig, pmask = prefix + "weight_orig", prefix + "weight_mask"
        if orig in state_dict and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(orig)
            if pmask in state_dict:
                state_dict[prefix + "weight_masks"] = (
                    state_dict.pop(pmask).bool().unsqueeze(0).expand_as(self.weight_masks).clone()
                )
        key = prefix + "weight_masks"
        no_masks = key not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if no_masks and key in missing_keys:
            missing_keys.remove(key)

    def _masks_repr(self) -> str:
        dens = ", ".join(f"{d:.3f}" for d in self.ticket_density().tolist()[:16])
        more = ", ..." if self.num_tickets > 16 else ""
        return f"num_tickets={self.num_tickets}, density=[{dens}{more}]"


def _direct_read_message(name: Optional[str], kind: str) -> str:
    label = f"layer {name!r} ({kind})" if name else f"a {kind}"
    keep = f"filter_fn=lambda name, m: name != {name!r}" if name else "a filter_fn that excludes it"
    return (
        f"{label} had its weight read outside its own forward during a routed call: the model uses that weight "
        f"through a functional, which would run it unmasked, so the routed output would not be the tickets'. Leave "
        f"the layer dense when converting: rtl.convert_(model, num_tickets, {keep}). Code that only inspects the "
        f"weight (a regulariser, logging) can read it outside the routed call or through named_parameters()."
    )


def _own_call(forward):
    """Mark a routed layer's forward as the place where its weight may be read while a route is attached."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        if self.__dict__.get("_route_state") is None:
            return forward(self, *args, **kwargs)
        self.__dict__["_rtl_in_call"] = True
        try:
            return forward(self, *args, **kwargs)
        finally:
            self.__dict__["_rtl_in_call"] = False

    return wrapped


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _copy_layer_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Copy a layer's configuration (in_features, stride, padding_mode...) but not its tensors or hooks."""
    for key, value in vars(src).items():
        if key in _MODULE_INTERNALS or key in ("weight", "bias", "weight_masks", "_route_state", "_rtl_in_call"):
            continue
        if isinstance(value, Tensor):
            continue
        setattr(dst, key, value)
    dst.training = src.training


def _all_true(masks: Tensor) -> bool:
    return bool(masks.all())


def _check_masks_dtype(masks: Tensor) -> None:
    if masks.dtype != torch.bool:
        raise TypeError(f"weight_masks must be bool, got {masks.dtype}")


class RoutedSparseLinear(RoutedSparseModule, nn.Linear):
    """nn.Linear with one boolean mask per ticket over its shared weight.

    ``y[i] = x[i] @ (weight * weight_masks[route[i]]).T + bias``.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        num_tickets: T >= 1, the number of masks.

    Shapes:
        x (*, in_features) -> (*, out_features). route (B,) one ticket per sample, where B divides the number of
        rows (the product of x's leading dims): a sample's route is repeated for its rows (e.g. the tokens of a
        sequence); or one ticket per row.

    Example:
        >>> layer = RoutedSparseLinear(16, 4, num_tickets=3)
        >>> layer(torch.randn(5, 16), torch.tensor([0, 2, 1, 1, 0])).shape
        torch.Size([5, 4])
    """

    _dense_cls = nn.Linear

    def __init__(
        self, in_features: int, out_features: int, num_tickets: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_masks(num_tickets)

    @_own_call
    def forward(self, x: Tensor, route: Optional[Tensor] = None) -> Tensor:
        """x (*, in_features), route (B,) or None (the model's route) -> (*, out_features)."""
        _check_masks_dtype(self.weight_masks)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim, expected {self.in_features}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        route, grouping = self._resolve_route(route, rows.shape[0], x.device)
        if self._keeps_everything():
            return F.linear(x, self.weight, self.bias)
        y = rtl_kernels.routed_masked_linear(rows, self.weight, self.weight_masks, route, self.bias, grouping=grouping)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._masks_repr()}"


class RoutedSparseConv2d(RoutedSparseModule, nn.Conv2d):
    """nn.Conv2d with one boolean mask per ticket over its shared weight.

    ``out[i] = F.conv2d(x[i], weight * weight_masks[route[i]], bias, ...)``.

    Args:
        in_channels, out_channels, kernel_size: as nn.Conv2d.
        num_tickets: T >= 1, the number of masks.
        stride, padding, dilation, groups, bias, padding_mode, device, dtype: as nn.Conv2d.

    Shapes:
        x (B, C, H, W) or (C, H, W) -> (B, O, Ho, Wo); route (B,) one ticket per image.

    Example:
        >>> conv = RoutedSparseConv2d(3, 8, 3, num_tickets=2, padding=1)
        >>> conv(torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 1, 0])).shape
        torch.Size([4, 8, 10, 10])
    """

    _dense_cls = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        num_tickets: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_masks(num_tickets)

    @_own_call
    def forward(self, x: Tensor, route: Optional[Tensor] = None) -> Tensor:
        """x (B, C, H, W), route (B,) or None (the model's route) -> (B, O, Ho, Wo)."""
        _check_masks_dtype(self.weight_masks)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        route, grouping = self._resolve_route(route, x.shape[0], x.device)
        if self._keeps_everything():
            y = self._conv_forward(x, self.weight, self.bias)
            return y.squeeze(0) if unbatched else y
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        y = rtl_kernels.routed_masked_conv2d(
            x,
            self.weight,
            self.weight_masks,
            route,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            grouping=grouping,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._masks_repr()}"


class RoutedSparseConvTranspose2d(RoutedSparseModule, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with one boolean mask per ticket over its shared weight (C_in, C_out / groups, kh, kw).

    Args:
        in_channels, out_channels, kernel_size: as nn.ConvTranspose2d.
        num_tickets: T >= 1.
        stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype: as nn.ConvTranspose2d.

    Shapes:
        x (B, C_in, H, W) -> (B, C_out, Ho, Wo); route (B,).

    Example:
        >>> up = RoutedSparseConvTranspose2d(4, 2, (3, 5), num_tickets=3, stride=(1, 2), padding=(1, 2),
        ...                                  output_padding=(0, 1))
        >>> up(torch.randn(2, 4, 6, 6), torch.tensor([2, 0])).shape
        torch.Size([2, 2, 6, 12])
    """

    _dense_cls = nn.ConvTranspose2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        num_tickets: int,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        nn.ConvTranspose2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=bias,
            dilation=dilation,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_masks(num_tickets)

    @_own_call
    def forward(self, x: Tensor, route: Optional[Tensor] = None, output_size=None) -> Tensor:
        """x (B, C_in, H, W), route (B,) or None, output_size as nn.ConvTranspose2d -> (B, C_out, Ho, Wo)."""
        _check_masks_dtype(self.weight_masks)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        route, grouping = self._resolve_route(route, x.shape[0], x.device)
        if self._keeps_everything():
            y = nn.ConvTranspose2d.forward(self, x, output_size)
            return y.squeeze(0) if unbatched else y
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)
        )
        y = rtl_kernels.routed_masked_conv_transpose2d(
            x,
            self.weight,
            self.weight_masks,
            route,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
            grouping=grouping,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"{nn.ConvTranspose2d.extra_repr(self)}, {self._masks_repr()}"


ROUTED_TYPES = {
    nn.Linear: RoutedSparseLinear,
    nn.Conv2d: RoutedSparseConv2d,
    nn.ConvTranspose2d: RoutedSparseConvTranspose2d,
}


def routed_modules(model: nn.Module) -> Iterator[Tuple[str, RoutedSparseModule]]:
    """Every routed layer of ``model`` as (name, module), names as ``model.named_modules()`` gives them."""
    for name, module in model.named_modules():
        if isinstance(module, RoutedSparseModule):
            yield name, module
