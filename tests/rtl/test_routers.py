"""rtl.routers: label, environment and cluster routing, saved state, and all-tickets evaluation.

Oracles are independent: Python dict look-ups for label routing, float64 brute-force distances for the nearest
centroid, per-group loops for partition means, and per-sample loops over hand-built score tensors for the
all-tickets rules.
"""

import io

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import rtl
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear
from rtl.routers import (
    COMBINE_RULES,
    ClusterRouter,
    EnvironmentRouter,
    LabelRouter,
    all_tickets_predict,
    all_tickets_scores,
)

# Group sizes of the paper's CIFAR-100 Table 5 partition (8 clusters over 100 classes).
TABLE5_SIZES = [9, 28, 22, 15, 8, 9, 4, 5]


def random_partition(sizes, seed):
    """A partition of range(sum(sizes)) into groups of the given sizes, in a random label order."""
    perm = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    groups, start = [], 0
    for size in sizes:
        groups.append(perm[start : start + size])
        start += size
    return groups


def save_load(state):
    """torch.save then torch.load(weights_only=True), as a checkpoint round trip."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------------------------
# LabelRouter
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dict", "sequence", "tensor", "partition", "partition_tensors", "partition_sets"])
def test_label_router_mapping_forms(form):
    # labels 0..6 -> tickets, with ticket 1 holding three labels
    target = {0: 2, 1: 1, 2: 0, 3: 1, 4: 2, 5: 1, 6: 0}
    groups = [[2, 6], [1, 3, 5], [0, 4]]
    mapping = {
        "dict": target,
        "sequence": [target[c] for c in range(7)],
        "tensor": torch.tensor([target[c] for c in range(7)]),
        "partition": groups,
        "partition_tensors": [torch.tensor(g) for g in groups],
        "partition_sets": [set(g) for g in groups],
    }[form]
    router = LabelRouter(mapping)
    assert router.num_tickets == 3
    labels = torch.randint(0, 7, (37,), generator=torch.Generator().manual_seed(1))
    route = router(labels)
    assert route.dtype == torch.int64 and route.shape == (37,)
    assert route.tolist() == [target[c] for c in labels.tolist()]
    assert router(labels.tolist()).tolist() == route.tolist()
    assert router.groups == groups


@pytest.mark.parametrize("seed", [0, 1])
def test_label_router_table5_sized_partition(seed):
    groups = random_partition(TABLE5_SIZES, seed)
    router = LabelRouter(groups)
    assert router.num_tickets == 8
    oracle = {label: k for k, group in enumerate(groups) for label in group}
    labels = torch.randint(0, 100, (301,), generator=torch.Generator().manual_seed(seed))
    assert router(labels).tolist() == [oracle[c] for c in labels.tolist()]
    assert router(torch.arange(100)).bincount().tolist() == TABLE5_SIZES
    assert router.groups == [sorted(g) for g in groups]


@pytest.mark.parametrize("num_classes", [1, 2, 10, 13])
def test_label_router_identity(num_classes):
    router = LabelRouter.identity(num_classes)
    assert router.num_tickets == num_classes
    labels = torch.randint(0, num_classes, (19,), generator=torch.Generator().manual_seed(num_classes))
    assert torch.equal(router(labels), labels)
    with pytest.raises(ValueError, match=f"label {num_classes} has no ticket"):
        router(torch.tensor([0, num_classes]))


def test_label_router_empty_tickets_and_explicit_num_tickets():
    router = LabelRouter([[0, 1], [], [2]])  # ticket 1 is empty: legal, it just receives nothing
    assert router.num_tickets == 3
    assert router([0, 2, 1]).tolist() == [0, 2, 0]
    router = LabelRouter({0: 1}, num_tickets=5)
    assert router.num_tickets == 5 and router([0]).tolist() == [1]
    assert LabelRouter([[]]).num_tickets == 1


def test_label_router_keeps_device_and_int32_labels():
    router = LabelRouter([1, 0, 1])
    route = router(torch.tensor([2, 0, 1], dtype=torch.int32))
    assert route.dtype == torch.int64 and route.tolist() == [1, 1, 0]
    assert router(torch.empty(0, dtype=torch.int64)).shape == (0,)


@pytest.mark.parametrize(
    "labels, first",
    [
        ([0, 7, 9], 7),  # past the end of the table
        ([1, -2, 8], -2),  # negative
        ([2, 3, 5, 3], 3),  # a hole inside the table (label 3 is not mapped)
    ],
)
def test_label_router_unknown_labels(labels, first):
    router = LabelRouter({0: 0, 1: 1, 2: 0, 4: 1, 5: 0})
    with pytest.raises(ValueError, match=rf"label {first} has no ticket"):
        router(torch.tensor(labels))


def test_label_router_unknown_label_with_empty_table():
    with pytest.raises(ValueError, match="label 0 has no ticket"):
        LabelRouter([[]])(torch.tensor([0]))


@pytest.mark.parametrize(
    "mapping, kwargs, exc, match",
    [
        ([[0, 1], [2, 1]], {}, ValueError, r"label 1 is in two groups \(tickets 0 and 1\)"),
        ({0: 0, 1: 3}, {"num_tickets": 3}, ValueError, r"label 1 to ticket 3, outside \[0, 3\)"),
        ({0: -1, 1: 0}, {}, ValueError, r"label 0 to ticket -1, outside"),
        ({-1: 0}, {}, ValueError, "labels must be non-negative, got -1"),
        ([[0], [-3]], {}, ValueError, "labels must be non-negative, got -3"),
        ({0.5: 0}, {}, TypeError, "labels must be ints, got 0.5"),
        ({True: 0}, {}, TypeError, "labels must be ints, got True"),
        ([0, 1.0], {}, TypeError, "tickets must be ints, got 1.0"),
        ([[0, 1], 2], {}, TypeError, "mapping mixes groups"),
        ({}, {}, ValueError, "mapping is empty"),
        ([], {}, ValueError, "mapping is empty"),
        ("abc", {}, TypeError, "mapping must be a dict"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "mapping as a tensor must be 1-D integer"),
        ([0, 1], {"num_tickets": 0}, ValueError, "num_tickets must be a positive int, got 0"),
    ],
)
def test_label_router_bad_mapping(mapping, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LabelRouter(mapping, **kwargs)


@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (torch.tensor([0.0, 1.0]), TypeError, "labels must have an integer dtype, got torch.float32"),
        (torch.tensor([True, False]), TypeError, "labels must have an integer dtype, got torch.bool"),
        (torch.tensor([[0, 1]]), ValueError, r"labels must be 1-D \(B,\), got shape \(1, 2\)"),
        ([0, "a"], TypeError, "labels must hold ints, got 'a'"),
        ("01", TypeError, "labels must be an integer tensor"),
    ],
)
def test_label_router_bad_labels(labels, exc, match):
    with pytest.raises(exc, match=match):
        LabelRouter.identity(3)(labels)


def test_label_router_identity_bad_num_classes():
    with pytest.raises(ValueError, match="num_tickets must be a positive int, got -1"):
        LabelRouter.identity(-1)


# --------------------------------------------------------------------------------------------------------------
# EnvironmentRouter
# --------------------------------------------------------------------------------------------------------------


def test_environment_router_names_and_ids():
    router = EnvironmentRouter(["noise", "blur", "occlusion"])
    assert router.num_tickets == 3
    assert router(["blur", "occlusion", "noise", "blur"]).tolist() == [1, 2, 0, 1]
    ids = torch.tensor([2, 0, 1], dtype=torch.int16)
    route = router(ids)
    assert route.dtype == torch.int64 and route.tolist() == [2, 0, 1]
    assert router([0, 2]).tolist() == [0, 2]
    assert router([]).shape == (0,)
    same = torch.tensor([1, 1])
    out = router(same)
    out[0] = 0
    assert same.tolist() == [1, 1]  # the route is a new tensor, not the caller's ids
    assert EnvironmentRouter(["only"])(["only"]).tolist() == [0]


@pytest.mark.parametrize(
    "ids, exc, match",
    [
        (["noise", "rain"], ValueError, r"unknown environment 'rain'; known environments: \['noise', 'blur'\]"),
        (torch.tensor([0, 2, 5]), ValueError, r"unknown environment id 2: ids must be in \[0, 2\)"),
        ([1, -1], ValueError, "unknown environment id -1"),
        ("noise", TypeError, "got the single name 'noise'; wrap it in a list"),
        (["noise", 1], TypeError, "ids mixes names and non-names, e.g. 1"),
        (torch.tensor([0.0]), TypeError, "ids must have an integer dtype"),
        (torch.tensor([[0]]), ValueError, r"ids must be 1-D"),
    ],
)
def test_environment_router_bad_ids(ids, exc, match):
    with pytest.raises(exc, match=match):
        EnvironmentRouter(["noise", "blur"])(ids)


@pytest.mark.parametrize(
    "environments, exc, match",
    [
        (["a", "b", "a"], ValueError, r"environment 'a' is listed twice \(positions 0 and 2\)"),
        ([], ValueError, "environments is empty"),
        ("ab", TypeError, "environments must be a sequence of names, got str"),
        (["a", 3], TypeError, "environment names must be str, got 3"),
    ],
)
def test_environment_router_bad_environments(environments, exc, match):
    with pytest.raises(exc, match=match):
        EnvironmentRouter(environments)


# --------------------------------------------------------------------------------------------------------------
# ClusterRouter
# --------------------------------------------------------------------------------------------------------------


def make_blobs(num_blobs, dim, per_blob, seed, spread=0.3):
    """Well-separated Gaussian blobs: centres 20 apart along distinct directions, small spread."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blobs, dim, generator=gen, dtype=torch.float64)
    centres = 20.0 * centres / centres.norm(dim=1, keepdim=True) * torch.arange(1, num_blobs + 1).unsqueeze(1)
    truth = torch.arange(num_blobs).repeat_interleave(per_blob)
    feats = centres[truth] + spread * torch.randn(truth.numel(), dim, generator=gen, dtype=torch.float64)
    order = torch.randperm(truth.numel(), generator=gen)
    return feats[order].float(), truth[order], centres


def brute_nearest(features, centroids):
    """float64 nearest centroid by explicit loops over tickets; the first minimum wins."""
    f, c = features.double(), centroids.double()
    best_d = torch.full((f.shape[0],), float("inf"), dtype=torch.float64)
    best = torch.zeros(f.shape[0], dtype=torch.int64)
    for t in range(c.shape[0]):
        d = ((f - c[t]) ** 2).sum(dim=1)
        closer = d < best_d
        best[closer], best_d[closer] = t, d[closer]
    return best


@pytest.mark.parametrize("num_blobs, dim", [(1, 3), (3, 5), (5, 7), (6, 2)])
def test_cluster_router_kmeans_recovers_blobs(num_blobs, dim):
    feats, truth, _ = make_blobs(num_blobs, dim, per_blob=23, seed=num_blobs)
    router = ClusterRouter.fit(feats, num_blobs, seed=0)
    assert router.num_tickets == num_blobs and router.centroids.shape == (num_blobs, dim)
    assert router.centroids.dtype == torch.float32
    route = router(feats)
    assert route.dtype == torch.int64
    assert adjusted_rand_score(truth.numpy(), route.numpy()) == pytest.approx(1.0)
    # Fresh points from the same blobs land in the same clusters: label-free routing generalises.
    test_feats, test_truth, _ = make_blobs(num_blobs, dim, per_blob=7, seed=num_blobs)
    assert adjusted_rand_score(test_truth.numpy(), router(test_feats).numpy()) == pytest.approx(1.0)


def test_cluster_router_fit_is_seeded():
    feats = torch.randn(60, 4, generator=torch.Generator().manual_seed(3))  # no structure: seeds matter
    a = ClusterRouter.fit(feats, 4, seed=7)
    b = ClusterRouter.fit(feats, 4, seed=7)
    assert torch.equal(a.centroids, b.centroids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[3, 1, 4], [2], TABLE5_SIZES])
def test_cluster_router_from_partition_centroids_are_group_means(dtype, sizes):
    groups = random_partition(sizes, seed=len(sizes))
    num_classes = sum(sizes)
    gen = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.arange(num_classes), torch.randint(0, num_classes, (61,), generator=gen)])
    feats = torch.randn(labels.numel(), 11, generator=gen, dtype=dtype)
    router = ClusterRouter.from_partition(feats, labels, groups)
    assert router.num_tickets == len(sizes)
    assert router.centroids.dtype == dtype
    for k, group in enumerate(groups):
        members = [i for i, c in enumerate(labels.tolist()) if c in group]
        expected = feats.double()[members].mean(dim=0)
        torch.testing.assert_close(
            router.centroids[k].double(), expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12
        )
    # A LabelRouter is accepted as the partition too.
    again = ClusterRouter.from_partition(feats, labels.tolist(), LabelRouter(groups))
    assert torch.equal(again.centroids, router.centroids)


def test_cluster_router_from_partition_routes_groups_without_labels():
    feats, truth, _ = make_blobs(3, 4, per_blob=15, seed=2)
    # six classes, two per blob: class = 2 * blob + parity of the sample index
    labels = 2 * truth + torch.arange(truth.numel()) % 2
    router = ClusterRouter.from_partition(feats, labels, [[0, 1], [2, 3], [4, 5]])
    assert torch.equal(router(feats), truth)


@pytest.mark.parametrize(
    "labels, partition, match",
    [
        ([0, 1, 1, 0], [[0], [1], [2]], "ticket 2 has no sample"),
        ([0, 1, 3, 0], [[0], [1]], "label 3 has no ticket"),
        ([0, 1, 1], [[0], [1]], "labels has 3 entries but features has 4 rows"),
    ],
)
def test_cluster_router_from_partition_errors(labels, partition, match):
    with pytest.raises(ValueError, match=match):
        ClusterRouter.from_partition(torch.randn(4, 2), labels, partition)


def test_cluster_router_ties_go_to_lower_ticket():
    centroids = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [1.0, 5.0]])
    router = ClusterRouter(centroids)
    feats = torch.tensor(
        [
            [1.0, 0.0],  # distance 1 to tickets 0, 1 and 2 -> 0
            [2.0, 0.0],  # on tickets 1 and 2 (identical centroids) -> 1
            [0.5, 2.5],  # 6.5 to tickets 0 and 3, 8.5 to 1 and 2 -> 0
            [3.0, 0.0],  # 1 to tickets 1 and 2 -> 1
            [1.0, 4.0],  # nearest is 3
        ]
    )
    for dtype in (torch.float32, torch.float64):
        assert router(feats.to(dtype)).tolist() == [0, 1, 0, 1, 3]


@pytest.mark.parametrize("batch, num_tickets, dim", [(1, 1, 1), (37, 5, 3), (200, 64, 1031)])
def test_cluster_router_matches_brute_force(batch, num_tickets, dim):
    # (200, 64, 1031) has more than one distance block, so the blocked search is exercised.
    gen = torch.Generator().manual_seed(batch)
    centroids = torch.randn(num_tickets, dim, generator=gen)
    feats = torch.randn(batch, dim, generator=gen)
    router = ClusterRouter(centroids)
    assert torch.equal(router(feats), brute_nearest(feats, centroids))
    assert router(torch.empty(0, dim)).shape == (0,)


def test_cluster_router_feature_fn():
    gen = torch.Generator().manual_seed(0)
    centroids = torch.randn(3, 16, generator=gen)
    x = torch.randn(9, 1, 4, 4, generator=gen)
    router = ClusterRouter(centroids, feature_fn=torch.nn.Flatten())
    assert torch.equal(router(x), brute_nearest(x.flatten(1), centroids))
    # The feature_fn output is checked like direct features.
    with pytest.raises(ValueError, match=r"feature_fn\(x\) have D = 8 features but the centroids have D = 16"):
        ClusterRouter(centroids, feature_fn=lambda v: v.flatten(1)[:, :8])(x)
    with pytest.raises(ValueError, match=r"feature_fn\(x\) has 8 rows but x has batch size 9"):
        ClusterRouter(centroids, feature_fn=lambda v: v.flatten(1)[:8])(x)
    with pytest.raises(TypeError, match="feature_fn must be callable or None, got int"):
        ClusterRouter(centroids, feature_fn=3)


def test_cluster_router_feature_fn_runs_without_grad():
    encoder = torch.nn.Linear(6, 2)
    seen = []

    def feature_fn(v):
        seen.append(torch.is_grad_enabled())
        return encoder(v)

    router = ClusterRouter(torch.randn(3, 2), feature_fn=feature_fn)
    router(torch.randn(5, 6))
    assert seen == [False]


@pytest.mark.parametrize(
    "features, exc, match",
    [
        (torch.randn(4, 5), ValueError, "features have D = 5 features but the centroids have D = 3"),
        (torch.randn(4, 3, 1), ValueError, r"features must be 2-D \(N, D\), got shape \(4, 3, 1\); flatten"),
        (torch.randint(0, 3, (4, 3)), TypeError, "features must be a floating tensor"),
        ([[0.0, 1.0, 2.0]], TypeError, "features must be a floating tensor"),
        (torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]]), ValueError, "features row 1 holds NaN"),
    ],
)
def test_cluster_router_bad_features(features, exc, match):
    with pytest.raises(exc, match=match):
        ClusterRouter(torch.randn(2, 3))(features)


@pytest.mark.parametrize(
    "centroids, exc, match",
    [
        (torch.randn(3), ValueError, r"centroids must have shape \(T, D\)"),
        (torch.randn(0, 3), ValueError, r"centroids must have shape \(T, D\) with T, D >= 1, got \(0, 3\)"),
        (torch.ones(2, 2, dtype=torch.int64), TypeError, "centroids must be a floating tensor"),
        (torch.tensor([[float("inf")]]), ValueError, "centroids hold NaN or infinite values"),
    ],
)
def test_cluster_router_bad_centroids(centroids, exc, match):
    with pytest.raises(exc, match=match):
        ClusterRouter(centroids)


def test_cluster_router_fit_errors():
    with pytest.raises(ValueError, match="k-means needs at least num_tickets = 5 samples, got 4"):
        ClusterRouter.fit(torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match="num_tickets must be a positive int, got 0"):
        ClusterRouter.fit(torch.randn(4, 2), 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        ClusterRouter.fit(torch.randn(4, 2), 2, seed=0.5)


# --------------------------------------------------------------------------------------------------------------
# Saved state
# --------------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_label_router():
    router = LabelRouter(random_partition(TABLE5_SIZES, seed=3), num_tickets=9)
    loaded = LabelRouter.from_state_dict(save_load(router.state_dict()))
    labels = torch.randint(0, 100, (50,), generator=torch.Generator().manual_seed(0))
    assert loaded.num_tickets == 9 and torch.equal(loaded(labels), router(labels))
    other = LabelRouter.identity(2)
    other.load_state_dict(save_load(router.state_dict()))
    assert torch.equal(other(labels), router(labels))
    with pytest.raises(ValueError, match="label 100 has no ticket"):
        loaded(torch.tensor([100]))


def test_state_dict_round_trip_environment_router():
    router = EnvironmentRouter(["indoor", "outdoor", "transportation"])
    loaded = EnvironmentRouter.from_state_dict(save_load(router.state_dict()))
    assert loaded.environments == router.environments
    assert loaded(["transportation", "indoor"]).tolist() == [2, 0]


def test_state_dict_round_trip_cluster_router():
    feats, _, _ = make_blobs(4, 6, per_blob=10, seed=4)
    router = ClusterRouter.fit(feats, 4, seed=1, feature_fn=lambda v: v)
    state = save_load(router.state_dict())
    loaded = ClusterRouter.from_state_dict(state)
    assert loaded.feature_fn is None and torch.equal(loaded.centroids, router.centroids)
    assert torch.equal(loaded(feats), router(feats))
    with_fn = ClusterRouter.from_state_dict(state, feature_fn=torch.nn.Flatten())
    assert torch.equal(with_fn(feats.view(-1, 2, 3)), router(feats))


@pytest.mark.parametrize(
    "router, state, exc, match",
    [
        (LabelRouter([0, 1]), {"table": torch.tensor([0, 1])}, ValueError, r"expected keys \['num_tickets', 'table'\]"),
        (
            LabelRouter([0, 1]),
            {"table": torch.tensor([0, 2]), "num_tickets": 2},
            ValueError,
            r"table holds tickets outside \[-1, 2\)",
        ),
        (
            LabelRouter([0, 1]),
            {"table": torch.tensor([0.0]), "num_tickets": 2},
            ValueError,
            "table must be a 1-D int64 tensor",
        ),
        (LabelRouter([0, 1]), [1, 2], TypeError, "state_dict must be a mapping, got list"),
        (EnvironmentRouter(["a"]), {"environments": ["a", "a"]}, ValueError, "listed twice"),
        (ClusterRouter(torch.ones(1, 1)), {"centroids": torch.ones(2)}, ValueError, "centroids must have shape"),
        (ClusterRouter(torch.ones(1, 1)), {"centroids": torch.ones(2, 1), "x": 1}, ValueError, "expected keys"),
    ],
)
def test_load_state_dict_errors(router, state, exc, match):
    with pytest.raises(exc, match=match):
        router.load_state_dict(state)


def test_from_state_dict_rejects_unknown_arguments():
    with pytest.raises(TypeError, match=r"LabelRouter.from_state_dict got unexpected arguments \['feature_fn'\]"):
        LabelRouter.from_state_dict(LabelRouter([0]).state_dict(), feature_fn=None)


# --------------------------------------------------------------------------------------------------------------
# All-tickets evaluation
# --------------------------------------------------------------------------------------------------------------


class TableModel:
    """A fake routed model: x (B, 1) holds sample ids; output = scores[id, route] from a known (N, T, C) table.

    It records every route it sees and whether autograd was on, so the tests can check how it was called.
    """

    def __init__(self, scores):
        self.scores = scores
        self.routes = []
        self.grad_enabled = []

    def __call__(self, x, route):
        self.routes.append(route.clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.scores[x[:, 0].long(), route]


def sample_ids(n):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def loop_predict(scores, combine, ticket_to_class=None):
    """Per-sample Python loops over a (B, T, C) table: the rules written out one by one."""
    b_size, t_size, c_size = scores.shape
    t2c = list(range(t_size)) if ticket_to_class is None else list(ticket_to_class)
    preds = []
    for b in range(b_size):
        s = scores[b].double().tolist()
        if combine == "own_logit":
            own = [s[t][t2c[t]] for t in range(t_size)]
            preds.append(t2c[own.index(max(own))])
        elif combine == "max_softmax":
            conf = [max(torch.tensor(s[t]).softmax(0).tolist()) for t in range(t_size)]
            best = conf.index(max(conf))
            preds.append(s[best].index(max(s[best])))
        else:
            mean = [sum(s[t][c] for t in range(t_size)) / t_size for c in range(c_size)]
            preds.append(mean.index(max(mean)))
    return preds


@pytest.mark.parametrize(
    "batch, num_tickets, num_classes, batch_size",
    [
        (1, 1, 1, None),
        (7, 3, 5, None),
        (7, 3, 5, 3),
        (10, 4, 4, 10),
        (10, 4, 4, 11),
        (13, 2, 9, 1),
    ],
)
def test_all_tickets_scores_stack_every_ticket(batch, num_tickets, num_classes, batch_size):
    table = torch.randn(batch, num_tickets, num_classes, generator=torch.Generator().manual_seed(batch))
    model = TableModel(table)
    scores = all_tickets_scores(model, sample_ids(batch), num_tickets, batch_size=batch_size)
    assert scores.shape == (batch, num_tickets, num_classes)
    assert torch.equal(scores, table)
    chunks = -(-batch // (batch_size or batch))
    assert len(model.routes) == chunks * num_tickets
    for i, route in enumerate(model.routes):  # every call holds one ticket only, in ticket order per chunk
        assert route.dtype == torch.int64 and (route == i % num_tickets).all()
    assert model.grad_enabled and not any(model.grad_enabled)


def test_all_tickets_scores_empty_batch():
    model = TableModel(torch.randn(3, 2, 4))
    assert all_tickets_scores(model, torch.empty(0, 1), 2).shape == (0, 2, 4)
    assert all_tickets_predict(model, torch.empty(0, 1), 2).shape == (0,)


def test_all_tickets_rules_disagree_on_a_hand_built_case():
    # One sample, T = 3 tickets, C = 4 classes. Ticket t's own class is t.
    table = torch.tensor(
        [
            [
                [2.0, 0.0, 0.0, 0.0],  # own score 2.0; confidence 0.711
                [2.9, 3.0, 0.0, 0.0],  # own score 3.0 (the highest); confidence 0.499
                [-1.0, -1.0, 0.5, 2.6],  # own score 0.5; confidence 0.850 (most confident), its argmax is class 3
            ]
        ]
    )  # mean over tickets: [1.30, 0.67, 0.17, 0.87] -> class 0
    model = TableModel(table)
    x = sample_ids(1)
    assert all_tickets_predict(model, x, 3, combine="own_logit").tolist() == [1]
    assert all_tickets_predict(model, x, 3, combine="max_softmax").tolist() == [3]
    assert all_tickets_predict(model, x, 3, combine="mean_logits").tolist() == [0]
    # Tickets 0, 1, 2 detecting classes 3, 2, 0: own scores are 0.0, 0.0, -1.0 -> ticket 0 (tie: lower) -> class 3
    assert all_tickets_predict(model, x, 3, ticket_to_class=[3, 2, 0]).tolist() == [3]
    # ... and classes 2, 0, 3: own scores 0.0, 2.9, 2.6 -> ticket 1 -> class 0
    assert all_tickets_predict(model, x, 3, ticket_to_class=torch.tensor([2, 0, 3])).tolist() == [0]


@pytest.mark.parametrize("combine", COMBINE_RULES)
@pytest.mark.parametrize("batch, num_tickets, num_classes", [(1, 1, 1), (17, 3, 3), (9, 5, 7), (23, 2, 11)])
def test_all_tickets_predict_matches_loops(combine, batch, num_tickets, num_classes):
    table = 3 * torch.randn(batch, num_tickets, num_classes, generator=torch.Generator().manual_seed(num_classes))
    model = TableModel(table)
    pred = all_tickets_predict(model, sample_ids(batch), num_tickets, combine=combine, batch_size=4)
    assert pred.dtype == torch.int64 and pred.shape == (batch,)
    assert pred.tolist() == loop_predict(table, combine)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_tickets_own_logit_with_ticket_to_class(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tickets, num_classes = 4, 9
    ticket_to_class = torch.randperm(num_classes, generator=gen)[:num_tickets].tolist()
    table = torch.randn(15, num_tickets, num_classes, generator=gen)
    pred = all_tickets_predict(TableModel(table), sample_ids(15), num_tickets, ticket_to_class=ticket_to_class)
    assert pred.tolist() == loop_predict(table, "own_logit", ticket_to_class)
    assert set(pred.tolist()) <= set(ticket_to_class)


def test_all_tickets_ties_go_to_lower_ticket_and_class():
    table = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    model = TableModel(table)
    # own_logit: tickets 0 and 1 tie (own scores 1, 1, 0) -> ticket 0 -> class 0 (ticket 1 would give class 1).
    # max_softmax: tickets 0 and 1 tie on confidence, and classes 0 and 1 tie in their logits -> class 0.
    # mean_logits: classes 0 and 1 tie -> class 0.
    for combine in COMBINE_RULES:
        assert all_tickets_predict(model, sample_ids(1), 3, combine=combine).tolist() == [0]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"combine": "vote"},
            ValueError,
            r"combine must be one of \('own_logit', 'max_softmax', 'mean_logits'\), got 'vote'",
        ),
        (
            {"combine": "mean_logits", "ticket_to_class": [0, 1, 2]},
            ValueError,
            "ticket_to_class only applies to combine='own_logit'",
        ),
        ({"ticket_to_class": [0, 1]}, ValueError, "ticket_to_class must have num_tickets = 3 entries, got 2"),
        ({"ticket_to_class": [0, 4, 1]}, ValueError, r"ticket_to_class holds class 4, outside \[0, 4\)"),
        ({"ticket_to_class": [0, -1, 1]}, ValueError, "ticket_to_class holds class -1"),
        ({"ticket_to_class": [0.0, 1.0, 2.0]}, TypeError, "ticket_to_class must hold ints"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int or None, got 0"),
    ],
)
def test_all_tickets_predict_bad_arguments(kwargs, exc, match):
    model = TableModel(torch.randn(2, 3, 4))
    with pytest.raises(exc, match=match):
        all_tickets_predict(model, sample_ids(2), 3, **kwargs)


def test_all_tickets_own_logit_needs_enough_classes():
    model = TableModel(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="needs num_tickets <= C, got num_tickets = 5 and C = 3"):
        all_tickets_predict(model, sample_ids(2), 5)


@pytest.mark.parametrize(
    "model, x, num_tickets, exc, match",
    [
        (
            lambda x, route: x[:, 0],
            torch.randn(3, 2),
            2,
            ValueError,
            r"must return logits \(B, C\) = \(3, C\) for ticket 0, got \(3,\)",
        ),
        (lambda x, route: x[:2], torch.randn(3, 2), 2, ValueError, r"for ticket 0, got \(2, 2\)"),
        (lambda x, route: [x], torch.randn(3, 2), 2, ValueError, "got list"),
        ("model", torch.randn(3, 2), 2, TypeError, "routed_model must be callable"),
        (lambda x, route: x, [[1.0]], 2, TypeError, "x must be a tensor"),
        (lambda x, route: x, torch.tensor(1.0), 2, ValueError, "x must have a batch dimension"),
        (lambda x, route: x, torch.randn(3, 2), 0, ValueError, "num_tickets must be a positive int, got 0"),
    ],
)
def test_all_tickets_scores_bad_input(model, x, num_tickets, exc, match):
    with pytest.raises(exc, match=match):
        all_tickets_scores(model, x, num_tickets)


@pytest.mark.parametrize("num_tickets", [1, 3])
def test_all_tickets_on_a_routed_model(num_tickets):
    torch.manual_seed(num_tickets)
    model = torch.nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        RoutedSparseLinear(4 * 8 * 8, 10, num_tickets),
    )
    for _, layer in rtl.routed_modules(model):
        layer.weight_masks.copy_(torch.rand(layer.weight_masks.shape) > 0.4)
    routed = rtl.RoutedModel(model).eval()
    x = torch.randn(5, 1, 8, 8)
    scores = all_tickets_scores(routed, x, num_tickets, batch_size=2)
    assert scores.shape == (5, num_tickets, 10) and not scores.requires_grad
    for t in range(num_tickets):
        expected = routed(x, torch.full((5,), t, dtype=torch.int64)).detach()
        torch.testing.assert_close(scores[:, t], expected)
    assert (
        all_tickets_predict(routed, x, num_tickets, combine="mean_logits").tolist() == scores.mean(1).argmax(1).tolist()
    )
