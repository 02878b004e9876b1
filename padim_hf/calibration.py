"""Thresholds from good images alone: every fitted model says "defect" or "good" at a false-alarm rate you choose.

`fit_padim` holds out a seeded part of the good training images (or takes a separate set of good images), scores
them against the Gaussian of the other images, then adds them to the Gaussian: no image is lost to the fit. The
held-out image scores set the thresholds:

- **Statistic (split conformal).** With n held-out scores and a target false-alarm rate a, the image threshold sits
  just above the k-th smallest score, k = ceil((n + 1)(1 - a)). For a new good image exchangeable with the held-out
  ones, P(score >= threshold) = (n + 1 - k) / (n + 1) <= a, whatever the score distribution (Vovk et al. 2005;
  Angelopoulos & Bates 2021). That bound is an expectation over the draw of the held-out images: one model's realised
  rate varies around it (Beta(n + 1 - k, k)).
- **Too few images.** Below k <= n, i.e. n < (1 - a) / a held-out images (99 for 1 %), the rate a cannot be
  guaranteed from n images; the threshold is then the highest held-out score (k = n), which flags about
  1 / (n + 1) of good parts. This is logged as a warning and recorded in `config.calibration` and the model card.
- **Pixels.** The pixel threshold equals the image threshold: the image score is the maximum of the anomaly map, so
  a good part shows a non-empty defect mask exactly when it is flagged, at the same rate. The held-out pixel
  scores are kept as a few quantiles (`pixel_score_quantiles`) with the share of held-out pixels above the threshold.
- **Score normalisation.** `score_min` is the lowest held-out score and `score_max` its mirror image about the
  threshold (2 threshold - score_min), so normalised scores put the threshold at 0.5 and the lowest good score at 0.

The held-out scores are stored in `config.calibration["scores"]`, so `calibrate(model, false_alarm_rate=...)` (or
`padim-hf calibrate --model M --false-alarm-rate 0.005`) changes the rate without refitting; with `good_images` it
scores a new set of good images from the line (drift) instead.
"""

import argparse
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .options import DEFAULT_FALSE_ALARM_RATE, DEFAULT_HOLDOUT_FRACTION

logger = logging.getLogger(__name__)

GOOD_ONLY = "good-only quantile"
LABELLED_F1 = "labelled F1"
# At least this many held-out images, and at least as many images left for the Gaussian they are scored against.
MIN_HOLDOUT_IMAGES = 5
# At most this many held-out images are kept in memory (as pixel values) until the Gaussian of the others is ready;
# 500 images estimate rates down to 0.2 %. Larger sets still give every image to the Gaussian.
MAX_HOLDOUT_IMAGES = 500
# Exceedance levels summarised for the held-out pixel scores.
PIXEL_QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999, 1.0)
# Pixel scores are summarised on every PIXEL_STRIDE-th row and column: the map is a blurred upsampling of a grid 4 or
# more pixels apart, so neighbouring pixels carry almost the same value.
PIXEL_STRIDE = 4


# ----------------------------------------------------------------------------------------------------------------
# Which images are held out


def holdout_size(num_images: int, fraction: float) -> int:
    """How many of `num_images` good images a `fraction` holds out: at least MIN_HOLDOUT_IMAGES, at most
    MAX_HOLDOUT_IMAGES, and never more than the images left for the Gaussian (0: too few images to hold any out)."""
    if fraction <= 0:
        return 0
    count = min(MAX_HOLDOUT_IMAGES, max(MIN_HOLDOUT_IMAGES, round(fraction * num_images)))
    return count if num_images - count >= count else 0


def selection_key(seed: int, row: Mapping[str, Any]) -> float:
    """A uniform number in [0, 1) for a row, from `seed` and the row's global index (`_index`) when known, else its
    content (image bytes, else its path): the same whichever process reads the row and in whatever order.

    Held-out images are the rows with the smallest keys, so the choice does not depend on the number of processes.
    """
    digest = hashlib.blake2b(digest_size=8, key=str(seed).encode())
    if row.get("_index") is not None:
        digest.update(f"index:{row['_index']}".encode())
    else:
        digest.update(content_bytes(row))
    return int.from_bytes(digest.digest(), "big") / 2**64


def content_bytes(row: Mapping[str, Any]) -> bytes:
    """Bytes identifying a row's image: its encoded bytes, its path, or its decoded pixels."""
    image = row.get("image")
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):
            return f"path:{image['path']}".encode()
    if isinstance(image, PIL.Image.Image):
        return image.tobytes()
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().numpy().tobytes()
    if isinstance(image, np.ndarray):
        return image.tobytes()
    if isinstance(image, (str, Path)):
        return f"path:{image}".encode()
    raise ValueError(f"cannot tell {row.get('path') or 'an image'} apart from other images to hold it out")


# ----------------------------------------------------------------------------------------------------------------
# Thresholds from held-out good scores


def conformal_rank(num_scores: int, false_alarm_rate: float) -> int:
    """k = ceil((n + 1)(1 - a)), 1-based; > n when the rate cannot be guaranteed from n scores."""
    return math.ceil((num_scores + 1) * (1 - false_alarm_rate) - 1e-9)


def threshold_above(score: float) -> float:
    """The smallest float32 above `score`: `pred_score >= threshold` then flags exactly the scores above `score`
    (scores are float32 everywhere: the model, the exported graphs and the runtimes compare float32 values)."""
    return float(np.nextafter(np.float32(score), np.float32(np.inf)))


def good_only_calibration(
    scores: Iterable[float],
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    pixel_scores: np.ndarray | None = None,
    source: dict | None = None,
) -> dict:
    """The calibration record (what `config.calibration` stores) of held-out good image scores at a target rate.

    `pixel_scores`: a sample of the held-out images' pixel scores (summarised, see `PIXEL_QUANTILES`); `source`:
    where the images came from (recorded as it is). Thresholds and score range: see the module docstring.
    """
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    ordered = np.sort(np.asarray(list(scores), dtype=np.float32))
    n = len(ordered)
    if n == 0:
        raise ValueError("no held-out good images to calibrate on")
    if not np.isfinite(ordered).all():
        raise ValueError("held-out good images have non-finite scores")
    wanted = conformal_rank(n, false_alarm_rate)
    rank = min(wanted, n)
    threshold = threshold_above(float(ordered[rank - 1]))
    flagged = int((ordered >= threshold).sum())
    record = {
        "method": GOOD_ONLY,
        "statistic": "split conformal: just above the k-th smallest held-out score, k = ceil((n + 1)(1 - rate))",
        "num_images": n,
        "target_false_alarm_rate": float(false_alarm_rate),
        "estimable": wanted <= n,
        "rank": rank,
        # P(a new good image is flagged) for exchangeable scores: the figure the card states.
        "expected_false_alarm_rate": (n + 1 - rank) / (n + 1),
        # On the held-out images themselves (they chose the threshold, so this is optimistic).
        "achieved_false_alarm_rate": flagged / n,
        "min_images_for_target": max(1, math.ceil((1 - false_alarm_rate) / false_alarm_rate - 1e-9)),
        "image_threshold": threshold,
        "pixel_threshold": threshold,
        "score_min": float(ordered[0]),
        "score_max": float(2 * threshold - float(ordered[0])),
        "scores": [float(score) for score in ordered],
        **({"source": source} if source else {}),
    }
    if pixel_scores is not None and len(pixel_scores):
        pixels = np.asarray(pixel_scores, dtype=np.float32).ravel()
        record["pixel_score_quantiles"] = {f"{q:g}": float(np.quantile(pixels, q)) for q in PIXEL_QUANTILES}
        record["pixel_false_alarm_rate"] = float((pixels >= threshold).mean())
    if not record["estimable"]:
        record["note"] = (
            f"a {false_alarm_rate:g} false-alarm rate cannot be guaranteed from {n} held-out good images (needs at "
            f"least {record['min_images_for_target']}); the threshold is just above the highest held-out score, which "
            f"flags about 1 in {n + 1} good parts"
        )
    return record


def apply_calibration(config, record: dict) -> None:
    """Sets the thresholds and score range of `config` from a calibration record and stores the record."""
    config.image_threshold = record["image_threshold"]
    config.pixel_threshold = record["pixel_threshold"]
    config.score_min, config.score_max = record["score_min"], record["score_max"]
    config.calibration = record


def warn_if_not_estimable(record: dict) -> None:
    if not record.get("estimable", True):
        logger.warning("calibration: %s", record["note"])


# ----------------------------------------------------------------------------------------------------------------
# In words


def _one_in(rate: float) -> str:
    if rate <= 0:
        return "no good parts"
    return f"about 1 in {max(1, round(1 / rate))} good parts"


def describe_calibration(config) -> str:
    """What the model's verdicts mean, in one or two sentences (model card, CLI, Space).

    e.g. "Flags about 1 in 100 good parts (target false-alarm rate 1%); estimated from 120 held-out good images."
    """
    record = getattr(config, "calibration", None) or {}
    if config.image_threshold is None:
        return (
            "No threshold: scores are raw Mahalanobis distances and no part is called good or defective "
            "(`padim-hf calibrate --model M --good-images DIR` sets one from good images)."
        )
    method = record.get("method")
    if method == GOOD_ONLY:
        n, target = record["num_images"], record["target_false_alarm_rate"]
        expected = record.get("expected_false_alarm_rate")
        source = record.get("source") or {}
        where = {
            "holdout": "held-out good training images",
            "calibration_data": "separate good images",
            "good_images": "good images given after the fit",
        }.get(source.get("kind"), "held-out good images")
        if record.get("estimable", True):
            text = (
                f"Flags {_one_in(expected)} (target false-alarm rate {target:.3g}, guaranteed on average by a "
                f"split-conformal threshold); estimated from {n} {where}."
            )
        else:
            text = (
                f"Flags {_one_in(expected)}: a target false-alarm rate of {target:.3g} cannot be estimated from {n} "
                f"{where} (it needs at least {record.get('min_images_for_target')}), so the threshold is just above "
                "the highest of their scores."
            )
        return text + f" Image and pixel threshold {config.image_threshold:.4g}."
    if method == LABELLED_F1:
        n = record.get("num_images")
        flagged = record.get("achieved_false_alarm_rate")
        text = f"F1-optimal threshold {config.image_threshold:.4g} chosen on {n} labelled calibration images (good and defective)"
        if flagged is not None:
            text += f"; it flags {flagged:.1%} of the good ones among them"
        return text + "."
    return f"Threshold {config.image_threshold:.4g} on raw scores (how it was chosen is not recorded)."


# ----------------------------------------------------------------------------------------------------------------
# Scoring good images


@torch.no_grad()
def score_batches(model, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (n,), a strided sample of pixel scores) of `pixel_values` batches under the model's Gaussian."""
    device = model.gaussian.mean.device
    scores, pixels = [], []
    for pixel_values in batches:
        output = model(pixel_values.to(device))
        scores.append(output.pred_score.float().cpu().numpy())
        pixels.append(output.anomaly_map[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE].float().cpu().numpy().ravel())
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(scores), np.concatenate(pixels)


def good_image_batches(images, processor, batch_size: int = 16) -> Iterable[torch.Tensor]:
    """`pixel_values` batches of good images: a folder or files (str/Path or a list of them), a `datasets.Dataset`
    with an "image" column, or PIL images."""
    from torch.utils.data import DataLoader

    from .data import Collator, image_list

    if isinstance(images, (str, Path)) or (
        isinstance(images, (list, tuple)) and images and all(isinstance(item, (str, Path)) for item in images)
    ):
        dataset = image_list([images] if isinstance(images, (str, Path)) else list(images))
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(processor)):
            yield batch["pixel_values"]
        return
    if hasattr(images, "column_names"):  # a datasets.Dataset or a streamed IterableDataset in padim_hf's columns
        labels = images["label"] if "label" in images.column_names else []
        if any(label not in (0, None) for label in labels):
            raise ValueError("good_images contains rows labelled anomalous: calibrate on good images only")
        if "path" not in images.column_names:
            images = images.add_column("path", [f"image {index}" for index in range(len(images))])
        if "label" not in images.column_names:
            images = images.add_column("label", [0] * len(images))
        for batch in DataLoader(images, batch_size=batch_size, collate_fn=Collator(processor)):
            yield batch["pixel_values"]
        return
    items = list(images)
    for start in range(0, len(items), batch_size):
        yield processor(items[start : start + batch_size], return_tensors="pt")["pixel_values"]


def calibrate(
    model,
    good_images=None,
    *,
    false_alarm_rate: float | None = None,
    processor=None,
    batch_size: int = 16,
):
    """Sets the model's thresholds at `false_alarm_rate` from good images alone; changes nothing else. Returns it.

    Without `good_images`, the held-out scores stored in `config.calibration` by `fit_padim` (or an earlier
    `calibrate`) are used again: a new rate needs no image and no refit. With `good_images` (a folder, files, a
    Dataset or PIL images of good parts, e.g. recent ones from the line after a change of lighting), those images are
    scored by the fitted model and replace the stored scores; they are not added to the Gaussian.
    `false_alarm_rate` defaults to the stored target, else 1 %.

    Example:

    ```python
    from padim_hf import calibrate, describe_calibration, load_fitted
    model, processor = load_fitted("models/bottle")
    calibrate(model, false_alarm_rate=0.001)                 # from the held-out scores fit_padim stored
    calibrate(model, "recent/good/", false_alarm_rate=0.01)  # from new good images
    print(describe_calibration(model.config))
    ```
    """
    record = model.config.calibration or {}
    # A labelled (evaluate) calibration keeps the good-only record it replaced under "good_only".
    record = record if record.get("method") == GOOD_ONLY else (record.get("good_only") or {})
    if false_alarm_rate is None:
        false_alarm_rate = record.get("target_false_alarm_rate") or DEFAULT_FALSE_ALARM_RATE
    if good_images is None:
        if record.get("method") != GOOD_ONLY or not record.get("scores"):
            raise ValueError(
                "this model stores no held-out good scores (it was fitted without a holdout, or its thresholds come "
                "from labelled calibration): pass good images (`good_images=...`)"
            )
        source = record.get("source")
        pixel_quantiles = record.get("pixel_score_quantiles")
        new = good_only_calibration(record["scores"], false_alarm_rate, source=source)
        if pixel_quantiles is not None:  # the summary stays; the share above a new threshold needs the pixels again
            new["pixel_score_quantiles"] = pixel_quantiles
        if record.get("scored_against") is not None:
            new["scored_against"] = record["scored_against"]
    else:
        if model.config.num_train_images == 0:
            raise ValueError("the model is not fitted: fit it before calibrating")
        from .image_processing_padim import PadimImageProcessor

        processor = processor or PadimImageProcessor.from_padim_config(model.config)
        model.eval()
        scores, pixels = score_batches(model, good_image_batches(good_images, processor, batch_size))
        from .files import dataset_reference

        # A folder name, never a local absolute path: config.json is published with the model.
        name = dataset_reference(good_images) if isinstance(good_images, (str, Path)) else None
        source = {"kind": "good_images", **({"name": name} if name is not None else {})}
        new = good_only_calibration(scores, false_alarm_rate, pixels, source=source)
        new["scored_against"] = f"the fitted Gaussian of {model.config.num_train_images} images"
    warn_if_not_estimable(new)
    apply_calibration(model.config, new)
    return model


# ----------------------------------------------------------------------------------------------------------------
# padim-hf calibrate


def main(args: argparse.Namespace) -> None:
    """`padim-hf calibrate` once its options are parsed (padim_hf.commands): `calibrate`, then config.json rewritten."""
    from .evaluate import load_fitted, update_config_file

    if not args.model.is_dir():
        raise FileNotFoundError(f"model directory not found: {args.model} (calibrate rewrites a local model's config)")
    model, processor = load_fitted(str(args.model), cpu=args.cpu)
    good = args.good_images if args.good_images is None or len(args.good_images) > 1 else args.good_images[0]
    calibrate(model, good, false_alarm_rate=args.false_alarm_rate, processor=processor, batch_size=args.batch_size)
    update_config_file(args.model, model)
    stale = [name for name in ("onnx", "openvino") if (args.model / name).is_dir()]
    if stale:
        logger.warning(
            "%s still hold the old thresholds (in the graph and padim_export.json): export again to use the new ones",
            ", ".join(f"{args.model / name}/" for name in stale),
        )
    print(describe_calibration(model.config))


__all__ = [
    "DEFAULT_FALSE_ALARM_RATE",
    "DEFAULT_HOLDOUT_FRACTION",
    "GOOD_ONLY",
    "LABELLED_F1",
    "apply_calibration",
    "calibrate",
    "describe_calibration",
    "good_only_calibration",
]
