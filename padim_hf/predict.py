"""Predict on images: heatmap overlays at each image's original resolution plus a table of scores and labels."""

import argparse
import csv
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import Collator, image_list
from .evaluate import load_fitted
from .files import InterruptedAfterWriting, check_new_files
from .postprocess import normalized_score, overlay_heatmap


def output_names(paths: list[str]) -> list[str]:
    """Unique PNG names from image paths: the stem, prefixed by the parent folder when stems collide."""
    stems = [Path(p).stem for p in paths]
    return [
        (f"{Path(p).parent.name}_{stem}" if stems.count(stem) > 1 else stem) + ".png" for p, stem in zip(paths, stems)
    ]


def output_paths(output_dir: Path, names: list[str]) -> list[Path]:
    """Every file predict writes: a heatmap per image, then predictions.json and predictions.csv."""
    return [output_dir / name for name in names] + [output_dir / "predictions.json", output_dir / "predictions.csv"]


@torch.no_grad()
def predict(args: argparse.Namespace) -> list[dict]:
    """Writes a heatmap per image and predictions.json/.csv into `args.output_dir`.

    Refuses (FileExistsError, before any work) when any of those files exists already, an input image among them:
    predict only ever creates new files. An interruption raises `InterruptedAfterWriting` naming what was written.
    """
    dataset = image_list(args.inputs)
    names = output_names(dataset["path"])
    check_new_files(output_paths(args.output_dir, names), "predict's")
    model, processor = load_fitted(args.model, args.cpu)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    rows = []
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=Collator(processor, with_images=True))
    try:
        for batch in tqdm(loader, unit="batch", desc="predict"):
            output = model(batch["pixel_values"].to(model.gaussian.mean.device))
            maps = processor.post_process_anomaly_maps(output.anomaly_map.cpu(), batch["sizes"])
            for path, image, anomaly_map, score in zip(batch["paths"], batch["images"], maps, output.pred_score.cpu().tolist()):
                # Colour scale: the calibrated score range when known, else this map's own range.
                vmin = config.score_min if config.score_min is not None else float(anomaly_map.min())
                vmax = config.score_max if config.score_max is not None else float(anomaly_map.max())
                heatmap = args.output_dir / names[len(rows)]
                overlay_heatmap(image, anomaly_map.numpy(), vmin, vmax).save(heatmap)
                normalized = normalized_score(score, config)
                rows.append({
                    "path": path,
                    "score": score,
                    "normalized_score": None if normalized is None else float(normalized),
                    "label": None if config.image_threshold is None else ("anomalous" if score >= config.image_threshold else "normal"),
                    "heatmap": str(heatmap),
                })
    except KeyboardInterrupt as interruption:
        raise InterruptedAfterWriting(
            f"{len(rows)} of {len(names)} heatmaps were written to {args.output_dir} before the interruption; "
            "predictions.json/.csv were not written"
        ) from interruption
    (args.output_dir / "predictions.json").write_text(json.dumps(rows, indent=2))
    with open(args.output_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument(
        "--output-dir", required=True, type=Path,
        help="folder for heatmaps and predictions.json/.csv; predict refuses to replace any existing file there",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpu", action="store_true")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="padim-hf predict", description=__doc__)
    add_predict_arguments(parser)
    args = parser.parse_args(argv)
    rows = predict(args)
    print(f"{len(rows)} heatmaps and predictions.json/.csv in {args.output_dir}")


if __name__ == "__main__":
    main()
