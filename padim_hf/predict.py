"""Predict on images: heatmap overlays at each image's original resolution plus a table of scores and labels."""

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import Collator, image_list
from .evaluate import load_fitted
from .files import InterruptedAfterWriting, check_new_files
from .options import ENGINES
from .postprocess import normalized_score, overlay_heatmap



def load_engine(
    model: str, engine: str = "torch", cpu: bool = False, precision: str = "float32"
) -> tuple[Callable, object, object]:
    """(score, processor, config) for a model: `score(pixel_values)` returns (anomaly maps (B, 1, S, S), scores (B,))
    as CPU tensors; `config` carries the thresholds and score range.

    engine "torch" loads the checkpoint (`model`: directory or Hub repo id); "onnxruntime" and "openvino" run an
    export: `model` is an export folder, or a model directory / Hub repo holding one in `onnx/` or `openvino/`.
    `precision="bfloat16"` runs an OpenVINO export in bfloat16 (see `padim_hf.runtime.PRECISIONS`).
    """
    if precision != "float32" and engine != "openvino":
        raise ValueError(f"precision {precision!r} needs `engine='openvino'` (the {engine} engine runs float32)")
    if engine == "torch":
        fitted, processor = load_fitted(model, cpu)
        device = fitted.gaussian.mean.device

        def score(pixel_values: torch.Tensor):
            output = fitted(pixel_values.to(device))
            return output.anomaly_map.cpu(), output.pred_score.cpu()

        return score, processor, fitted.config
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    from .export import resolve_export_folder
    from .extras import require
    from .image_processing_padim import PadimImageProcessor
    from .runtime import PadimRuntime

    require(engine)  # "onnxruntime" / "openvino": a missing extra named before anything is downloaded or loaded

    folder = resolve_export_folder(model, engine)
    runtime = PadimRuntime(folder, engine, precision=precision)

    def score(pixel_values: torch.Tensor):
        outputs = runtime.run(pixel_values.numpy())
        return torch.from_numpy(outputs["anomaly_map"]), torch.from_numpy(outputs["pred_score"])

    keys = ("image_threshold", "pixel_threshold", "score_min", "score_max")
    config = SimpleNamespace(**{key: runtime.config[key] for key in keys}, calibration=runtime.config.get("calibration"))
    return score, PadimImageProcessor.from_pretrained(folder), config


def calibration_marker(config) -> Callable[[str], bool | None]:
    """`is_calibration(path)`: whether an input image is one the model's thresholds were calibrated on (listed in
    `config.calibration["images"]`, relative to the dataset folder the record names). Their scores set the
    threshold, so they are not test results; predictions mark them. None for every image when the model lists no
    calibration images (good-only calibration on held-out training images, or an export without the list)."""
    calibration = getattr(config, "calibration", None) or {}
    images = calibration.get("images") or []
    if not images:
        return lambda path: None
    root = PurePosixPath(str((calibration.get("dataset") or {}).get("name") or "")).name
    listed = {(root, *PurePosixPath(image).parts) if root else PurePosixPath(image).parts for image in images}
    lengths = sorted({len(parts) for parts in listed})

    def is_calibration(path: str) -> bool:
        parts = Path(path).resolve().parts
        return any(parts[-length:] in listed for length in lengths)

    return is_calibration


def plural(count: int, noun: str) -> str:
    """"1 heatmap", "2 heatmaps"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
def predict_images(
    model: str | Path,
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    engine: str = "torch",
    batch_size: int = 8,
    cpu: bool = False,
    precision: str = "float32",
) -> list[dict]:
    """Writes a heatmap per image and predictions.json/.csv into `output_dir`; returns the prediction rows.

    `model`: a model directory or Hub repo id (or an export folder for the onnxruntime/openvino engines, see
    `load_engine`); `inputs`: image files and folders. Refuses (FileExistsError, before any work) when any of the
    files to write exists already, an input image among them: predict only ever creates new files. An interruption
    raises `InterruptedAfterWriting` naming what was written.

    Example:

    ```python
    from padim_hf import predict_images
    rows = predict_images("models/bottle", ["images/", "part.png"], "predictions/")
    rows[0]  # {"path", "score", "normalized_score", "label": "normal" | "anomalous" | None, "heatmap", "calibration_image"}
    predict_images("models/bottle", ["images/"], "predictions-ov/", engine="openvino")   # after export_model
    ```
    """
    output_dir = Path(output_dir)
    dataset = image_list(inputs)
    names = output_names(dataset["path"])
    check_new_files(output_paths(output_dir, names), "predict's")
    score_batch, processor, config = load_engine(str(model), engine, cpu, precision)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    is_calibration = calibration_marker(config)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(processor, with_images=True))
    try:
        for batch in tqdm(loader, unit="batch", desc="predict"):
            anomaly_maps, scores = score_batch(batch["pixel_values"])
            maps = processor.post_process_anomaly_maps(anomaly_maps, batch["sizes"])
            for path, image, anomaly_map, score in zip(batch["paths"], batch["images"], maps, scores.tolist()):
                # Colour scale: the calibrated score range when known, else this map's own range.
                vmin = config.score_min if config.score_min is not None else float(anomaly_map.min())
                vmax = config.score_max if config.score_max is not None else float(anomaly_map.max())
                heatmap = output_dir / names[len(rows)]
                overlay_heatmap(image, anomaly_map.numpy(), vmin, vmax).save(heatmap)
                normalized = normalized_score(score, config)
                rows.append({
                    "path": path,
                    "score": score,
                    "normalized_score": None if normalized is None else float(normalized),
                    "label": None if config.image_threshold is None else ("anomalous" if score >= config.image_threshold else "normal"),
                    "heatmap": str(heatmap),
                    # True: the thresholds were set on this image (see calibration_marker), not a test result
                    "calibration_image": is_calibration(path),
                })
    except KeyboardInterrupt as interruption:
        raise InterruptedAfterWriting(
            f"{len(rows)} of {plural(len(names), 'heatmap')} were written to {output_dir} before the interruption; "
            "predictions.json/.csv were not written"
        ) from interruption
    (output_dir / "predictions.json").write_text(json.dumps(rows, indent=2))
    with open(output_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def predict(args: argparse.Namespace) -> list[dict]:
    """`padim-hf predict`: `predict_images` with the parsed arguments."""
    return predict_images(
        args.model, args.inputs, args.output_dir, engine=args.engine, batch_size=args.batch_size, cpu=args.cpu,
        precision=args.precision,
    )


def main(args: argparse.Namespace) -> None:
    """`padim-hf predict` once its options are parsed (padim_hf.commands): `predict_images`, then a summary printed."""
    rows = predict(args)
    print(f"{plural(len(rows), 'heatmap')} and predictions.json/.csv in {args.output_dir}")
    if rows and rows[0]["label"] is not None:
        flagged = sum(row["label"] == "anomalous" for row in rows)
        print(f"{flagged} of {plural(len(rows), 'image')} flagged as anomalous")
        calibration = sum(row["calibration_image"] is True for row in rows)
        if calibration:
            print(f"{plural(calibration, 'image')} set the thresholds (calibration_image in predictions.csv): "
                  "their verdicts are not test results")
    else:
        print("no verdicts: the model has no threshold (padim-hf calibrate --model M --good-images DIR sets one)")


if __name__ == "__main__":  # `python -m padim_hf.predict` (torchrun, accelerate launch): the command line's logging and errors
    import sys

    from padim_hf.cli import main as command_line

    command_line(["predict", *sys.argv[1:]])
