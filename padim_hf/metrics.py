"""Anomaly detection metrics: AUROC and F1-max (scikit-learn) and the per-region-overlap AUPRO."""

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (undefined, not a perfect score)."""
    targets = np.asarray(targets).ravel().astype(bool)
    if targets.all() or not targets.any():
        return float("nan")
    return float(roc_auc_score(targets, np.asarray(scores).ravel()))


def f1_max(targets: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold that reaches it: predict anomalous when score >= it)."""
    targets = np.asarray(targets).ravel().astype(bool)
    if not targets.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(targets, np.asarray(scores).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 3000) -> float:
    """Area under the per-region-overlap curve up to `max_fpr`, divided by `max_fpr` (Bergmann et al. 2020).

    For a threshold t, PRO(t) is the mean over connected ground-truth regions (8-connectivity) of the fraction
    of the region's pixels scoring >= t, and FPR(t) the fraction of normal pixels scoring >= t. Thresholds are
    just above the top normal score, then the normal-pixel score quantiles at `num_thresholds` FPR levels in [0, max_fpr]; the curve is integrated
    with the trapezoid rule and interpolated at exactly `max_fpr`.
    """
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    regions = [
        np.sort(image_map[labelled == region])
        for image_mask, image_map in zip(masks, maps)
        for labelled, count in [ndimage.label(image_mask, structure=np.ones((3, 3)))]
        for region in range(1, count + 1)
    ]
    normal = np.sort(maps[~masks])
    if not regions or normal.size == 0:
        return float("nan")
    thresholds = np.quantile(normal, 1.0 - np.linspace(0.0, max_fpr, num_thresholds))
    # The quantile at FPR 0 is the top normal score, which itself counts as a false positive: start just above it.
    thresholds = np.append(np.nextafter(normal[-1], np.inf), thresholds)
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="left") / normal.size
    pro = np.mean([1.0 - np.searchsorted(r, thresholds, side="left") / r.size for r in regions], axis=0)
    order = np.argsort(fpr, kind="stable")
    fpr, pro = fpr[order], pro[order]
    inside = fpr <= max_fpr
    fpr_clipped = np.append(fpr[inside], max_fpr)
    pro_clipped = np.append(pro[inside], np.interp(max_fpr, fpr, pro))
    return float(np.trapezoid(pro_clipped, fpr_clipped) / max_fpr)
