"""Segmentation metrics as mmsegmentation 0.14 computes them, from a confusion matrix accumulated over
the whole dataset (summable across processes, so predictions never need gathering).

Pixels whose ground truth equals ``ignore_index`` are excluded. From the dataset totals:
``pixel_accuracy = sum(I) / sum(label)``, ``accuracy_c = I_c / label_c``, ``iou_c = I_c / union_c``; a class
with zero union (or zero label area, for accuracy) is NaN and left out of the means. Reported numbers
are ``round(100 * nanmean, 2)`` like the reference.
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, n_cls: int, ignore_index: int = 255) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = ground-truth class, columns = predicted class."""
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).to(pred.device).long()
    keep = (gt != ignore_index) & (gt >= 0) & (gt < n_cls) & (pred >= 0) & (pred < n_cls)
    index = gt[keep] * n_cls + pred[keep]
    return torch.bincount(index, minlength=n_cls * n_cls).reshape(n_cls, n_cls)


def scores_from_confusion(confusion: torch.Tensor | np.ndarray) -> dict[str, object]:
    """``pixel_accuracy``, ``mean_accuracy``, ``mean_iou`` (percent, 2 decimals) and per-class ``cat_iou`` /
    ``cat_acc`` (fractions, NaN where undefined)."""
    conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    intersect = np.diag(conf)
    label_area = conf.sum(axis=1)
    pred_area = conf.sum(axis=0)
    union = label_area + pred_area - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        cat_iou = intersect / union
        cat_acc = intersect / label_area
        pixel_acc = intersect.sum() / label_area.sum()
    return {
        "pixel_accuracy": _percent(pixel_acc),
        "mean_accuracy": _percent(np.nanmean(cat_acc) if np.isfinite(cat_acc).any() else np.nan),
        "mean_iou": _percent(np.nanmean(cat_iou) if np.isfinite(cat_iou).any() else np.nan),
        "cat_iou": cat_iou,
        "cat_acc": cat_acc,
    }


def _percent(value: float) -> float:
    return float(np.round(value * 100, 2))
