"""TicketMaskedOptimizer: any torch optimizer, kept from moving weights (and their state) outside the active tickets.

Alg. 2 of the paper updates the shared weight with ``∇L ⊙ m_k`` (Eq. 7, written for SGD). The routed kernels
already return a weight gradient that is exactly zero outside the masks of the tickets a batch used, but a zero
gradient does not stop a stateful optimizer: Adam's momentum, AdamW's decoupled weight decay and SGD's momentum
buffer all keep moving weights that the step's tickets do not own (docs/paper_notes.md, choice 7). The wrapper makes
the masked update exact for any optimizer: before the inner step it snapshots, for every routed weight, the values
outside the union of the active tickets' masks and every optimizer-state tensor shaped like that weight
(``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...); after the step it writes them back. Those weights and
their state come out bit-identical; weights inside the union, and every parameter that is not a routed weight
(biases, BatchNorm, a dense classifier), step as the inner optimizer decides.

Choices where the paper is silent (docs/paper_notes.md, choice 7):
    - one optimizer state per weight, shared by the tickets that keep it (option (a), "mask the final update"):
      a weight kept by tickets 0 and 2 carries the same Adam moments through the steps of both;
    - per-tensor scalars (Adam's ``step`` count, hence its bias correction) advance on every step, whatever the
      tickets: they are not per ticket;
    - state created by the first step of a weight (torch optimizers create it lazily) starts at zero at the
      positions that step may not touch, the initial value of the buffers of Adam, AdamW, SGD, RMSprop and most
      torch optimizers (Rprop's ``step_size`` is the exception).

Which tickets are active, by priority:
    1. the tickets set with :meth:`TicketMaskedOptimizer.set_active_tickets` or the
       :meth:`TicketMaskedOptimizer.active_tickets` context manager (what :mod:`rtl.train` does);
    2. otherwise the tickets each routed layer ran with grad enabled since the previous step (recorded by forward
       hooks, so a hand-written loop needs no extra call); a layer that did not run keeps all its weights;
    3. otherwise (nothing recorded, e.g. gradients made by hand) every ticket: the union of all masks.
Under DistributedDataParallel the active tickets of all processes are merged (one small all-reduce per step) so
every process applies the same update even when their batches hold different tickets.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn import RoutedSparseModule, routed_modules
from .routed_model import model_num_tickets

__all__ = ["TicketMaskedOptimizer"]

Tickets = Union[None, int, Sequence[int], Tensor]


class TicketMaskedOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer so that ``step()`` leaves weights outside the active tickets' masks untouched.

    "Untouched" is exact: the weight values at positions no active ticket keeps, and every optimizer-state tensor
    of the weight's shape at those positions, are bit-identical before and after the step, whatever the inner
    optimizer (Adam's momentum, AdamW's weight decay, SGD's momentum...). Parameters that are not the weight of a
    routed layer step normally. ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``state_dict``,
    ``load_state_dict``, ``add_param_group`` and the hook registrations are the inner optimizer's, so learning-rate
    schedulers and checkpoints work as with the inner optimizer (its state dicts are interchangeable with ours).

    Args:
        optimizer: a torch.optim.Optimizer over (some of) the model's parameters.
        model: the model holding the routed layers (a DistributedDataParallel wrapper is accepted).
        sync_tickets: merge the active tickets of all processes before each step. None (default): when ``model``
            is a DistributedDataParallel and torch.distributed is initialised.

    Example:
        >>> opt = TicketMaskedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4), model)
        >>> with opt.active_tickets(3):
        ...     with rtl.use_route(model, torch.full((len(x),), 3)):
        ...         loss_fn(model(x), y).backward()
        ...     opt.step()     # weights outside ticket 3's mask, and their Adam moments, do not change
    """

    # torch.amp.GradScaler hands its scale to optimizers that declare this; the wrapper's step takes no such
    # argument, so the scaler unscales the gradients itself and calls a plain step().
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, sync_tickets: Optional[bool] = None) -> None:
        # Optimizer.__init__ is not called on purpose: param_groups, state and defaults are the inner optimizer's.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, TicketMaskedOptimizer):
            raise TypeError("optimizer is already a TicketMaskedOptimizer: wrap the inner optimizer only once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if sync_tickets is not None and not isinstance(sync_tickets, bool):
            raise TypeError(f"sync_tickets must be a bool or None, got {sync_tickets!r}")
        self.__dict__["optimizer"] = optimizer
        self.num_tickets = model_num_tickets(model)
        self._layers: List[RoutedSparseModule] = [m for _, m in routed_modules(model)]
        # One routed weight may be tied into several layers: each contributes its own allowed region.
        self._layers_of_param: Dict[int, List[int]] = {}
        for i, layer in enumerate(self._layers):
            self._layers_of_param.setdefault(id(layer.weight), []).append(i)
        if sync_tickets is None:
            sync_tickets = isinstance(model, nn.parallel.DistributedDataParallel) and _dist_ready()
        self.sync_tickets = sync_tickets
        self._explicit: Optional[Tuple[int, ...]] = None
        self._recorded: List[Optional[Tensor]] = [None] * len(self._layers)
        self._hooks = []
        ref = weakref.ref(self)
        for i, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_hook(_make_recorder(ref, i), with_kwargs=True))

    # -- delegation --------------------------------------------------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's ``state_dict`` (the active tickets are not part of it)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """The inner optimizer's ``load_state_dict``."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """The inner optimizer's ``add_param_group``; routed weights in it are masked like the others."""
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def __getattr__(self, name: str):
        # Only reached for names not found the usual way: optimizer-specific attributes of the inner optimizer.
        inner = self.__dict__.get("optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self):
        raise TypeError("a TicketMaskedOptimizer cannot be pickled or copied: save its state_dict() instead")

    def __repr__(self) -> str:
        return f"TicketMaskedOptimizer(num_tickets={self.num_tickets}, optimizer={self.optimizer!r})"

    # -- active tickets ----------------------------------------------------------------------------------------
    def set_active_tickets(self, tickets: Tickets) -> None:
        """Set the tickets whose masks later steps may update, until changed again.

        Args:
            tickets: a ticket id, a sequence of ids, a route tensor (B,) (its distinct tickets count), or None to
                go back to automatic detection (the tickets the routed layers ran since the previous step, or all
                tickets when none ran). An empty sequence freezes every routed weight.

        Example:
            >>> opt.set_active_tickets([0, 2])
            >>> opt.step()     # moves routed weights only where ticket 0 or ticket 2 keeps them
        """
        self._explicit = None if tickets is None else self._check_tickets(tickets)

    @contextlib.contextmanager
    def active_tickets(self, tickets: Tickets) -> Iterator[None]:
        """Context manager form of :meth:`set_active_tickets`; the previous setting comes back on exit.

        Args:
            tickets: as :meth:`set_active_tickets`.

        Example:
            >>> with opt.active_tickets(1):
            ...     opt.step()
        """
        previous = self._explicit
        self.set_active_tickets(tickets)
        try:
            yield
        finally:
            self._explicit = previous

    def _check_tickets(self, tickets) -> Tuple[int, ...]:
        if isinstance(tickets, Tensor):
            if tickets.dtype == torch.bool or tickets.dtype.is_floating_point or tickets.dtype.is_complex:
                raise TypeError(f"tickets must hold integer ticket ids, got a tensor of dtype {tickets.dtype}")
            values = torch.unique(tickets.detach().flatten()).tolist()
        elif isinstance(tickets, bool):
            raise TypeError(f"tickets must be an int, a sequence of ints or a tensor, got {tickets!r}")
        elif isinstance(tickets, int):
            values = [tickets]
        elif isinstance(tickets, Iterable) and not isinstance(tickets, (str, bytes)):
            values = list(tickets)
            for t in values:
                if isinstance(t, Tensor) and t.dim() == 0 and not t.dtype.is_floating_point:
                    continue
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"tickets must hold ints, got {t!r}")
            values = [int(t) for t in values]
        else:
            raise TypeError(f"tickets must be an int, a sequence of ints or a tensor, got {type(tickets).__name__}")
        for t in values:
            if not 0 <= t < self.num_tickets:
                raise ValueError(f"tickets holds ticket {t}, outside [0, {self.num_tickets})")
        return tuple(sorted(set(values)))

    def _record(self, index: int, route: Tensor) -> None:
        """Mark the tickets of ``route`` as used by layer ``index`` since the previous step (no device sync)."""
        presence = self._recorded[index]
        if presence is None:
            presence = torch.zeros(self.num_tickets, dtype=torch.bool, device=route.device)
            self._recorded[index] = presence
        if route.numel():
            presence.index_fill_(0, route.to(presence.device), True)

    def _active_per_layer(self) -> List[Union[Tuple[int, ...], Tensor]]:
        """For every routed layer, the tickets whose masks this step may update (merged across processes).

        Each entry is a tuple of ticket ids, or, when the tickets were recorded on an accelerator, a (T,) bool
        tensor on that device: reading it back to the host would make every step wait for the forward and
        backward to finish, so the masks are combined on the device instead (see :meth:`_union`).
        """
        num_layers, num_tickets = len(self._layers), self.num_tickets
        if self._explicit is not None:
            presence = torch.zeros(num_layers, num_tickets, dtype=torch.bool)
            presence[:, list(self._explicit)] = True
        elif any(p is not None for p in self._recorded):
            # A layer that did not run since the previous step got no gradient from this step's batches.
            device = next(p.device for p in self._recorded if p is not None)
            rows = [
                p.to(device) if p is not None else torch.zeros(num_tickets, dtype=torch.bool, device=device)
                for p in self._recorded
            ]
            presence = torch.stack(rows)
        else:
            presence = torch.ones(num_layers, num_tickets, dtype=torch.bool)
        if self.sync_tickets and _dist_ready() and dist.get_world_size() > 1:
            # The gradients are all-reduced, so every process must allow every ticket any process used.
            device = self._layers[0].weight_masks.device if dist.get_backend() == "nccl" else torch.device("cpu")
            merged = presence.to(device=device, dtype=torch.int32)
            dist.all_reduce(merged, op=dist.ReduceOp.MAX)
            presence = merged.bool()
        if not _reads_back_freely(presence.device):
            return list(presence.unbind(0))
        return [tuple(torch.nonzero(row).flatten().tolist()) for row in presence]

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step of the inner optimizer with routed weights frozen outside the active tickets' masks.

        Args:
            closure: passed to the inner ``step``. Forwards run inside it are not used to find the active tickets
                (they run after the snapshot): set them with :meth:`set_active_tickets` when using a closure.

        Returns:
            What the inner ``step`` returns (the closure's loss, or None).
        """
        active = self._active_per_layer()
        self._recorded = [None] * len(self._layers)
        saved = []
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                layer_ids = self._layers_of_param.get(id(param))
                if layer_ids is None:
                    continue
                allowed = None
                for i in layer_ids:
                    region = self._union(self._layers[i], active[i])
                    allowed = region if allowed is None else allowed | region
                frozen = ~allowed
                state = self.optimizer.state.get(param)
                had_state = bool(state)
                old_state = {}
                if had_state:
                    for key, value in state.items():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            old_state[key] = value.detach().clone()
                saved.append((param, frozen, param.detach().clone(), had_state, old_state))
        with torch.enable_grad():
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for param, frozen, old_value, had_state, old_state in saved:
            # where() into the tensor itself: each element reads and writes its own position only, so no
            # weight-sized temporary is made and copied back
            torch.where(frozen, old_value, param.detach(), out=param.detach())
            state = self.optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if not isinstance(value, Tensor) or value.shape != param.shape:
                    continue
                if key in old_state:
                    torch.where(frozen, old_state[key], value, out=value)
                elif not had_state:
                    # State the inner optimizer just created: the frozen positions start from zero, as they would
                    # had their gradient been zero on this step with no weight decay.
                    value.masked_fill_(frozen, 0)
        return result

    @staticmethod
    def _union(layer: RoutedSparseModule, tickets: Union[Tuple[int, ...], Tensor]) -> Tensor:
        """(*weight.shape) bool: the positions that at least one of ``tickets`` keeps in ``layer``.

        ``tickets`` is a tuple of ticket ids, or a (T,) bool presence tensor (combined without leaving its device).
        """
        masks = layer.weight_masks
        if isinstance(tickets, Tensor):
            presence = tickets.to(masks.device).view(-1, *([1] * (masks.dim() - 1)))
            return _any_over_tickets(masks & presence)
        if not tickets:
            return torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
        if len(tickets) == 1:
            return masks[tickets[0]]
        index = torch.tensor(tickets, dtype=torch.int64, device=masks.device)
        return _any_over_tickets(masks.index_select(0, index))

    def remove_hooks(self) -> None:
        """Detach the forward hooks that record the tickets the routed layers run (automatic detection stops)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __del__(self) -> None:
        for handle in self.__dict__.get("_hooks", ()):
            handle.remove()


def _any_over_tickets(masks: Tensor) -> Tensor:
    """(T, *shape) bool -> (*shape) bool: the OR over dim 0.

    Reduced as uint8 maxima: ``Tensor.any(0)`` on bool took 20 ms for eight 512x512x3x3 masks on a 2-core AVX-512 EPYC
    (torch 2.14), ``amax(0)`` on the same bytes 0.6 ms, the same result.
    """
    return masks.view(torch.uint8).amax(0).view(torch.bool)


def _reads_back_freely(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` from the host costs no wait (CPU memory is the host's)."""
    return device.type == "cpu"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _make_recorder(ref: "weakref.ReferenceType[TicketMaskedOptimizer]", index: int):
    """A forward hook for routed layer ``index`` that records its route in the optimizer behind ``ref``."""

    def hook(module: RoutedSparseModule, args, kwargs, output) -> None:
        opt = ref()
        if opt is None or not torch.is_grad_enabled():
            return
        route = args[1] if len(args) > 1 else kwargs.get("route")
        if route is None:
            state = module._route_state
            if state is not None:
                route = state.route
            elif module.num_tickets == 1:
                route = torch.zeros(1, dtype=torch.int64, device=module.weight_masks.device)
            else:
                return
        elif not isinstance(route, Tensor):
            route = torch.as_tensor(route, dtype=torch.int64)
        opt._record(index, route.detach().flatten().to(torch.int64))

    return hook
