"""Evaluate a fitted model on a labelled test split; store thresholds, normalisation and metrics in its config."""

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import Collator, decode_image, drop_unreadable, load_split
from .files import atomic_model_directory, dataset_reference
from .fit import add_data_arguments
from .image_processing_padim import PadimImageProcessor
from .metrics import aupro, auroc, f1_max
from .modeling_padim import PadimModel
from .postprocess import overlay_heatmap

METRIC_NAMES = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max")


def load_fitted(name: str, cpu: bool = False) -> tuple[PadimModel, PadimImageProcessor]:
    """A fitted model (local directory or Hub repo id) on the GPU when there is one, and its image processor."""
    if name.startswith((".", "/", "~")) and not Path(name).is_dir():
        raise FileNotFoundError(f"model directory not found: {name}")
    model = PadimModel.from_pretrained(name)
    model.to("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    return model, PadimImageProcessor.from_pretrained(name)


@torch.no_grad()
def predict_split(model: PadimModel, processor: PadimImageProcessor, dataset, batch_size: int, with_masks: bool) -> dict:
    """Scores, labels, paths and (with masks) ground truth and maps at each image's original size."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(processor, with_masks=with_masks))
    device = model.gaussian.mean.device
    result = {"scores": [], "labels": [], "paths": [], "maps": [], "masks": []}
    for batch in tqdm(loader, unit="batch", desc="evaluate"):
        output = model(batch["pixel_values"].to(device))
        result["scores"].extend(output.pred_score.cpu().tolist())
        result["labels"].extend(batch["labels"].tolist())
        result["paths"].extend(batch["paths"])
        if with_masks:
            maps = processor.post_process_anomaly_maps(output.anomaly_map.cpu(), batch["sizes"])
            result["maps"].extend(m.numpy() for m in maps)
            result["masks"].extend(batch["masks"])
    return result


def compute_metrics(result: dict) -> tuple[dict, float, float]:
    """(metrics, image F1 threshold, pixel F1 threshold) from `predict_split`'s output."""
    scores, labels = np.asarray(result["scores"]), np.asarray(result["labels"])
    image_f1, image_threshold = f1_max(labels, scores)
    metrics = {"image_auroc": auroc(labels, scores), "image_f1_max": image_f1}
    pixel_threshold = float("nan")
    if result["masks"]:
        # Pixel metrics at each image's original resolution; images of different sizes are flattened together.
        flat_masks = np.concatenate([m.ravel() for m in result["masks"]])
        flat_maps = np.concatenate([m.ravel() for m in result["maps"]])
        metrics["pixel_auroc"] = auroc(flat_masks, flat_maps)
        metrics["pixel_f1_max"], pixel_threshold = f1_max(flat_masks, flat_maps)
        same_size = len({m.shape for m in result["masks"]}) == 1
        metrics["pixel_aupro"] = (
            aupro(np.stack(result["masks"]), np.stack(result["maps"]))
            if same_size
            else float(np.mean([aupro(m[None], p[None]) for m, p in zip(result["masks"], result["maps"]) if m.any()]))
        )
    return metrics, image_threshold, pixel_threshold


def write_gallery(result: dict, dataset, path: Path, vmin: float, vmax: float, count: int = 8) -> None:
    """A grid of test images with their heatmaps (anomalous first), for the model card."""
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(result["labels"]), kind="stable")[:count]
    columns = min(4, len(order))
    rows = math.ceil(len(order) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), order):
        image = decode_image(dataset[int(index)]["image"], result["paths"][index])
        axis.imshow(overlay_heatmap(image, result["maps"][index], vmin, vmax))
        axis.set_title(f"{Path(result['paths'][index]).parent.name} {result['scores'][index]:.1f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def update_config_file(model_dir: Path, model: PadimModel) -> None:
    """Rewrites config.json atomically (a crash never leaves a truncated config)."""
    with tempfile.NamedTemporaryFile("w", dir=model_dir, suffix=".json.tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        model.config.to_json_file(temporary, use_diff=True)
        os.replace(temporary, model_dir / "config.json")
    finally:
        temporary.unlink(missing_ok=True)


def evaluate(args: argparse.Namespace) -> dict:
    model, processor = load_fitted(args.model, args.cpu)
    dataset = load_split(
        args.data, args.split, config=args.hub_config, image_column=args.image_column,
        mask_column=args.mask_column, label_column=args.label_column,
    )
    if args.skip_unreadable:
        dataset, problems = drop_unreadable(dataset)
        for problem in problems:
            print(f"skipped: {problem}")
    with_masks = any(value is not None for value in dataset["mask"])
    result = predict_split(model, processor, dataset, args.batch_size, with_masks)
    metrics, image_threshold, pixel_threshold = compute_metrics(result)
    config = model.config
    config.image_threshold = image_threshold if math.isfinite(image_threshold) else None
    config.pixel_threshold = pixel_threshold if math.isfinite(pixel_threshold) else None
    config.score_min, config.score_max = float(min(result["scores"])), float(max(result["scores"]))
    config.metrics = {
        **{k: (round(v, 6) if math.isfinite(v) else None) for k, v in metrics.items()},
        "dataset": {"name": dataset_reference(args.data), "config": args.hub_config, "split": args.split},
        "num_images": len(result["scores"]),
    }
    target = Path(args.output_dir or args.model)
    if not args.no_save:
        if args.output_dir:  # replaces only a PaDiM model (or empty folder) there, crash-safely
            with atomic_model_directory(target, overwrite=True) as staging:
                model.save_pretrained(staging)
        elif not Path(args.model).is_dir():
            raise ValueError(f"{args.model} is not a local directory: pass --output-dir to save the evaluated model")
        else:
            update_config_file(target, model)
        if with_masks:
            write_gallery(result, dataset, target / "gallery.png", config.score_min, config.score_max)
    return {name: metrics.get(name) for name in METRIC_NAMES} | {
        "image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold,
    }


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--output-dir", help="save the evaluated model here (required for Hub models)")
    parser.add_argument("--no-save", action="store_true", help="do not store thresholds and metrics")
    parser.add_argument("--cpu", action="store_true")


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for name, value in report.items():
        print(f"{name:<{width}}  {'n/a' if value is None else f'{value:.4f}'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="padim-hf evaluate", description=__doc__)
    add_evaluate_arguments(parser)
    args = parser.parse_args(argv)
    print_report(evaluate(args), args.json)


if __name__ == "__main__":
    main()
