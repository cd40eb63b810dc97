"""Evaluation metrics as the paper reports them, and parameter counts of a set of tickets.

Classification (paper §3.2, Table 1): balanced accuracy, precision and recall are macro one-vs-rest averages. The
balanced accuracy is the mean over classes c of (TPR_c + TNR_c) / 2 of the binary problem "c vs rest"; this is NOT
scikit-learn's ``balanced_accuracy_score`` (which is macro recall). For a 10-way classifier with balanced classes
and macro recall r, the one-vs-rest balanced accuracy is (r + 1 - (1 - r) / 9) / 2, which reproduces the paper's
single-model numbers (r = 0.480 gives 0.711). :func:`detector_metrics` scores one-vs-rest ticket detectors, the
way the paper's vision tickets are trained. :func:`psnr` serves the INR experiments, :func:`si_snr` and
:func:`si_snr_improvement` the speech experiment (paper Table 3).

Parameter counts (paper §3.2; docs/paper_notes.md, choice 12): the union of the masks (what RTL stores), the sum over
tickets (what independent per-ticket models store), one ticket's count, and the dense parameters outside the routed
weights.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support
from torch import Tensor, nn

from .masks_io import collect_masks

__all__ = [
    "balanced_accuracy",
    "detector_metrics",
    "macro_precision",
    "macro_recall",
    "parameter_counts",
    "psnr",
    "si_snr",
    "si_snr_improvement",
]


# -- input checks -----------------------------------------------------------------------------------------------------
def _as_numpy(values, arg: str) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, (np.ndarray, Sequence)) and not isinstance(values, (str, bytes)):
        return np.asarray(values)
    raise TypeError(f"{arg} must be a tensor, a numpy array or a sequence, got {type(values).__name__}")


def _labels_array(values, arg: str) -> np.ndarray:
    array = _as_numpy(values, arg)
    if array.ndim != 1:
        raise ValueError(f"{arg} must be 1-D (N,) integer labels, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{arg} is empty")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise TypeError(f"{arg} must hold integer labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def _label_pair(y_true, y_pred, labels):
    y_true, y_pred = _labels_array(y_true, "y_true"), _labels_array(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.shape[0]} and {y_pred.shape[0]}")
    if labels is not None:
        labels = _labels_array(labels, "labels")
        if len(np.unique(labels)) != len(labels):
            raise ValueError(f"labels must not repeat, got {labels.tolist()}")
    return y_true, y_pred, labels


def _check_zero_division(zero_division) -> float:
    if isinstance(zero_division, bool) or not isinstance(zero_division, numbers.Real) or not 0 <= zero_division <= 1:
        raise ValueError(f"zero_division must be a number in [0, 1], got {zero_division!r}")
    return float(zero_division)


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.where(den > 0, num / np.maximum(den, 1), zero_division)


def _ovr_balanced_accuracy(confusion: np.ndarray, zero_division: float) -> np.ndarray:
    """Per-class (TPR + TNR) / 2 from sklearn's multilabel confusion matrices (C, 2, 2) [[tn, fp], [fn, tp]]."""
    tn, fp, fn, tp = confusion[:, 0, 0], confusion[:, 0, 1], confusion[:, 1, 0], confusion[:, 1, 1]
    return (_ratio(tp, tp + fn, zero_division) + _ratio(tn, tn + fp, zero_division)) / 2


# -- classification ---------------------------------------------------------------------------------------------------
def balanced_accuracy(y_true, y_pred, labels=None, zero_division: float = 0.0) -> float:
    """Macro one-vs-rest balanced accuracy: the mean over classes c of (TPR_c + TNR_c) / 2 for "c vs rest".

    This is the paper's Table 1 metric, not scikit-learn's ``balanced_accuracy_score`` (macro recall).

    Args:
        y_true (N,): true integer labels (tensor, array or list).
        y_pred (N,): predicted integer labels.
        labels (C,): the classes to average over; None takes those present in y_true or y_pred.
        zero_division: the rate used when a class has no true positives and negatives to divide by (a class
            absent from y_true has no TPR), as in scikit-learn.

    Returns:
        A float in [0, 1].

    Example:
        >>> balanced_accuracy(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2]))  # mean of 0.75, 0.833, 1
        0.861111111111111
    """
    y_true, y_pred, labels = _label_pair(y_true, y_pred, labels)
    confusion = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    return float(_ovr_balanced_accuracy(confusion, _check_zero_division(zero_division)).mean())


def macro_precision(y_true, y_pred, labels=None, zero_division: float = 0.0) -> float:
    """Macro one-vs-rest precision: the unweighted mean over classes of TP / (TP + FP).

    Args:
        y_true (N,): true integer labels.
        y_pred (N,): predicted integer labels.
        labels (C,): the classes to average over; None takes those present in y_true or y_pred.
        zero_division: the precision of a class never predicted.

    Returns:
        A float in [0, 1].

    Example:
        >>> macro_precision([0, 0, 1, 2], [0, 1, 1, 2])  # mean of 1, 0.5, 1
        0.8333333333333334
    """
    y_true, y_pred, labels = _label_pair(y_true, y_pred, labels)
    precision, _, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=_check_zero_division(zero_division)
    )
    return float(precision)


def macro_recall(y_true, y_pred, labels=None, zero_division: float = 0.0) -> float:
    """Macro one-vs-rest recall: the unweighted mean over classes of TP / (TP + FN) (= sklearn's balanced accuracy).

    Args:
        y_true (N,): true integer labels.
        y_pred (N,): predicted integer labels.
        labels (C,): the classes to average over; None takes those present in y_true or y_pred.
        zero_division: the recall of a class absent from y_true.

    Returns:
        A float in [0, 1].

    Example:
        >>> macro_recall([0, 0, 1, 2], [0, 1, 1, 2])  # mean of 0.5, 1, 1
        0.8333333333333334
    """
    y_true, y_pred, labels = _label_pair(y_true, y_pred, labels)
    _, recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=_check_zero_division(zero_division)
    )
    return float(recall)


def detector_metrics(scores, y_true, threshold: float = 0.5, zero_division: float = 0.0) -> Dict[str, Any]:
    """Per-ticket binary metrics of one-vs-rest ticket detectors, and their macro averages.

    Ticket k is a detector for subset k: an input is positive for it iff y_true == k, and predicted positive iff
    scores[:, k] >= threshold. This is how the paper's vision tickets (balanced-trained binary classifiers) are
    scored on the imbalanced test set, which is why their precision is low.

    Args:
        scores (N, K): each ticket's score (e.g. a sigmoid probability) for each input.
        y_true (N,): the subset (ticket) of each input, integers in [0, K).
        threshold: the decision threshold on the scores (``>=``); the paper does not state one.
        zero_division: the value of a rate whose denominator is 0 (a ticket that never fires, or without positives).

    Returns:
        {"balanced_accuracy", "precision", "recall": float macro means over tickets,
         "per_ticket": {"balanced_accuracy", "precision", "recall": lists of K floats}}.

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
        >>> detector_metrics(scores, torch.tensor([0, 1, 1]))["per_ticket"]["recall"]
        [1.0, 1.0]
    """
    scores = _as_numpy(scores, "scores")
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, K), got shape {tuple(scores.shape)}")
    if not np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_:
        raise TypeError(f"scores must be numeric, got dtype {scores.dtype}")
    y_true = _labels_array(y_true, "y_true")
    if y_true.shape[0] != scores.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} labels but scores has {scores.shape[0]} rows")
    num_tickets = scores.shape[1]
    if num_tickets < 1:
        raise ValueError("scores must have at least one ticket column (K >= 1)")
    outside = y_true[(y_true < 0) | (y_true >= num_tickets)]
    if outside.size:
        raise ValueError(
            f"y_true holds {int(outside[0])}, outside the tickets [0, {num_tickets}): map labels to ticket ids first"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    zero_division = _check_zero_division(zero_division)
    positive = y_true[:, None] == np.arange(num_tickets)[None, :]  # (N, K)
    fired = scores >= threshold
    tp = (positive & fired).sum(0)
    fp = (~positive & fired).sum(0)
    fn = (positive & ~fired).sum(0)
    tn = (~positive & ~fired).sum(0)
    per_ticket = {
        "balanced_accuracy": ((_ratio(tp, tp + fn, zero_division) + _ratio(tn, tn + fp, zero_division)) / 2),
        "precision": _ratio(tp, tp + fp, zero_division),
        "recall": _ratio(tp, tp + fn, zero_division),
    }
    result: Dict[str, Any] = {name: float(values.mean()) for name, values in per_ticket.items()}
    result["per_ticket"] = {name: [float(v) for v in values] for name, values in per_ticket.items()}
    return result


# -- regression -------------------------------------------------------------------------------------------------------
def psnr(pred, target, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB, over all elements together (float64).

    The paper's INR table averages per-image PSNRs: call this once per image and average the results.

    Args:
        pred (*): the reconstruction (tensor or array).
        target (*): the reference, same shape.
        data_range: the span of possible values (1.0 for images in [0, 1], 255 for uint8).

    Returns:
        A float in dB; inf when pred equals target.

    Example:
        >>> psnr(torch.full((4, 4), 0.1, dtype=torch.float64), torch.zeros(4, 4))  # MSE 0.01
        20.0
    """
    pred = torch.as_tensor(_as_numpy(pred, "pred") if not isinstance(pred, Tensor) else pred.detach())
    target = torch.as_tensor(_as_numpy(target, "target") if not isinstance(target, Tensor) else target.detach())
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred and target are empty")
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not data_range > 0:
        raise ValueError(f"data_range must be a number > 0, got {data_range!r}")
    mse = float((pred.to("cpu", torch.float64) - target.to("cpu", torch.float64)).pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / mse)


def si_snr(estimate: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale-invariant signal-to-noise ratio in dB of each row, in float64.

    Both signals are made zero-mean; the estimate is split into its projection on the reference, s = <e, r> r / |r|^2,
    and the rest, n = e - s; SI-SNR = 10 log10(|s|^2 / |n|^2). Scaling the estimate leaves it unchanged.

    Args:
        estimate (B, L) or (L,): the enhanced signal.
        reference (B, L) or (L,): the clean signal, same shape.
        eps: keeps a silent row finite.

    Returns:
        (B,) or () float64 tensor of dB.

    Example:
        >>> r = torch.tensor([1.0, -1.0, 1.0, -1.0]); n = torch.tensor([1.0, 1.0, -1.0, -1.0])  # n orthogonal to r
        >>> round(float(si_snr(r + 0.1 * n, r)), 6)  # |r|^2 / |0.1 n|^2 = 100
        20.0
    """
    if not isinstance(estimate, Tensor) or not isinstance(reference, Tensor):
        raise TypeError("estimate and reference must be tensors")
    if estimate.shape != reference.shape or estimate.dim() not in (1, 2) or estimate.shape[-1] < 2:
        raise ValueError(
            f"estimate and reference must have the same shape (B, L) or (L,) with L >= 2, got "
            f"{tuple(estimate.shape)} and {tuple(reference.shape)}"
        )
    e = estimate.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    e = e - e.mean(-1, keepdim=True)
    r = r - r.mean(-1, keepdim=True)
    target = (e * r).sum(-1, keepdim=True) / (r.pow(2).sum(-1, keepdim=True) + eps) * r
    residual = e - target
    return 10.0 * torch.log10((target.pow(2).sum(-1) + eps) / (residual.pow(2).sum(-1) + eps))


def si_snr_improvement(estimate: Tensor, mixture: Tensor, reference: Tensor) -> Tensor:
    """SI-SNRi: SI-SNR of the estimate minus SI-SNR of the unprocessed mixture, per row, in dB (float64).

    Args:
        estimate, mixture, reference (B, L) or (L,): enhanced, noisy input, clean.

    Returns:
        (B,) or () float64 tensor of dB; 0 for an estimate that equals the mixture.
    """
    return si_snr(estimate, reference) - si_snr(mixture, reference)


# -- parameter counts -------------------------------------------------------------------------------------------------
def parameter_counts(model_or_masks, model: Optional[nn.Module] = None) -> Dict[str, Union[int, float, list]]:
    """How many prunable weights a set of tickets keeps: union, sum over tickets, per ticket, and the dense rest.

    The paper's "#Params" for RTL is the union (weights kept by at least one ticket: what RTL stores), for the
    multi-model baseline the sum over tickets, and for single-model IMP one ticket's count. Parameters outside
    the routed weights (biases, BN, dense layers) are reported apart as ``dense_extras``, as the paper leaves
    them out of its counts.

    Args:
        model_or_masks: a model with routed layers or a dict {layer name: bool tensor (T, ...)}.
        model: the model owning the masks, for ``dense_extras``; defaults to ``model_or_masks`` when that is a
            model. With a mask dict, each name must be a submodule of ``model`` whose ``weight`` has the mask's
            shape (a routed or a plain layer).

    Returns:
        {"union": int, "sum": int, "per_ticket": list of T ints, "single": float (mean per ticket),
         "prunable": int (all prunable weights), and "dense_extras": int when a model is known}.

    Example:
        >>> masks = {"fc": torch.tensor([[[1, 1, 0]], [[0, 1, 1]]], dtype=torch.bool)}
        >>> parameter_counts(masks)
        {'union': 3, 'sum': 4, 'per_ticket': [2, 2], 'single': 2.0, 'prunable': 3}
    """
    masks = collect_masks(model_or_masks)
    if model is None and isinstance(model_or_masks, nn.Module):
        model = model_or_masks
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    num_tickets = next(iter(masks.values())).shape[0]
    union = 0
    per_ticket = torch.zeros(num_tickets, dtype=torch.int64)
    prunable = 0
    for mask in masks.values():
        flat = mask.reshape(num_tickets, -1)
        union += int(flat.any(0).sum())
        per_ticket += flat.sum(1).cpu()
        prunable += flat.shape[1]
    counts: Dict[str, Union[int, float, list]] = {
        "union": union,
        "sum": int(per_ticket.sum()),
        "per_ticket": [int(c) for c in per_ticket],
        "single": float(per_ticket.double().mean()),
        "prunable": prunable,
    }
    if model is not None:
        routed_weights = set()
        for name, mask in masks.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no submodule {name!r} (a layer named in the masks)") from None
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, Tensor) or tuple(weight.shape) != tuple(mask.shape[1:]):
                shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
                raise ValueError(
                    f"layer {name!r}: its weight has shape {shape}, the masks expect {tuple(mask.shape[1:])}"
                )
            routed_weights.add(id(weight))
        # model.parameters() yields each shared Parameter once, so tied weights are not counted twice.
        counts["dense_extras"] = sum(p.numel() for p in model.parameters() if id(p) not in routed_weights)
    return counts
