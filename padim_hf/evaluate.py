"""Evaluate a fitted model on a labelled test split: `evaluate_padim` (Python) or `padim-hf evaluate`.

Protocol (`protocol="model"`, the default, as the paper and anomalib): pixel metrics at the model's input
resolution; masks are resized like the images (nearest neighbour at pixel centres, like PIL's NEAREST in the
paper's code) and centre-cropped with the image processor's own crop. `protocol="original"`: maps are mapped back
to each image's original size as `predict` writes them (bilinear; with a crop preset the margin the model never
saw is filled by extending the map's border values, and those margin pixels are scored like any other).

Pixel metrics stream through fixed-size histograms (`StreamingPixelMetrics`): memory does not grow with the
number of images. Under `torchrun`/`accelerate launch` each process scores a contiguous shard and the states are
summed, so several processes give the same figures as one.

Calibration (thresholds, score normalisation) is chosen on calibration images that the reported metrics exclude:
a separate split, or a seeded, label-stratified fraction of the test split. Without calibration images no
threshold is chosen (AUROC, AUPRO and F1-max need none).
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .calibration import GOOD_ONLY, LABELLED_F1, describe_calibration
from .data import Collator, dataset_shard, decode_image, drop_unreadable, load_split
from .files import atomic_model_directory, atomic_write_text, without_local_paths
from .fit import make_accelerator
from .image_processing_padim import PadimImageProcessor
from .metrics import StreamingPixelMetrics, auroc, f1_max
from .modeling_padim import PadimModel
from .options import PROTOCOLS
from .postprocess import overlay_heatmap

METRIC_NAMES = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max")


@dataclass
class EvaluationResult:
    """Metrics of one evaluation (NaN where undefined, e.g. pixel metrics without masks) and its calibration.

    Thresholds and `score_min`/`score_max` come from the calibration images only; without them the thresholds are
    the model's own (e.g. good-only ones from the fit, None if it has none) and the score range stays None.
    `false_alarm_rate` and `recall` are the verdicts at that image threshold on the evaluated images.
    """

    image_auroc: float
    pixel_auroc: float
    pixel_aupro: float
    image_f1_max: float
    pixel_f1_max: float
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    protocol: str = "model"
    num_images: int = 0
    num_anomalous: int = 0
    num_calibration_images: int = 0
    calibration: dict | None = None
    # The verdicts at the image threshold in force (the new one when calibrated here, else the model's own, e.g.
    # good-only thresholds from the fit) on the evaluated images: share of good images flagged, of defects flagged.
    false_alarm_rate: float | None = None
    recall: float | None = None
    num_processes: int = 1
    seconds: float = 0.0
    images_per_second: float = 0.0
    scores: list[float] = field(default_factory=list, repr=False)  # per evaluated image, in dataset order
    paths: list[str] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float | None]:
        """The five metrics, None where undefined."""
        return {name: _finite_or_none(getattr(self, name)) for name in METRIC_NAMES}

    def report(self) -> dict:
        """What the CLI prints: metrics, thresholds, and what they were computed on."""
        keys = (
            "image_threshold", "pixel_threshold", "false_alarm_rate", "recall", "protocol", "num_images",
            "num_calibration_images", "num_processes",
        )
        return self.metrics() | {key: getattr(self, key) for key in keys}

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in ("scores", "paths")}


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def load_fitted(name: str, cpu: bool = False) -> tuple[PadimModel, PadimImageProcessor]:
    """A fitted model (local directory or Hub repo id) on the GPU when there is one, and its image processor.

    Example:

    ```python
    from padim_hf import load_fitted
    model, processor = load_fitted("models/bottle")      # or "my-org/padim-bottle"
    ```
    """
    if name.startswith((".", "/", "~")) and not Path(name).is_dir():
        raise FileNotFoundError(f"model directory not found: {name}")
    model = PadimModel.from_pretrained(name)
    model.to("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    return model, PadimImageProcessor.from_pretrained(name)


def masks_at_model_resolution(masks: list[np.ndarray], processor: PadimImageProcessor) -> list[np.ndarray]:
    """Ground-truth masks (H, W) transformed like the images: resized to the processor's size with PIL's NEAREST
    (pixel-centre aligned like the images' resize; what the paper's code does to masks), then centre-cropped with
    the processor's crop offsets.

    PIL rather than torchvision's NEAREST_EXACT: the two round a few pixel centres differently at non-integer
    scales (256 -> 80 moves ~1% of a small defect's pixels), and PIL is the reference protocol.
    """
    height, width = processor.size["height"], processor.size["width"]
    result = []
    for mask in masks:
        resized = PIL.Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((width, height), PIL.Image.NEAREST)
        resized = np.asarray(resized) > 127
        if processor.do_center_crop:
            crop_height, crop_width = processor.crop_size["height"], processor.crop_size["width"]
            top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)  # as center_crop does
            resized = resized[top : top + crop_height, left : left + crop_width]
        result.append(resized)
    return result


class EvaluationCollator(Collator):
    """The fit/predict collator plus masks in the evaluation protocol's geometry (done in the loader's workers)."""

    def __init__(self, processor: PadimImageProcessor, protocol: str):
        super().__init__(processor, with_masks=True)
        self.protocol = protocol

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        if self.protocol == "model":
            batch["masks"] = masks_at_model_resolution(batch["masks"], self.processor)
        return batch


def check_masks(dataset: Dataset) -> bool:
    """Whether pixel metrics can be computed: every anomalous image has a mask (False when none has one)."""
    labels, masks = dataset["label"], dataset["mask"]
    with_mask = [mask is not None for mask in masks]
    if not any(with_mask):
        return False
    missing = [index for index, (label, has) in enumerate(zip(labels, with_mask)) if label == 1 and not has]
    if missing:
        raise ValueError(
            f"{len(missing)} anomalous images have no ground-truth mask (first: {dataset[missing[0]]['path']}); "
            "pixel metrics need a mask for every anomalous image"
        )
    return True


def calibration_subset(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(evaluation images, calibration images): a seeded split of `dataset`, stratified by label, with `fraction`
    of the images (at least one per label) for calibration."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(dataset["label"])
    counts = {int(label): int((labels == label).sum()) for label in np.unique(labels)}
    if min(counts.values()) < 2:
        raise ValueError(f"a calibration split stratified by label needs >= 2 images per label, got {counts}")
    try:
        evaluation, calibration = train_test_split(
            np.arange(len(dataset)), test_size=fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:  # e.g. a fraction too small to hold one image of each label
        raise ValueError(f"cannot take a calibration fraction {fraction} of {len(dataset)} images {counts}: {error}") from error
    return dataset.select(sorted(evaluation)), dataset.select(sorted(calibration))


@dataclass
class SplitScores:
    """Image scores of a split (all processes, dataset order) and its summed pixel-metric state."""

    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    pixels: StreamingPixelMetrics | None


@torch.no_grad()
def score_split(
    model: PadimModel,
    processor: PadimImageProcessor,
    dataset: Dataset,
    accelerator: Accelerator,
    *,
    protocol: str = "model",
    batch_size: int = 16,
    num_workers: int = 0,
    num_bins: int = 2**20,
    progress: bool = True,
    description: str = "evaluate",
) -> SplitScores:
    """Scores `dataset` (this process's contiguous shard of it) and combines the results of all processes."""
    with_masks = check_masks(dataset)
    shard = dataset_shard(dataset, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, collate_fn=EvaluationCollator(processor, protocol)
    )
    device = model.gaussian.mean.device
    pixels = StreamingPixelMetrics(num_bins) if with_masks else None
    scores, labels, paths = [], [], []
    for batch in tqdm(loader, unit="batch", desc=description, disable=not (progress and accelerator.is_local_main_process)):
        output = model(batch["pixel_values"].to(device))
        scores.extend(output.pred_score.float().cpu().tolist())
        labels.extend(batch["labels"].tolist())
        paths.extend(batch["paths"])
        if pixels is not None:
            maps = output.anomaly_map.float().cpu()
            maps = processor.post_process_anomaly_maps(maps, batch["sizes"]) if protocol == "original" else maps[:, 0]
            pixels.update(maps, batch["masks"])
    # gather_object concatenates the processes' lists in rank order: the shards are contiguous, so this is
    # dataset order. Each list holds one float per image (the only per-image state).
    scores, labels, paths = gather_object(scores), gather_object(labels), gather_object(paths)
    if pixels is not None:
        pixels.all_reduce_()
    return SplitScores(np.asarray(scores, dtype=np.float64), np.asarray(labels), list(paths), pixels)


def evaluate_padim(
    model: PadimModel,
    dataset: Dataset,
    *,
    processor: PadimImageProcessor | None = None,
    protocol: str = "model",
    calibration: Dataset | float | None = None,
    calibration_seed: int = 0,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    num_bins: int = 2**20,
    progress: bool = True,
) -> EvaluationResult:
    """Image AUROC, pixel AUROC, AUPRO and F1-max of a fitted model on a labelled split (see the module docstring).

    `dataset`: rows with image, mask (None for good images), label (0 good, 1 anomalous) and path, e.g. from
    `padim_hf.data.load_split`. `calibration`: a Dataset of calibration images, or a fraction of `dataset` drawn
    with `calibration_seed` (stratified by label); its images are left out of the metrics and give the
    thresholds and score range. Runs on the model's device; under `torchrun` pass an `Accelerator(cpu=...)` of
    the launched processes.

    Example:

    ```python
    from padim_hf import evaluate_padim, load_fitted, load_split
    model, processor = load_fitted("models/bottle")
    result = evaluate_padim(model, load_split("path/to/bottle", "test"), calibration=0.5)
    print(result.report())          # image_auroc, pixel_auroc, pixel_aupro, f1-max, thresholds...
    ```
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "select"):
        raise TypeError("evaluate_padim needs a map-style datasets.Dataset (not a streamed IterableDataset)")
    processor = processor or PadimImageProcessor.from_padim_config(model.config)
    accelerator = accelerator or make_accelerator(cpu=model.gaussian.mean.device.type == "cpu")
    calibration_info = None
    if isinstance(calibration, (int, float)) and not isinstance(calibration, bool):
        dataset, calibration_set = calibration_subset(dataset, float(calibration), calibration_seed)
        calibration_info = {"fraction": float(calibration), "seed": calibration_seed, "stratified_by": "label"}
    elif calibration is None or isinstance(calibration, Dataset):
        calibration_set = calibration
    else:
        raise TypeError(f"calibration must be a Dataset, a fraction or None, got {type(calibration).__name__}")
    model.eval()
    options = dict(protocol=protocol, batch_size=batch_size, num_workers=num_workers, num_bins=num_bins, progress=progress)
    started = time.perf_counter()
    evaluated = score_split(model, processor, dataset, accelerator, **options)
    calibrated = None
    if calibration_set is not None:
        calibrated = score_split(model, processor, calibration_set, accelerator, description="calibrate", **options)
    seconds = time.perf_counter() - started
    image_f1, _ = f1_max(evaluated.labels, evaluated.scores)
    pixel = evaluated.pixels.compute() if evaluated.pixels is not None else {}
    result = EvaluationResult(
        image_auroc=auroc(evaluated.labels, evaluated.scores),
        pixel_auroc=pixel.get("pixel_auroc", float("nan")),
        pixel_aupro=pixel.get("pixel_aupro", float("nan")),
        image_f1_max=image_f1,
        pixel_f1_max=pixel.get("pixel_f1_max", float("nan")),
        protocol=protocol,
        num_images=len(evaluated.scores),
        num_anomalous=int((evaluated.labels == 1).sum()),
        num_processes=accelerator.num_processes,
        seconds=seconds,
        scores=evaluated.scores.tolist(),
        paths=evaluated.paths,
    )
    if calibrated is not None:
        _, image_threshold = f1_max(calibrated.labels, calibrated.scores)
        pixel_threshold = calibrated.pixels.compute()["pixel_threshold"] if calibrated.pixels is not None else None
        result.image_threshold = _finite_or_none(image_threshold)
        result.pixel_threshold = _finite_or_none(pixel_threshold)
        result.score_min, result.score_max = float(calibrated.scores.min()), float(calibrated.scores.max())
        result.num_calibration_images = len(calibrated.scores)
        result.calibration = (
            labelled_calibration_record(result, calibrated.scores, calibrated.labels)
            | (calibration_info or {})
            | {"num_images": len(calibrated.paths), "images": calibrated.paths}
        )
    else:  # the model's own thresholds (good-only calibration at fit time, or an earlier evaluation)
        result.image_threshold, result.pixel_threshold = model.config.image_threshold, model.config.pixel_threshold
    result.false_alarm_rate, result.recall = verdict_rates(evaluated.scores, evaluated.labels, result.image_threshold)
    total = result.num_images + result.num_calibration_images
    result.images_per_second = total / seconds if seconds > 0 else float("nan")
    return result


def verdict_rates(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> tuple[float | None, float | None]:
    """(share of good images flagged, share of anomalous images flagged) at `threshold` (None where undefined)."""
    if threshold is None:
        return None, None
    flagged = np.asarray(scores) >= threshold
    good, anomalous = np.asarray(labels) == 0, np.asarray(labels) == 1
    return (float(flagged[good].mean()) if good.any() else None, float(flagged[anomalous].mean()) if anomalous.any() else None)


def labelled_calibration_record(result: EvaluationResult, calibration_scores: np.ndarray, calibration_labels: np.ndarray) -> dict:
    """The `config.calibration` fields common to every calibration method, for labelled (F1) calibration."""
    flagged, _ = verdict_rates(calibration_scores, calibration_labels, result.image_threshold)
    return {
        "method": LABELLED_F1,
        "num_images": len(calibration_scores),
        "num_good": int((calibration_labels == 0).sum()),
        "num_anomalous": int((calibration_labels == 1).sum()),
        "target_false_alarm_rate": None,  # F1-optimal: no rate is targeted
        "achieved_false_alarm_rate": flagged,
    }


def relative_paths(paths: list[str], root: str | None) -> list[str]:
    """Image paths relative to the dataset folder when they lie in it (config.json carries no local prefix)."""
    if root is None or not Path(root).is_dir():
        return list(paths)
    base = Path(root).resolve()
    relative = []
    for path in paths:
        try:
            relative.append(Path(path).resolve().relative_to(base).as_posix())
        except ValueError:
            relative.append(path)
    return relative


def record_evaluation(model: PadimModel, result: EvaluationResult, dataset: dict, calibration: dict | None = None) -> None:
    """Writes metrics (and, when calibrated, thresholds, score range and which images calibrated) into the config.

    `dataset`: {"name", "config", "split"} of the evaluated images; `calibration`: the same for a separate
    calibration split (None: the calibration images came from `dataset`). Without calibration the model keeps
    the thresholds it had (from an earlier calibration, recorded in `config.calibration`).
    """
    config = model.config
    config.metrics = {
        **{name: (round(value, 6) if value is not None else None) for name, value in result.metrics().items()},
        "dataset": dataset,
        "num_images": result.num_images,
        "protocol": result.protocol,
        "calibration_images_excluded": result.num_calibration_images,
    }
    for key in ("false_alarm_rate", "recall"):  # verdicts at the threshold in force, on the evaluated images
        if getattr(result, key) is not None:
            config.metrics[key] = round(getattr(result, key), 6)
    if result.calibration is not None:
        previous = config.calibration or {}
        # Kept, so `calibrate` can go back to good-only thresholds at any rate without refitting.
        good_only = previous if previous.get("method") == GOOD_ONLY else previous.get("good_only")
        config.image_threshold, config.pixel_threshold = result.image_threshold, result.pixel_threshold
        config.score_min, config.score_max = result.score_min, result.score_max
        source = calibration or dataset
        config.calibration = {
            "dataset": source,
            **{key: value for key, value in result.calibration.items() if key != "images"},
            "images": relative_paths(result.calibration["images"], source.get("name")),
            **({"good_only": good_only} if good_only else {}),
        }
    # Stored (and published) as Hub ids and folder names: never a local absolute path (files.without_local_paths).
    config.metrics = without_local_paths(config.metrics)
    if config.calibration is not None:
        config.calibration = without_local_paths(config.calibration)


def write_gallery(
    model: PadimModel, processor: PadimImageProcessor, dataset: Dataset, result: EvaluationResult, path: Path, count: int = 8
) -> None:
    """A grid of evaluated images with their heatmaps (anomalous first), for the model card; only these few
    images are scored again, at their original size."""
    import matplotlib.pyplot as plt

    evaluated = set(result.paths)
    candidates = [index for index, row_path in enumerate(dataset["path"]) if row_path in evaluated]
    labels = dataset["label"]
    chosen = sorted(candidates, key=lambda index: -labels[index])[:count]  # stable: anomalous first, then in order
    if not chosen:
        return
    rows = [dataset[index] for index in chosen]
    images = [decode_image(row["image"], row["path"]) for row in rows]
    with torch.no_grad():
        output = model(processor(images, return_tensors="pt")["pixel_values"].to(model.gaussian.mean.device))
    maps = processor.post_process_anomaly_maps(output.anomaly_map.float().cpu(), [image.size[::-1] for image in images])
    vmin = result.score_min if result.score_min is not None else min(result.scores)
    vmax = result.score_max if result.score_max is not None else max(result.scores)
    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3 * columns, 3.2 * lines), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, row, image, anomaly_map, score in zip(axes.ravel(), rows, images, maps, output.pred_score.tolist()):
        axis.imshow(overlay_heatmap(image, anomaly_map.numpy(), vmin, vmax))
        axis.set_title(f"{Path(row['path']).parent.name} {score:.1f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def update_config_file(model_dir: Path, model: PadimModel) -> None:
    """Rewrites config.json atomically (a crash never leaves a truncated config, nor a stray temporary file)."""
    atomic_write_text(model_dir / "config.json", model.config.to_json_string(use_diff=True))


def save_evaluation(
    model: PadimModel,
    processor: PadimImageProcessor,
    dataset: Dataset,
    result: EvaluationResult,
    model_dir: str | Path,
    output_dir: str | Path | None = None,
) -> Path:
    """Stores an evaluated model (thresholds, metrics, calibration: see `record_evaluation`) and its gallery.

    Without `output_dir` the local `model_dir`'s config.json is rewritten atomically; with it, the whole model is
    written there (replacing only a PaDiM model or an empty folder, crash-safely). Returns the folder written.

    Example:

    ```python
    from padim_hf import evaluate_padim, load_fitted, load_split, save_evaluation
    model, processor = load_fitted("models/bottle")
    test = load_split("path/to/bottle", "test")
    result = evaluate_padim(model, test, processor=processor, calibration=0.5)
    save_evaluation(model, processor, test, result, "models/bottle")   # thresholds, metrics, gallery.png
    ```
    """
    target = Path(output_dir or model_dir)
    if output_dir:
        with atomic_model_directory(target, overwrite=True) as staging:
            model.save_pretrained(staging)
    elif not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir} is not a local directory: pass `output_dir=...` to save the evaluated model")
    else:
        update_config_file(target, model)
    if not math.isnan(result.pixel_auroc):
        write_gallery(model, processor, dataset, result, target / "gallery.png")
    return target


def evaluate(args: argparse.Namespace) -> dict:
    """`padim-hf evaluate`: loads model and data as the arguments say, calls `evaluate_padim`, stores the results;
    returns `EvaluationResult.report()`."""
    if args.calibration_split and args.calibration_fraction:
        raise ValueError("pass either --calibration-split or --calibration-fraction, not both")
    accelerator = make_accelerator(cpu=args.cpu)
    model, processor = load_fitted(args.model, cpu=True)
    model.to(accelerator.device)
    options = dict(config=args.hub_config, image_column=args.image_column, mask_column=args.mask_column, label_column=args.label_column)
    dataset = load_split(args.data, args.split, **options)
    calibration = args.calibration_fraction
    if args.calibration_split:
        if args.calibration_split == args.split:
            raise ValueError(f"--calibration-split {args.split} is the evaluated split: its images would be in the metrics")
        calibration = load_split(args.data, args.calibration_split, **options)
    if args.skip_unreadable:
        dataset, problems = drop_unreadable(dataset)
        if isinstance(calibration, Dataset):
            calibration, more = drop_unreadable(calibration)
            problems += more
        for problem in problems:
            print(f"skipped: {problem}")
    result = evaluate_padim(
        model, dataset, processor=processor, protocol=args.protocol, calibration=calibration,
        calibration_seed=args.calibration_seed, batch_size=args.batch_size, num_workers=args.num_workers,
        accelerator=accelerator,
    )
    described = {"name": args.data, "config": args.hub_config, "split": args.split}
    calibration_source = {**described, "split": args.calibration_split} if args.calibration_split else None
    record_evaluation(model, result, described, calibration_source)
    if not args.no_save and accelerator.is_main_process:
        save_evaluation(model, processor, dataset, result, args.model, args.output_dir)
    if accelerator.is_main_process:
        if result.calibration is not None:
            replaced = "replaced the model's good-only thresholds (kept in calibration.good_only)" if "good_only" in (
                model.config.calibration or {}) else "set the thresholds"
            print(f"note: labelled calibration on {result.num_calibration_images} images {replaced}", file=sys.stderr)
        elif result.image_threshold is None:
            print(
                "note: the model has no threshold and no calibration images were given (--calibration-split or "
                "--calibration-fraction): verdicts are not evaluated", file=sys.stderr,
            )
        else:
            print(f"note: verdicts at the model's own threshold: {describe_calibration(model.config)}", file=sys.stderr)
    return result.report()


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for name, value in report.items():
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{name:<{width}}  {text}")


def main(args: argparse.Namespace) -> None:
    """`padim-hf evaluate` once its options are parsed (padim_hf.commands): `evaluate`, then the report printed."""
    report = evaluate(args)
    if PartialState().is_main_process:
        print_report(report, args.json)


if __name__ == "__main__":  # `python -m padim_hf.evaluate` (torchrun, accelerate launch): the command line's logging and errors
    from padim_hf.cli import main as command_line

    command_line(["evaluate", *sys.argv[1:]])
