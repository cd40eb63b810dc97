"""Routers: turn what an input carries (a class label, an environment, or features) into a route of tickets.

A route is a LongTensor (B,) of tickets in [0, num_tickets) that a routed model (:class:`rtl.RoutedModel`) uses to
pick each input's pruning mask. The paper (arXiv 2601.22141, §1 and §3) selects tickets by context: the class or
cluster label (CIFAR), the environment (speech), the region id (INR). This module holds

- :class:`LabelRouter`: class label -> ticket through a lookup table (one ticket per class, or a partition of the
  classes into clusters such as the paper's CIFAR-100 Table 5);
- :class:`EnvironmentRouter`: environment id or name -> ticket;
- :class:`ClusterRouter`: label-free routing to the nearest centroid of features (k-means, or the mean feature of
  each group of a fixed partition), so inference needs no label;
- :func:`all_tickets_scores` and :func:`all_tickets_predict`: label-free multi-class decisions by running every
  ticket and combining their scores (the paper leaves this open: docs/paper_notes.md, choice 10).

Every router is called as ``router(batch_info) -> route (B,) int64``, has ``num_tickets``, and saves as plain
tensors, lists and ints through ``state_dict()`` / ``load_state_dict()`` (so ``torch.load(weights_only=True)``
reads it back). An unknown label, id or name raises ValueError naming the first offending value.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "COMBINE_RULES",
    "ClusterRouter",
    "EnvironmentRouter",
    "LabelRouter",
    "Router",
    "all_tickets_predict",
    "all_tickets_scores",
]

#: The rules :func:`all_tickets_predict` knows.
COMBINE_RULES = ("own_logit", "max_softmax", "mean_logits")

# k-means restarts. Fixed (not "auto") so a seed gives the same centroids whatever scikit-learn's default becomes.
_KMEANS_N_INIT = 10

# Largest (rows x tickets x features) block of differences held at once in the nearest-centroid search: 4 Mi
# elements (32 MiB in float64) keeps memory flat for big batches while each block is still one vectorised op.
_DISTANCE_BLOCK_ELEMENTS = 1 << 22


def _is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for bool (a label True/False is almost certainly a mistake)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_num_tickets(num_tickets: Any) -> int:
    if not _is_int(num_tickets) or num_tickets < 1:
        raise ValueError(f"num_tickets must be a positive int, got {num_tickets!r}")
    return int(num_tickets)


def _as_index_tensor(name: str, value: Any) -> torch.Tensor:
    """Integer ids given as a tensor or a sequence of ints -> int64 tensor (B,), on the tensor's own device."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(
                f"{name} must be an integer tensor of shape (B,) or a sequence of ints, got {type(value).__name__}"
            )
        bad = next((v for v in value if not _is_int(v)), None)
        if bad is not None:
            raise TypeError(f"{name} must hold ints, got {bad!r} ({type(bad).__name__})")
        value = torch.tensor([int(v) for v in value], dtype=torch.int64)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(value.shape)}")
    return value.long()


class Router:
    """Base of the routers: ``router(batch_info) -> route (B,) int64`` in [0, num_tickets).

    Subclasses set ``num_tickets`` and implement ``__call__``, ``state_dict`` and ``load_state_dict``.
    ``state_dict()`` holds only tensors, lists, strings and ints, so ``torch.save`` / ``torch.load(...,
    weights_only=True)`` round-trips it. ``from_state_dict`` builds a router straight from a saved state.
    """

    num_tickets: int

    def __call__(self, batch_info: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state_dict(self, state_dict: Mapping) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, **kwargs: Any) -> "Router":
        """Build a router of this class from ``state_dict()`` output.

        Args:
            state_dict: what ``state_dict()`` returned (possibly after torch.save / torch.load).
            **kwargs: extra constructor-only settings that are not saved (``feature_fn`` for ClusterRouter).

        Returns:
            A new router with that state.

        Example:
            >>> r = LabelRouter([[0, 2], [1]])
            >>> LabelRouter.from_state_dict(r.state_dict())(torch.tensor([2, 1])).tolist()
            [0, 1]
        """
        router = cls.__new__(cls)
        router._init_unsaved(**kwargs)
        router.load_state_dict(state_dict)
        return router

    def _init_unsaved(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.from_state_dict got unexpected arguments {sorted(kwargs)}")


def _check_state_keys(owner: str, state_dict: Any, keys: set) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{owner}.load_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}")
    if set(state_dict) != keys:
        raise ValueError(f"{owner}.load_state_dict: expected keys {sorted(keys)}, got {sorted(map(str, state_dict))}")


# --------------------------------------------------------------------------------------------------------------
# LabelRouter
# --------------------------------------------------------------------------------------------------------------


class LabelRouter(Router):
    """Class label -> ticket through a lookup table (the paper's label / cluster routing).

    Args:
        mapping: one of
            - a dict ``{label: ticket}``;
            - a sequence of tickets where index = label (``[0, 0, 1]``: labels 0 and 1 -> ticket 0, label 2 -> 1),
              or a 1-D integer tensor of the same meaning;
            - a partition: a sequence of sequences of labels, ticket k = the k-th group (``[[0, 2], [1]]``), e.g.
              the paper's CIFAR-100 Table 5 grouping of 100 classes into 8 clusters. A group may be empty (its
              ticket then receives no input); a label in two groups is an error.
        num_tickets: T. Default: the number of groups for a partition, else the largest ticket + 1. Give it to
            keep tickets that no label maps to (they stay legal, just empty).

    Labels are non-negative ints; labels that are not mapped raise ValueError when routed. The table is dense over
    [0, max label], so labels should be class indices, not arbitrary large ids.

    Example:
        >>> router = LabelRouter([[3, 0], [1, 2]])
        >>> router(torch.tensor([0, 1, 2, 3])).tolist()
        [0, 1, 1, 0]
        >>> router.num_tickets
        2
    """

    def __init__(self, mapping: Mapping | Sequence | torch.Tensor, num_tickets: int | None = None):
        pairs, default_tickets = self._pairs_from_mapping(mapping)
        if num_tickets is None:
            num_tickets = default_tickets
            if num_tickets < 1:
                raise ValueError("mapping is empty: give at least one label, or pass num_tickets")
        num_tickets = _check_num_tickets(num_tickets)
        max_label = max((label for label, _ in pairs), default=-1)
        table = torch.full((max_label + 1,), -1, dtype=torch.int64)
        for label, ticket in pairs:
            if not 0 <= ticket < num_tickets:
                raise ValueError(f"mapping sends label {label} to ticket {ticket}, outside [0, {num_tickets})")
            table[label] = ticket
        self._set_state(table, num_tickets)

    @staticmethod
    def _pairs_from_mapping(mapping: Any) -> tuple[list[tuple[int, int]], int]:
        """(label, ticket) pairs and the default num_tickets, with labels checked non-negative and unique."""
        if isinstance(mapping, torch.Tensor):
            if mapping.dim() != 1 or mapping.dtype == torch.bool or mapping.is_floating_point():
                raise TypeError(
                    f"mapping as a tensor must be 1-D integer (index = label), "
                    f"got dtype {mapping.dtype} and shape {tuple(mapping.shape)}"
                )
            mapping = mapping.tolist()
        if isinstance(mapping, Mapping):
            pairs = list(mapping.items())
            partition = False
        elif isinstance(mapping, Sequence) and not isinstance(mapping, (str, bytes)):
            group_like = [
                (isinstance(g, (Sequence, set, frozenset)) and not isinstance(g, (str, bytes)))
                or (isinstance(g, torch.Tensor) and g.dim() == 1)
                for g in mapping
            ]
            partition = any(group_like)
            if partition and not all(group_like):
                first = mapping[group_like.index(False)]
                raise TypeError(
                    f"mapping mixes groups (a partition) and single tickets, e.g. {first!r}; give either "
                    f"a list of label groups or a list of tickets (index = label)"
                )
            if partition:
                pairs = []
                for ticket, group in enumerate(mapping):
                    members = group.tolist() if isinstance(group, torch.Tensor) else list(group)
                    pairs.extend((label, ticket) for label in members)
            else:
                pairs = list(enumerate(mapping))
        else:
            raise TypeError(
                f"mapping must be a dict {{label: ticket}}, a sequence of tickets or a list of label "
                f"groups, got {type(mapping).__name__}"
            )
        seen: dict[int, int] = {}
        for label, ticket in pairs:
            if not _is_int(label):
                raise TypeError(f"labels must be ints, got {label!r} ({type(label).__name__})")
            if not _is_int(ticket):
                raise TypeError(f"tickets must be ints, got {ticket!r} ({type(ticket).__name__}) for label {label}")
            if label < 0:
                raise ValueError(f"labels must be non-negative, got {label}")
            if label in seen:
                raise ValueError(f"label {label} is in two groups (tickets {seen[label]} and {ticket})")
            seen[int(label)] = int(ticket)
        pairs = list(seen.items())
        default_tickets = len(mapping) if partition else max((t for _, t in pairs), default=-1) + 1
        return pairs, default_tickets

    @classmethod
    def identity(cls, num_classes: int) -> "LabelRouter":
        """One ticket per class: label c -> ticket c (the paper's CIFAR-10 set-up).

        Args:
            num_classes: number of classes C, which is also num_tickets.

        Returns:
            A LabelRouter with num_tickets == num_classes.

        Example:
            >>> LabelRouter.identity(10)(torch.tensor([7, 2])).tolist()
            [7, 2]
        """
        num_classes = _check_num_tickets(num_classes)
        return cls(list(range(num_classes)))

    def _set_state(self, table: torch.Tensor, num_tickets: int) -> None:
        self.num_tickets = num_tickets
        self._table = table
        self._table_on: dict[torch.device, torch.Tensor] = {}

    @property
    def table(self) -> torch.Tensor:
        """The lookup table (L,) int64: ``table[label]`` is the label's ticket, -1 where a label is not mapped."""
        return self._table.clone()

    @property
    def groups(self) -> list[list[int]]:
        """The labels of each ticket, as a partition: ``groups[t]`` lists ticket t's labels in increasing order."""
        groups: list[list[int]] = [[] for _ in range(self.num_tickets)]
        for label, ticket in enumerate(self._table.tolist()):
            if ticket >= 0:
                groups[ticket].append(label)
        return groups

    def __call__(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Route labels to tickets.

        Args:
            labels: class labels (B,), an integer tensor (any device) or a sequence of ints.

        Returns:
            route (B,) int64 on the labels' device.

        Raises:
            ValueError: a label that the mapping does not cover (the first one in batch order is named).

        Example:
            >>> LabelRouter({5: 1, 2: 0})([5, 2, 5]).tolist()
            [1, 0, 1]
        """
        labels = _as_index_tensor("labels", labels)
        table = self._table_on.get(labels.device)
        if table is None:
            table = self._table_on[labels.device] = self._table.to(labels.device)
        size = table.numel()
        in_range = (labels >= 0) & (labels < size)
        route = table[labels.clamp(0, max(size - 1, 0))] if size else torch.full_like(labels, -1)
        bad = ~in_range | (route < 0)
        if bool(bad.any()):
            first = int(labels[bad.nonzero()[0, 0]])
            raise ValueError(f"label {first} has no ticket: the router maps labels {self._describe_labels()}")
        return route

    def _describe_labels(self) -> str:
        labels = (self._table >= 0).nonzero().flatten().tolist()
        if len(labels) > 12:
            return f"{labels[:6]} ... {labels[-3:]} ({len(labels)} labels)"
        return str(labels)

    def state_dict(self) -> dict:
        """The router's state: ``{"table": (L,) int64 (-1 = unmapped), "num_tickets": int}``.

        Returns:
            A dict of a tensor and an int that torch.save / torch.load(weights_only=True) round-trip.

        Example:
            >>> LabelRouter([1, 0]).state_dict()["table"].tolist()
            [1, 0]
        """
        return {"table": self._table.clone(), "num_tickets": self.num_tickets}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Replace this router's mapping by a saved one (from ``state_dict()``).

        Args:
            state_dict: ``{"table": (L,) int64, "num_tickets": int}``.

        Example:
            >>> r = LabelRouter([0]); r.load_state_dict(LabelRouter([[1], [0]]).state_dict()); r([0, 1]).tolist()
            [1, 0]
        """
        _check_state_keys("LabelRouter", state_dict, {"table", "num_tickets"})
        table, num_tickets = state_dict["table"], _check_num_tickets(state_dict["num_tickets"])
        if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype != torch.int64:
            raise ValueError(
                f"LabelRouter.load_state_dict: table must be a 1-D int64 tensor, got "
                f"{type(table).__name__} {getattr(table, 'dtype', '')} "
                f"{tuple(getattr(table, 'shape', ()))}"
            )
        if table.numel() and (int(table.min()) < -1 or int(table.max()) >= num_tickets):
            raise ValueError(f"LabelRouter.load_state_dict: table holds tickets outside [-1, {num_tickets})")
        self._set_state(table.detach().cpu().clone(), num_tickets)

    def __repr__(self) -> str:
        return f"LabelRouter(num_tickets={self.num_tickets}, labels={self._describe_labels()})"


# --------------------------------------------------------------------------------------------------------------
# EnvironmentRouter
# --------------------------------------------------------------------------------------------------------------


class EnvironmentRouter(Router):
    """Environment id or name -> ticket (the paper's speech set-up: one ticket per acoustic scene).

    Environment i (name ``environments[i]``) goes to ticket i, so num_tickets = len(environments).

    Args:
        environments: distinct environment names in ticket order, e.g. ``["noise", "blur", "occlusion"]``.

    Example:
        >>> router = EnvironmentRouter(["indoor", "outdoor", "transportation"])
        >>> router(["outdoor", "indoor"]).tolist(), router(torch.tensor([2])).tolist()
        ([1, 0], [2])
    """

    def __init__(self, environments: Sequence[str]):
        self._set_state(environments)

    def _set_state(self, environments: Any) -> None:
        if isinstance(environments, (str, bytes)) or not isinstance(environments, Sequence):
            raise TypeError(f"environments must be a sequence of names, got {type(environments).__name__}")
        bad = next((e for e in environments if not isinstance(e, str)), None)
        if bad is not None:
            raise TypeError(f"environment names must be str, got {bad!r} ({type(bad).__name__})")
        if not environments:
            raise ValueError("environments is empty: give at least one environment name")
        index: dict[str, int] = {}
        for ticket, name in enumerate(environments):
            if name in index:
                raise ValueError(f"environment {name!r} is listed twice (positions {index[name]} and {ticket})")
            index[name] = ticket
        self.environments = list(environments)
        self.num_tickets = len(self.environments)
        self._index = index

    def __call__(
        self, ids: torch.Tensor | Sequence[int] | Sequence[str], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Route environments to tickets.

        Args:
            ids: environment ids (B,) as an integer tensor or a sequence of ints in [0, num_tickets), or a sequence
                of B environment names.
            device: device of the route built from a sequence (default CPU); a tensor's route stays on its device.

        Returns:
            route (B,) int64.

        Raises:
            ValueError: an unknown name or an id outside [0, num_tickets) (the first one in batch order is named).

        Example:
            >>> EnvironmentRouter(["a", "b"])(["b", "b", "a"]).tolist()
            [1, 1, 0]
        """
        if (
            not isinstance(ids, torch.Tensor)
            and isinstance(ids, Sequence)
            and not isinstance(ids, (str, bytes))
            and any(isinstance(i, str) for i in ids)
        ):
            bad = next((i for i in ids if not isinstance(i, str)), None)
            if bad is not None:
                raise TypeError(f"ids mixes names and non-names, e.g. {bad!r}: give all names or all ints")
            unknown = next((i for i in ids if i not in self._index), None)
            if unknown is not None:
                raise ValueError(f"unknown environment {unknown!r}; known environments: {self.environments}")
            return torch.tensor([self._index[i] for i in ids], dtype=torch.int64, device=device)
        if isinstance(ids, str):
            raise TypeError(f"ids must be a sequence of names or ints, got the single name {ids!r}; wrap it in a list")
        route = _as_index_tensor("ids", ids)
        if device is not None and not isinstance(ids, torch.Tensor):
            route = route.to(device)
        bad = (route < 0) | (route >= self.num_tickets)
        if bool(bad.any()):
            first = int(route[bad.nonzero()[0, 0]])
            raise ValueError(
                f"unknown environment id {first}: ids must be in [0, {self.num_tickets}) ({self.environments})"
            )
        return route.clone() if route is ids else route

    def state_dict(self) -> dict:
        """The router's state: ``{"environments": list of names}`` (saves with torch.save, loads weights_only).

        Example:
            >>> EnvironmentRouter(["a", "b"]).state_dict()
            {'environments': ['a', 'b']}
        """
        return {"environments": list(self.environments)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Replace the environment list by a saved one.

        Args:
            state_dict: ``{"environments": list of names}``, as ``state_dict()`` gives.

        Example:
            >>> r = EnvironmentRouter(["x"]); r.load_state_dict({"environments": ["a", "b"]}); r.num_tickets
            2
        """
        _check_state_keys("EnvironmentRouter", state_dict, {"environments"})
        self._set_state(state_dict["environments"])

    def __repr__(self) -> str:
        return f"EnvironmentRouter({self.environments})"


# --------------------------------------------------------------------------------------------------------------
# ClusterRouter
# --------------------------------------------------------------------------------------------------------------


class ClusterRouter(Router):
    """Label-free routing: each input goes to the ticket of its nearest centroid (squared euclidean distance).

    Build one with :meth:`fit` (k-means on training features) or :meth:`from_partition` (the mean feature of each
    group of a fixed label partition, e.g. the paper's CIFAR-100 Table 5 clusters), or from centroids directly.
    At equal distance the lower ticket wins.

    Args:
        centroids: (T, D) floating tensor, row t is ticket t's centroid.
        feature_fn: optional callable mapping raw inputs (B, ...) to features (B, D), e.g. ``nn.Flatten()`` or a
            frozen encoder; ``router(x)`` then routes ``feature_fn(x)``. It is not part of ``state_dict()``.

    Example:
        >>> router = ClusterRouter(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        >>> router(torch.tensor([[9.0, 8.0], [1.0, -1.0]])).tolist()
        [1, 0]
    """

    def __init__(self, centroids: torch.Tensor, feature_fn: Callable[[Any], torch.Tensor] | None = None):
        self._init_unsaved(feature_fn=feature_fn)
        self._set_state(centroids)

    def _init_unsaved(self, feature_fn: Callable[[Any], torch.Tensor] | None = None) -> None:
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable or None, got {type(feature_fn).__name__}")
        self.feature_fn = feature_fn

    def _set_state(self, centroids: Any) -> None:
        if not isinstance(centroids, torch.Tensor) or not centroids.is_floating_point():
            raise TypeError(
                f"centroids must be a floating tensor (T, D), got "
                f"{getattr(centroids, 'dtype', type(centroids).__name__)}"
            )
        if centroids.dim() != 2 or centroids.shape[0] < 1 or centroids.shape[1] < 1:
            raise ValueError(f"centroids must have shape (T, D) with T, D >= 1, got {tuple(centroids.shape)}")
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError("centroids hold NaN or infinite values")
        self._centroids = centroids.detach().cpu().clone()
        self._centroids_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.num_tickets = int(centroids.shape[0])

    @property
    def centroids(self) -> torch.Tensor:
        """The centroids (T, D), row t for ticket t (a copy, on CPU)."""
        return self._centroids.clone()

    @property
    def num_features(self) -> int:
        """D, the feature size the router expects."""
        return int(self._centroids.shape[1])

    @staticmethod
    def _check_features(name: str, features: Any, num_features: int | None = None) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(
                f"{name} must be a floating tensor (N, D), got {getattr(features, 'dtype', type(features).__name__)}"
            )
        if features.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D (N, D), got shape {tuple(features.shape)}"
                + ("; flatten inputs first or set feature_fn" if features.dim() > 2 else "")
            )
        if num_features is not None and features.shape[1] != num_features:
            raise ValueError(f"{name} have D = {features.shape[1]} features but the centroids have D = {num_features}")
        finite = torch.isfinite(features).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} row {row} holds NaN or infinite values")
        return features.detach()

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        num_tickets: int,
        seed: int = 0,
        feature_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> "ClusterRouter":
        """Cluster training features with scikit-learn k-means; ticket t = cluster t.

        Runs ``sklearn.cluster.KMeans(n_clusters=num_tickets, n_init=10, random_state=seed)`` in float64 and keeps
        its cluster centres, cast to the features' dtype.

        Args:
            features: training features (N, D), floating, N >= num_tickets. These are features already: when the
                router gets a ``feature_fn``, pass ``feature_fn`` of the training inputs here.
            num_tickets: T, the number of clusters.
            seed: k-means random_state (same seed, same centroids).
            feature_fn: stored for routing raw inputs (see the class docstring); not applied to ``features``.

        Returns:
            A ClusterRouter with centroids (T, D).

        Example:
            >>> feats = torch.cat([torch.randn(20, 2), torch.randn(20, 2) + 10])
            >>> router = ClusterRouter.fit(feats, 2, seed=0)
            >>> bool(router(feats[:20]).unique().numel() == 1)
            True
        """
        from sklearn.cluster import KMeans  # scikit-learn is imported only when a router is fitted

        num_tickets = _check_num_tickets(num_tickets)
        features = cls._check_features("features", features)
        if features.shape[0] < num_tickets:
            raise ValueError(f"k-means needs at least num_tickets = {num_tickets} samples, got {features.shape[0]}")
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        kmeans = KMeans(n_clusters=num_tickets, n_init=_KMEANS_N_INIT, random_state=int(seed))
        kmeans.fit(features.cpu().double().numpy())
        centroids = torch.from_numpy(kmeans.cluster_centers_).to(features.dtype)
        return cls(centroids, feature_fn=feature_fn)

    @classmethod
    def from_partition(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        partition: Mapping | Sequence | torch.Tensor | LabelRouter,
        feature_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> "ClusterRouter":
        """Centroid of ticket t = the mean training feature of the samples whose label is in group t.

        This turns a labelled partition (the paper's CIFAR-100 Table 5 clusters) into a router that needs no label
        at inference.

        Args:
            features: training features (N, D), floating.
            labels: their class labels (N,), integer tensor or sequence of ints.
            partition: a list of label groups (ticket k = group k), or anything :class:`LabelRouter` accepts, or a
                LabelRouter. Every label in ``labels`` must be covered and every ticket must have a sample.
            feature_fn: stored for routing raw inputs; not applied to ``features``.

        Returns:
            A ClusterRouter with centroids (T, D) in the features' dtype (means accumulated in float64).

        Example:
            >>> feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
            >>> ClusterRouter.from_partition(feats, [0, 1, 2], [[0, 1], [2]]).centroids.tolist()
            [[1.0, 0.0], [10.0, 10.0]]
        """
        features = cls._check_features("features", features)
        label_router = partition if isinstance(partition, LabelRouter) else LabelRouter(partition)
        labels = _as_index_tensor("labels", labels)
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but features has {features.shape[0]} rows")
        route = label_router(labels.to(features.device))
        num_tickets = label_router.num_tickets
        counts = torch.bincount(route, minlength=num_tickets)
        if bool((counts == 0).any()):
            empty = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"ticket {empty} has no sample in features/labels, so its centroid is undefined")
        sums = torch.zeros(num_tickets, features.shape[1], dtype=torch.float64, device=features.device)
        sums.index_add_(0, route, features.double())
        centroids = (sums / counts.unsqueeze(1).double()).to(features.dtype)
        return cls(centroids, feature_fn=feature_fn)

    def __call__(self, x: Any) -> torch.Tensor:
        """Route to the nearest centroid.

        Args:
            x: features (B, D), floating; or raw inputs (B, ...) when ``feature_fn`` is set, which maps them to
                (B, D). Run under torch.no_grad().

        Returns:
            route (B,) int64 on the features' device; ties go to the lower ticket.

        Example:
            >>> ClusterRouter(torch.tensor([[0.0], [2.0]]))(torch.tensor([[1.0], [1.5]])).tolist()
            [0, 1]
        """
        with torch.no_grad():
            features = self.feature_fn(x) if self.feature_fn is not None else x
            name = "feature_fn(x)" if self.feature_fn is not None else "features"
            features = self._check_features(name, features, self.num_features)
            if (
                self.feature_fn is not None
                and isinstance(x, torch.Tensor)
                and x.dim() >= 1
                and features.shape[0] != x.shape[0]
            ):
                raise ValueError(f"feature_fn(x) has {features.shape[0]} rows but x has batch size {x.shape[0]}")
            dtype = torch.promote_types(features.dtype, self._centroids.dtype)
            key = (features.device, dtype)
            centroids = self._centroids_on.get(key)
            if centroids is None:
                centroids = self._centroids_on[key] = self._centroids.to(device=features.device, dtype=dtype)
            features = features.to(dtype)
            # Differences, not |f|^2 - 2 f.c + |c|^2: the expansion rounds differently per centroid, which would
            # break exact ties (and the lower-ticket rule) and misorder near-equal distances.
            rows = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, centroids.numel()))
            route = torch.empty(features.shape[0], dtype=torch.int64, device=features.device)
            for start in range(0, features.shape[0], rows):
                block = features[start : start + rows]
                dist = (block.unsqueeze(1) - centroids.unsqueeze(0)).square_().sum(dim=2)
                route[start : start + rows] = dist.argmin(dim=1)  # first minimum: ties go to the lower ticket
            return route

    def state_dict(self) -> dict:
        """The router's state: ``{"centroids": (T, D) tensor}`` (feature_fn is not saved).

        Example:
            >>> ClusterRouter(torch.ones(3, 2)).state_dict()["centroids"].shape
            torch.Size([3, 2])
        """
        return {"centroids": self._centroids.clone()}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Replace the centroids by saved ones; ``feature_fn`` is kept.

        Args:
            state_dict: ``{"centroids": (T, D) floating tensor}``.

        Example:
            >>> r = ClusterRouter(torch.zeros(1, 2)); r.load_state_dict({"centroids": torch.ones(4, 2)}); r.num_tickets
            4
        """
        _check_state_keys("ClusterRouter", state_dict, {"centroids"})
        self._set_state(state_dict["centroids"])

    def __repr__(self) -> str:
        fn = "" if self.feature_fn is None else f", feature_fn={self.feature_fn!r}"
        return f"ClusterRouter(num_tickets={self.num_tickets}, num_features={self.num_features}{fn})"


# --------------------------------------------------------------------------------------------------------------
# All-tickets evaluation
# --------------------------------------------------------------------------------------------------------------


def all_tickets_scores(
    routed_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_tickets: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Run every ticket on every input: scores[b, t] = routed_model(x, route filled with t)[b].

    T forward passes per input, under torch.no_grad(). The model's train/eval mode is left to the caller (call
    ``model.eval()`` first so BatchNorm uses running statistics).

    Args:
        routed_model: callable ``(x (B, ...), route (B,) int64) -> logits (B, C)``, e.g. an ``rtl.RoutedModel``.
        x: inputs (B, ...).
        num_tickets: T.
        batch_size: run at most this many inputs per forward (bounds memory); None runs all B at once.

    Returns:
        scores (B, T, C) in the model's output dtype, on its device.

    Example:
        >>> model = lambda x, route: x * (route.unsqueeze(1) + 1)
        >>> all_tickets_scores(model, torch.ones(4, 3), 2)[0].tolist()
        [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """
    if not callable(routed_model):
        raise TypeError(f"routed_model must be callable (x, route) -> logits, got {type(routed_model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (B, ...), got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension (B, ...), got shape {tuple(x.shape)}")
    num_tickets = _check_num_tickets(num_tickets)
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    total = x.shape[0]
    step = total if batch_size is None else int(batch_size)
    # An empty batch still runs once so the result has the model's C.
    starts = range(0, total, step) if total else [0]
    chunks = []
    with torch.no_grad():
        for start in starts:
            xb = x[start : start + step] if total else x
            b = xb.shape[0]
            per_ticket = []
            for t in range(num_tickets):
                route = torch.full((b,), t, dtype=torch.int64, device=x.device)
                out = routed_model(xb, route)
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != b:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"routed_model must return logits (B, C) = ({b}, C) for ticket {t}, got {shape}")
                per_ticket.append(out)
            chunks.append(torch.stack(per_ticket, dim=1))
    return torch.cat(chunks, dim=0)


def all_tickets_predict(
    routed_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_tickets: int,
    combine: str = "own_logit",
    ticket_to_class: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Label-free class predictions from all tickets (docs/paper_notes.md, choice 10: the paper gives no rule).

    Runs :func:`all_tickets_scores` (T forwards per input) and combines the scores s (B, T, C):

    - ``"own_logit"``: for one-ticket-per-class models, where each ticket is a one-vs-rest detector of its own
      class (as the paper trains them). Ticket t's own class is c_t = ``ticket_to_class[t]`` (default c_t = t);
      its detection score is s[b, t, c_t], and the prediction is c_{t*} with t* = argmax_t s[b, t, c_t].
    - ``"max_softmax"``: the most confident ticket decides: t* = argmax_t max_c softmax(s[b, t])_c, prediction
      argmax_c s[b, t*, c].
    - ``"mean_logits"``: argmax_c of the mean over tickets of s[b, t, c].

    Ties go to the lower ticket and the lower class.

    Args:
        routed_model: callable ``(x (B, ...), route (B,) int64) -> logits (B, C)``, e.g. an ``rtl.RoutedModel``.
        x: inputs (B, ...).
        num_tickets: T.
        combine: one of :data:`COMBINE_RULES`.
        ticket_to_class: only for ``"own_logit"``: the class of each ticket, T ints in [0, C). Default: ticket t is
            class t (needs T <= C).
        batch_size: passed to :func:`all_tickets_scores`.

    Returns:
        predicted classes (B,) int64.

    Example:
        >>> model = lambda x, route: torch.nn.functional.one_hot(route, 3).float() * x
        >>> all_tickets_predict(model, torch.tensor([[1.0, 5.0, 2.0]]), 3).tolist()
        [1]
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if ticket_to_class is not None and combine != "own_logit":
        raise ValueError(f"ticket_to_class only applies to combine='own_logit', got combine={combine!r}")
    num_tickets = _check_num_tickets(num_tickets)
    if ticket_to_class is not None:
        ticket_to_class = _as_index_tensor("ticket_to_class", ticket_to_class)
        if ticket_to_class.shape[0] != num_tickets:
            raise ValueError(
                f"ticket_to_class must have num_tickets = {num_tickets} entries, got {ticket_to_class.shape[0]}"
            )
    scores = all_tickets_scores(routed_model, x, num_tickets, batch_size=batch_size)
    num_classes = scores.shape[2]
    if combine == "mean_logits":
        return scores.mean(dim=1).argmax(dim=1)
    if combine == "max_softmax":
        confidence = scores.softmax(dim=2).amax(dim=2)  # (B, T)
        best = confidence.argmax(dim=1)
        return scores[torch.arange(scores.shape[0], device=scores.device), best].argmax(dim=1)
    if ticket_to_class is None:
        if num_tickets > num_classes:
            raise ValueError(
                f"combine='own_logit' without ticket_to_class needs num_tickets <= C, got "
                f"num_tickets = {num_tickets} and C = {num_classes}"
            )
        ticket_to_class = torch.arange(num_tickets)
    bad = (ticket_to_class < 0) | (ticket_to_class >= num_classes)
    if bool(bad.any()):
        first = int(ticket_to_class[bad.nonzero()[0, 0]])
        raise ValueError(f"ticket_to_class holds class {first}, outside [0, {num_classes}) (C of the model output)")
    ticket_to_class = ticket_to_class.to(scores.device)
    own = scores.gather(2, ticket_to_class.view(1, -1, 1).expand(scores.shape[0], -1, 1)).squeeze(2)  # (B, T)
    return ticket_to_class[own.argmax(dim=1)]
