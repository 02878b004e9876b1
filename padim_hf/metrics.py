"""Anomaly detection metrics: exact in-memory references and the streaming pixel metrics `evaluate` uses.

Definitions (the same in both):
- AUROC: area under the ROC curve (ties count one half).
- AUPRO (Bergmann et al. 2020): for a threshold t, PRO(t) is the mean over *all* connected ground-truth regions
  (8-connectivity) of *all* images of the fraction of the region's pixels scoring >= t, and FPR(t) the fraction
  of all normal pixels scoring >= t. The curve through (0, 0) and the points of every threshold is integrated
  with the trapezoid rule up to FPR `max_fpr` (the last segment cut there by linear interpolation) and divided
  by `max_fpr`. Images of different sizes simply contribute their regions and pixels: one definition for any mix.
- F1-max: the best F1 over all thresholds, with the threshold reaching it (anomalous when score >= threshold).

PRO(t) = sum over anomalous pixels >= t of 1 / (R * |region of the pixel|): a weighted count of pixels. That is
what makes AUPRO streamable: one weighted histogram, no per-region state.
"""

import math

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


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


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(per-pixel weight 1 / |its connected region| (0 for normal pixels), number of regions) of a boolean mask."""
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1).astype(np.float64)
    inverse = np.zeros_like(sizes)
    inverse[1:] = 1.0 / sizes[1:]
    return inverse[labelled], count


def area_up_to(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under the curve through (0, 0) and the (non-decreasing) `fpr`, `tpr` points up to `max_fpr`,
    the last segment cut at `max_fpr` by linear interpolation, divided by `max_fpr`."""
    fpr = np.concatenate([[0.0], fpr])
    tpr = np.concatenate([[0.0], tpr])
    beyond = np.flatnonzero(fpr > max_fpr)
    if beyond.size:
        cut = int(beyond[0])
        f0, f1, p0, p1 = fpr[cut - 1], fpr[cut], tpr[cut - 1], tpr[cut]
        fpr = np.append(fpr[:cut], max_fpr)
        tpr = np.append(tpr[:cut], p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0))
    return float(np.trapezoid(tpr, fpr) / max_fpr)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Exact AUPRO (every distinct score a threshold) of per-image masks and maps of any sizes, held in memory.

    `masks`, `maps`: (N, H, W) arrays or sequences of (H_i, W_i) arrays. The reference `StreamingPixelMetrics`
    is tested against.
    """
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    scores, normal, weights, regions = [], [], [], 0
    for mask, anomaly_map in zip(masks, maps):
        mask, anomaly_map = np.asarray(mask).astype(bool), np.asarray(anomaly_map, dtype=np.float64)
        if mask.shape != anomaly_map.shape:
            raise ValueError(f"mask {mask.shape} and map {anomaly_map.shape} differ in shape")
        weight, count = region_weights(mask)
        scores.append(anomaly_map.ravel())
        normal.append(~mask.ravel())
        weights.append(weight.ravel())
        regions += count
    scores, normal, weights = np.concatenate(scores), np.concatenate(normal), np.concatenate(weights)
    if regions == 0 or not normal.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    false_positives = np.cumsum(normal[order])
    overlap = np.cumsum(weights[order]) / regions
    last_of_ties = np.append(np.flatnonzero(np.diff(scores) != 0), scores.size - 1)
    return area_up_to(false_positives[last_of_ties] / normal.sum(), overlap[last_of_ties], max_fpr)


class StreamingPixelMetrics:
    """Pixel AUROC, AUPRO and F1-max from histograms: memory independent of the number and size of images.

    State: over the score range [0, 2**exponent), `num_bins` equal bins holding the count of normal pixels, the
    count of anomalous pixels and the summed region weights 1 / |region| of anomalous pixels; plus the number of
    regions. Counts >= a bin edge are exact, so FPR, TPR and PRO are exact at every edge; the curves are integrated
    through those points instead of through every distinct score. The difference is bounded by the pairs of
    normal and anomalous pixels sharing a bin (AUROC); with 2**20 bins and a range at most twice the top score it
    was ~1e-8 on hazelnut maps (BENCHMARKS.md; the tests hold it to 1e-4 against `auroc`/`aupro`).

    Why not torchmetrics' binned metrics: their state is a (T, 2, 2) confusion matrix filled by comparing every
    pixel with every threshold (or looping over thresholds), which is too slow at 2**20 thresholds, and they need
    scores in a known range; Mahalanobis distances are >= 0 but unbounded. Here the range grows as scores arrive:
    when a score reaches 2**exponent the exponent grows and pairs of bins merge (exact, widths being powers of
    two), so the final range depends only on the largest score, never on the order of images or processes.
    """

    def __init__(self, num_bins: int = 2**20, max_fpr: float = 0.3):
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins}")
        self.num_bins, self.max_fpr = num_bins, max_fpr
        self.exponent: int | None = None  # None until the first positive score
        self.normal = np.zeros(num_bins, dtype=np.int64)
        self.anomalous = np.zeros(num_bins, dtype=np.int64)
        self.region_weight = np.zeros(num_bins, dtype=np.float64)
        self.num_regions = 0

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, (self.exponent or 0)) / self.num_bins

    def _grow_to(self, exponent: int) -> None:
        """Widens the range to [0, 2**exponent) by merging 2**k adjacent bins."""
        if self.exponent is None:
            self.exponent = exponent
            return
        factor = 1 << (exponent - self.exponent)
        if factor == 1:
            return
        if factor >= self.num_bins:
            merged = [np.array([h.sum()], dtype=h.dtype) for h in (self.normal, self.anomalous, self.region_weight)]
        else:
            merged = [h.reshape(-1, factor).sum(axis=1) for h in (self.normal, self.anomalous, self.region_weight)]
        self.normal, self.anomalous, self.region_weight = (
            np.concatenate([h, np.zeros(self.num_bins - h.size, dtype=h.dtype)]) for h in merged
        )
        self.exponent = exponent

    def update(self, maps, masks) -> None:
        """Adds images: `maps` and `masks` (N, H, W) (arrays or tensors) or sequences of (H_i, W_i) ones."""
        if len(maps) != len(masks):
            raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
        pairs = []
        for anomaly_map, mask in zip(maps, masks):
            if isinstance(anomaly_map, torch.Tensor):
                anomaly_map = anomaly_map.detach().float().cpu().numpy()
            anomaly_map, mask = np.asarray(anomaly_map, dtype=np.float32), np.asarray(mask).astype(bool)
            if anomaly_map.shape != mask.shape:
                raise ValueError(f"anomaly map {anomaly_map.shape} and mask {mask.shape} differ in shape")
            if not np.isfinite(anomaly_map).all() or anomaly_map.min() < 0:
                raise ValueError("anomaly maps must be finite and >= 0 (Mahalanobis distances)")
            pairs.append((anomaly_map, mask))
        if not pairs:
            return
        top = max((float(m.max()) for m, _ in pairs if m.size), default=0.0)
        if top > 0:
            exponent = math.frexp(top)[1]  # top < 2**exponent
            self._grow_to(max(exponent, self.exponent if self.exponent is not None else exponent))
        scale = np.float32(self.num_bins / math.ldexp(1.0, self.exponent or 0))  # a power of two: exact bin indices
        normal, anomalous, weights = [], [], []
        for anomaly_map, mask in pairs:
            index = np.minimum((anomaly_map * scale).astype(np.int64), self.num_bins - 1)
            normal.append(index[~mask])
            if mask.any():
                weight, count = region_weights(mask)
                anomalous.append(index[mask])
                weights.append(weight[mask])
                self.num_regions += count
        # One bincount per batch and kind: each call walks all num_bins counters.
        self.normal += np.bincount(np.concatenate(normal), minlength=self.num_bins)
        if anomalous:
            anomalous = np.concatenate(anomalous)
            self.anomalous += np.bincount(anomalous, minlength=self.num_bins)
            self.region_weight += np.bincount(anomalous, weights=np.concatenate(weights), minlength=self.num_bins)

    def merge_(self, other: "StreamingPixelMetrics") -> "StreamingPixelMetrics":
        """Adds another state (e.g. another shard's) to this one."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge states of {self.num_bins} and {other.num_bins} bins")
        if other.exponent is not None:
            other = other.copy()
            exponent = max(other.exponent, self.exponent if self.exponent is not None else other.exponent)
            self._grow_to(exponent)
            other._grow_to(exponent)
        self.normal += other.normal
        self.anomalous += other.anomalous
        self.region_weight += other.region_weight
        self.num_regions += other.num_regions
        return self

    def copy(self) -> "StreamingPixelMetrics":
        twin = StreamingPixelMetrics(self.num_bins, self.max_fpr)
        twin.exponent, twin.num_regions = self.exponent, self.num_regions
        twin.normal, twin.anomalous, twin.region_weight = self.normal.copy(), self.anomalous.copy(), self.region_weight.copy()
        return twin

    def all_reduce_(self) -> "StreamingPixelMetrics":
        """Sums the states of all processes of the default `torch.distributed` group (a no-op without one)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        from torch.distributed import ReduceOp, all_reduce

        exponent = torch.tensor([self.exponent if self.exponent is not None else -(2**31)], dtype=torch.int64)
        all_reduce(exponent, op=ReduceOp.MAX)
        if exponent.item() > -(2**31):
            self._grow_to(max(int(exponent.item()), self.exponent if self.exponent is not None else int(exponent.item())))
        for name in ("normal", "anomalous", "region_weight"):
            tensor = torch.from_numpy(getattr(self, name))
            all_reduce(tensor)  # a view of the numpy array: summed in place
        regions = torch.tensor([self.num_regions], dtype=torch.int64)
        all_reduce(regions)
        self.num_regions = int(regions.item())
        return self

    def compute(self) -> dict[str, float]:
        """pixel_auroc, pixel_aupro, pixel_f1_max and pixel_threshold (NaN when a class is missing)."""
        nan = float("nan")
        positives, negatives = int(self.anomalous.sum()), int(self.normal.sum())
        if positives == 0 or negatives == 0:
            return {"pixel_auroc": nan, "pixel_aupro": nan, "pixel_f1_max": nan, "pixel_threshold": nan}
        # Counts of pixels >= the lower edge of each bin, from the top bin down (increasing FPR).
        true_positives = np.cumsum(self.anomalous[::-1])
        false_positives = np.cumsum(self.normal[::-1])
        fpr, tpr = false_positives / negatives, true_positives / positives
        pixel_auroc = float(np.trapezoid(np.concatenate([[0.0], tpr]), np.concatenate([[0.0], fpr])))
        pro = np.cumsum(self.region_weight[::-1]) / self.num_regions
        f1 = 2 * true_positives / (true_positives + false_positives + positives)
        best = int(np.argmax(f1))
        return {
            "pixel_auroc": pixel_auroc,
            "pixel_aupro": area_up_to(fpr, pro, self.max_fpr),
            "pixel_f1_max": float(f1[best]),
            "pixel_threshold": (self.num_bins - 1 - best) * self.bin_width,
        }
