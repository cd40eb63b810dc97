"""rtl.metrics: macro one-vs-rest classification metrics, ticket detector metrics, PSNR and parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio
from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score
from torch import nn

from rtl.metrics import balanced_accuracy, detector_metrics, macro_precision, macro_recall, parameter_counts, psnr
from rtl.nn import RoutedSparseConv2d, RoutedSparseLinear


def _reference_ovr(y_true, y_pred, labels):
    """Per-class (TPR, TNR, precision) by plain counting in float64; 0 where undefined."""
    out = []
    for c in labels:
        pos, pred = y_true == c, y_pred == c
        tp, fn = np.sum(pos & pred), np.sum(pos & ~pred)
        fp, tn = np.sum(~pos & pred), np.sum(~pos & ~pred)
        tpr = tp / (tp + fn) if tp + fn else 0.0
        tnr = tn / (tn + fp) if tn + fp else 0.0
        prec = tp / (tp + fp) if tp + fp else 0.0
        out.append((tpr, tnr, prec))
    return np.array(out, dtype=np.float64)


def _random_labels(n, num_classes, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, num_classes, n), g.integers(0, num_classes, n)


# -- classification ---------------------------------------------------------------------------------------------------
def test_hand_values():
    y_true, y_pred = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + (1 + 2 / 3) / 2 + 1) / 3, abs=1e-15)
    assert macro_precision(y_true, y_pred) == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-15)
    assert macro_recall(y_true, y_pred) == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-15)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 17])
@pytest.mark.parametrize("n", [1, 7, 301])
def test_against_counting_and_sklearn(num_classes, n):
    y_true, y_pred = _random_labels(n, num_classes, seed=num_classes * 1000 + n)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    ref = _reference_ovr(y_true, y_pred, labels)
    ba = balanced_accuracy(torch.from_numpy(y_true), torch.from_numpy(y_pred))
    assert ba == pytest.approx(((ref[:, 0] + ref[:, 1]) / 2).mean(), abs=1e-12)
    assert macro_precision(y_true, y_pred) == pytest.approx(ref[:, 2].mean(), abs=1e-12)
    assert macro_recall(list(y_true), list(y_pred)) == pytest.approx(ref[:, 0].mean(), abs=1e-12)
    assert macro_precision(y_true, y_pred) == pytest.approx(
        precision_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12
    )
    # sklearn's "balanced accuracy" is macro recall, not the one-vs-rest balanced accuracy.
    if set(y_true.tolist()) >= set(y_pred.tolist()) and len(labels) > 1:
        assert macro_recall(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize("recall, expected", [(0.480, 0.711), (0.518, 0.732)])
def test_paper_consistency_identity(recall, expected):
    # 10 balanced classes, each with exactly `recall` of its samples right and the errors spread at random.
    per_class, num_classes = 500, 10
    g = np.random.default_rng(0)
    y_true = np.repeat(np.arange(num_classes), per_class)
    y_pred = y_true.copy()
    correct = round(recall * per_class)
    for c in range(num_classes):
        wrong = np.arange(c * per_class + correct, (c + 1) * per_class)
        y_pred[wrong] = (c + g.integers(1, num_classes, wrong.size)) % num_classes
    assert macro_recall(y_true, y_pred) == pytest.approx(recall, abs=1e-12)
    ba = balanced_accuracy(y_true, y_pred)
    assert ba == pytest.approx((recall + 1 - (1 - recall) / 9) / 2, abs=1e-12)
    assert round(ba, 3) == expected


@pytest.mark.parametrize("seed", range(4))
def test_identity_holds_for_any_balanced_predictions(seed):
    g = np.random.default_rng(seed)
    y_true = np.repeat(np.arange(10), 37)
    y_pred = np.where(g.random(y_true.size) < 0.5, y_true, g.integers(0, 10, y_true.size))
    r = macro_recall(y_true, y_pred)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((r + 1 - (1 - r) / 9) / 2, abs=1e-12)


def test_labels_fix_the_class_set_and_zero_division():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    # Class 2 never occurs: its TPR and precision are zero_division, its TNR 1.
    assert macro_recall(y_true, y_pred, labels=[0, 1, 2]) == pytest.approx((0.5 + 1 + 0) / 3)
    assert macro_recall(y_true, y_pred, labels=[0, 1, 2], zero_division=1) == pytest.approx((0.5 + 1 + 1) / 3)
    assert macro_precision(y_true, y_pred, labels=[0, 1, 2]) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert balanced_accuracy(y_true, y_pred, labels=[0, 1, 2]) == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    assert balanced_accuracy(y_true, y_pred, labels=torch.tensor([0, 1])) == pytest.approx(0.75)


def test_classification_errors():
    with pytest.raises(ValueError, match=r"y_true must be 1-D \(N,\) integer labels, got shape \(2, 2\)"):
        balanced_accuracy(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int))
    with pytest.raises(TypeError, match="y_pred must hold integer labels, got dtype float32"):
        macro_recall(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="y_true and y_pred must have the same length, got 3 and 2"):
        macro_precision([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="y_true is empty"):
        balanced_accuracy([], [])
    with pytest.raises(ValueError, match=r"labels must not repeat, got \[0, 0\]"):
        balanced_accuracy([0, 1], [0, 1], labels=[0, 0])
    with pytest.raises(ValueError, match="zero_division must be a number in \\[0, 1\\], got 2"):
        macro_recall([0, 1], [0, 1], zero_division=2)
    with pytest.raises(TypeError, match="y_true must be a tensor, a numpy array or a sequence, got str"):
        balanced_accuracy("01", [0, 1])


# -- detectors --------------------------------------------------------------------------------------------------------
def test_detector_hand_values():
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8], [0.5, 0.1]])
    result = detector_metrics(scores, torch.tensor([0, 1, 1, 1]))
    # Ticket 0 fires on rows 0, 1, 3 (>= 0.5): tp 1, fp 2, tn 1, fn 0. Ticket 1 fires on 1, 2: tp 2, fn 1, tn 1.
    assert result["per_ticket"]["recall"] == pytest.approx([1.0, 2 / 3])
    assert result["per_ticket"]["precision"] == pytest.approx([1 / 3, 1.0])
    assert result["per_ticket"]["balanced_accuracy"] == pytest.approx([(1 + 1 / 3) / 2, (2 / 3 + 1) / 2])
    assert result["recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["precision"] == pytest.approx((1 / 3 + 1) / 2)


@pytest.mark.parametrize("num_tickets, n, threshold", [(1, 9, 0.5), (3, 50, 0.3), (10, 311, 0.5), (7, 2, 0.9)])
def test_detector_against_sklearn(num_tickets, n, threshold):
    g = np.random.default_rng(n)
    scores = g.random((n, num_tickets))
    y_true = g.integers(0, num_tickets, n)
    result = detector_metrics(scores, y_true, threshold=threshold)
    for k in range(num_tickets):
        pos, pred = y_true == k, scores[:, k] >= threshold
        ref = _reference_ovr(pos.astype(int), pred.astype(int), [1])[0]
        assert result["per_ticket"]["recall"][k] == pytest.approx(recall_score(pos, pred, zero_division=0), abs=1e-12)
        assert result["per_ticket"]["precision"][k] == pytest.approx(
            precision_score(pos, pred, zero_division=0), abs=1e-12
        )
        assert result["per_ticket"]["balanced_accuracy"][k] == pytest.approx((ref[0] + ref[1]) / 2, abs=1e-12)
    for name in ("balanced_accuracy", "precision", "recall"):
        assert result[name] == pytest.approx(np.mean(result["per_ticket"][name]), abs=1e-12)


def test_detector_with_one_hot_scores_equals_ovr_metrics():
    y_true, y_pred = _random_labels(200, 6, seed=3)
    one_hot = np.eye(6)[y_pred]
    result = detector_metrics(torch.from_numpy(one_hot).float(), torch.from_numpy(y_true))
    labels = list(range(6))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy(y_true, y_pred, labels=labels), abs=1e-12)
    assert result["precision"] == pytest.approx(macro_precision(y_true, y_pred, labels=labels), abs=1e-12)
    assert result["recall"] == pytest.approx(macro_recall(y_true, y_pred, labels=labels), abs=1e-12)


def test_detector_errors():
    scores = np.random.default_rng(0).random((4, 3))
    with pytest.raises(ValueError, match=r"scores must be \(N, K\), got shape \(4,\)"):
        detector_metrics(scores[:, 0], [0, 1, 2, 0])
    with pytest.raises(TypeError, match="scores must be numeric, got dtype bool"):
        detector_metrics(scores > 0.5, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="y_true has 3 labels but scores has 4 rows"):
        detector_metrics(scores, [0, 1, 2])
    with pytest.raises(ValueError, match=r"y_true holds 3, outside the tickets \[0, 3\)"):
        detector_metrics(scores, [0, 1, 3, 0])
    with pytest.raises(ValueError, match="threshold must be a number, got nan"):
        detector_metrics(scores, [0, 1, 2, 0], threshold=math.nan)
    with pytest.raises(ValueError, match=r"at least one ticket column \(K >= 1\)"):
        detector_metrics(np.zeros((4, 0)), [0, 1, 2, 0])


# -- PSNR -------------------------------------------------------------------------------------------------------------
def test_psnr_hand_and_identity():
    assert psnr(torch.full((4, 4), 0.1, dtype=torch.float64), torch.zeros(4, 4)) == pytest.approx(20.0, abs=1e-9)
    assert psnr(np.full(8, 10.0), np.zeros(8), data_range=255) == pytest.approx(10 * math.log10(255**2 / 100))
    x = torch.rand(3, 5)
    assert psnr(x, x) == math.inf


@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 17, 13)])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_against_skimage(shape, data_range):
    g = np.random.default_rng(len(shape))
    target = g.random(shape) * data_range
    pred = target + g.normal(0, 0.05 * data_range, shape)
    expected = peak_signal_noise_ratio(target, pred, data_range=data_range)
    assert psnr(torch.from_numpy(pred), torch.from_numpy(target), data_range=data_range) == pytest.approx(
        expected, rel=1e-12
    )
    assert psnr(pred.astype(np.float32), target.astype(np.float32), data_range) == pytest.approx(expected, rel=1e-5)


def test_psnr_errors():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        psnr(torch.rand(2, 3), torch.rand(3, 2))
    with pytest.raises(ValueError, match="pred and target are empty"):
        psnr(torch.rand(0), torch.rand(0))
    with pytest.raises(ValueError, match="data_range must be a number > 0, got 0"):
        psnr(torch.rand(2), torch.rand(2), data_range=0)


# -- parameter counts -------------------------------------------------------------------------------------------------
def test_counts_hand():
    masks = {
        "a": torch.tensor([[[1, 1, 0]], [[0, 1, 1]], [[0, 0, 0]]], dtype=torch.bool),  # 3 weights
        "b": torch.tensor([[1, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool),
    }  # 5 weights
    counts = parameter_counts(masks)
    # Ticket 0 keeps 2 + 2, ticket 1 keeps 2 + 1, ticket 2 nothing; the union is 3 in a and 2 in b.
    assert counts == {"union": 3 + 2, "sum": 4 + 3 + 0, "per_ticket": [4, 3, 0], "single": 7 / 3, "prunable": 8}


@pytest.mark.parametrize("num_tickets", [1, 2, 5])
def test_counts_random(num_tickets):
    g = torch.Generator().manual_seed(num_tickets)
    masks = {
        "a": torch.rand(num_tickets, 13, 7, generator=g) < 0.3,
        "b": torch.rand(num_tickets, 3, 3, 5, generator=g) < 0.6,
    }
    counts = parameter_counts(masks)
    per_ticket = [int(masks["a"][t].sum() + masks["b"][t].sum()) for t in range(num_tickets)]
    assert counts["per_ticket"] == per_ticket and counts["sum"] == sum(per_ticket)
    assert counts["union"] == int(masks["a"].any(0).sum() + masks["b"].any(0).sum())
    assert counts["prunable"] == 13 * 7 + 3 * 3 * 5
    assert max(per_ticket) <= counts["union"] <= min(counts["sum"], counts["prunable"])
    if num_tickets == 1:
        assert counts["union"] == counts["sum"] == per_ticket[0]


def test_counts_on_model_with_dense_extras():
    torch.manual_seed(0)
    num_tickets = 3
    model = nn.Sequential(
        RoutedSparseConv2d(1, 4, 3, num_tickets, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        RoutedSparseLinear(4 * 8 * 8, 10, num_tickets),
        nn.Linear(10, 2),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (model[0], model[4]):
            m.weight_masks.copy_(torch.rand(m.weight_masks.shape, generator=g) < 0.5)
    counts = parameter_counts(model)
    assert counts["prunable"] == 4 * 9 + 10 * 256
    # conv bias 4, BN weight + bias 8, linear bias 10, dense head 10*2 + 2.
    assert counts["dense_extras"] == 4 + 8 + 10 + 22
    masks = {"0": model[0].weight_masks, "4": model[4].weight_masks}
    assert parameter_counts(masks, model=model) == counts
    assert "dense_extras" not in parameter_counts(masks)


def test_counts_mask_dict_with_plain_model_and_tied_weights():
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6))
    model[1].weight = model[0].weight  # tied: one Parameter
    masks = {"0": torch.rand(2, 6, 6) < 0.5}
    counts = parameter_counts(masks, model=model)
    assert counts["dense_extras"] == 6  # the bias only; the tied weight is the routed one, counted once
    masks_other = {"1": torch.rand(2, 6, 6) < 0.5}
    assert parameter_counts(masks_other, model=model)["dense_extras"] == 6


def test_counts_errors():
    masks = {"0": torch.rand(2, 6, 5) < 0.5}
    with pytest.raises(ValueError, match="model has no submodule 'fc'"):
        parameter_counts({"fc": masks["0"]}, model=nn.Sequential(nn.Linear(5, 6)))
    with pytest.raises(ValueError, match=r"layer '0': its weight has shape \(6, 4\), the masks expect \(6, 5\)"):
        parameter_counts(masks, model=nn.Sequential(nn.Linear(4, 6)))
    with pytest.raises(ValueError, match=r"layer '0': its weight has shape None"):
        parameter_counts(masks, model=nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model must be an nn.Module or None, got dict"):
        parameter_counts(masks, model={"0": None})
    with pytest.raises(ValueError, match="the model has no routed layers"):
        parameter_counts(nn.Linear(2, 2))
