import numpy as np
import pytest
from scipy import ndimage

from padim_hf.metrics import aupro, auroc, f1_max


def straightforward_aupro(masks, maps, max_fpr=0.3):
    """Loop over every distinct score as a threshold; per region, count pixels above it."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    points = []
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        overlaps = []
        for lab, pred in zip(labelled, predicted):
            for region in range(1, lab.max() + 1):
                overlaps.append(pred[lab == region].mean())
        fpr = predicted[~masks].mean()
        points.append((fpr, np.mean(overlaps)))
    points = [(0.0, 0.0)] + points
    fprs, pros = np.array(points).T
    area = 0.0
    for (f0, p0), (f1, p1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if f0 >= max_fpr:
            break
        if f1 > max_fpr:  # cut the last segment at max_fpr
            p1 = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
            f1 = max_fpr
        area += (f1 - f0) * (p0 + p1) / 2
    return area / max_fpr


def test_aupro_matches_a_straightforward_threshold_loop():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 15:20, 15:17] = True  # a second, separate region of the same image
    masks[1, 10:14, 10:14] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.uniform(0.2, 1.5, size=masks.shape)
    assert aupro(masks, maps) == pytest.approx(straightforward_aupro(masks, maps), abs=1e-12)


def test_aupro_of_a_perfect_map_is_one_and_of_an_inverted_map_near_zero():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    maps = masks.astype(float) + np.linspace(0, 0.1, 256).reshape(16, 16)
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-3)
    assert aupro(masks, -maps) < 0.01


def test_f1_max_returns_best_threshold():
    targets = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    f1, threshold = f1_max(targets, scores)
    assert f1 == pytest.approx(0.8)  # threshold 0.5: precision 2/3, recall 1
    assert threshold == pytest.approx(0.5)


def test_auroc_is_nan_when_one_class_is_missing():
    assert np.isnan(auroc(np.zeros(4), np.arange(4)))
    assert auroc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
