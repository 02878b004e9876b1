"""Fit and evaluate one product at several input sizes: `run_sweep` or `padim-hf sweep`, the resolution guide.

Resolution is a per-product choice: a larger grid keeps small defects visible but costs memory (the Gaussian grows
with the grid area), time and checkpoint size, and can lose large defects. The sweep fits and evaluates the product
at every size asked for (squares, HEIGHTxWIDTH, or `auto` / `auto:SIDE` at the images' own aspect ratio) and prints
one table: size, aspect, grid, fit time, the fit's peak RSS (each size runs in a fresh process so peaks are its
own) and what the fit added to the process, padim_hf's estimate of that (`padim_hf.memory`, which refuses fits that
would not fit), checkpoint size, image AUROC, pixel AUROC and AUPRO.

Pixel metrics default to the `original` protocol: every size's maps are scored at each image's own resolution
against the same full-resolution masks, so sizes compare fairly (at each model's own resolution, thin defects
would shrink or vanish from the masks of the smaller sizes).
"""

import argparse
import json
import math
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .benchmark import write_json_atomically
from .configuration_padim import format_size, height_width
from .data import load_split
from .evaluate import evaluate_padim, record_evaluation
from .fit import build_config, build_model, fit_padim, make_accelerator, save_fitted, training_split
from .memory import GIB, estimate_fit_memory
from .options import CONFIG_FIELDS, PROTOCOLS
from .resolution import ASPECT_TOLERANCE, common_aspect, is_auto, resolve_image_size, training_image_sizes

RESULT_FILE = "result.json"
COLUMNS = (
    ("size", "Size (h x w)"), ("aspect", "Aspect"), ("grid", "Grid"), ("fit_seconds", "Fit (s)"),
    ("fit_peak_rss_gib", "Fit peak RSS (GiB)"), ("fit_added_gib", "Added by the fit (GiB)"),
    ("estimated_peak_gib", "Estimated (GiB)"), ("checkpoint_mb", "Checkpoint (MB)"),
    ("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("pixel_aupro", "AUPRO"),
)
PERCENT = {"image_auroc", "pixel_auroc", "pixel_aupro"}


@dataclass
class SweepResult:
    """One row per size (in the order asked) and where the tables were written."""

    rows: list[dict]
    output_dir: Path

    @property
    def markdown(self) -> str:
        return (self.output_dir / "results.md").read_text()


def aspect_label(size, image_aspect: float | None) -> str:
    """"native" when `size` keeps the training images' width/height ratio, "square", or the ratio itself."""
    height, width = height_width(size)
    if image_aspect is not None and abs(width / height / image_aspect - 1) <= 3 * ASPECT_TOLERANCE:
        return "native"  # sides rounded to the grid's stride move the ratio by a few per cent at most
    return "square" if height == width else f"{width / height:.2f}"


def size_label(size) -> str:
    height, width = height_width(size)
    return f"{height}x{width}"


def _run_size(job: dict) -> dict:
    """Fits, evaluates and saves one size (in a fresh process when the sweep isolates sizes); returns its row."""
    accelerator = make_accelerator(cpu=job["cpu"])
    train = training_split(job["data"], "train")
    before = psutil.Process().memory_info().rss  # what the fit adds to this process is what padim_hf estimates
    model = build_model(job["preset"], backbone_weights=job["backbone_weights"], **job["overrides"])
    started = time.perf_counter()
    model = fit_padim(model, train, batch_size=job["batch_size"], accelerator=accelerator, progress=False)
    fit_seconds = time.perf_counter() - started
    fit_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = evaluate_padim(
        model, load_split(job["data"], "test"), protocol=job["protocol"], batch_size=job["batch_size"],
        accelerator=accelerator, progress=False,
    )
    model.config.train_dataset = job["data"]
    record_evaluation(model, result, {"name": job["data"], "config": None, "split": "test"})
    model_dir = Path(job["model_dir"])
    save_fitted(model, model_dir, overwrite=True)  # a model without result.json is an unfinished run's: replaced
    weights = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    return {
        **result.metrics(),
        "fit_seconds": fit_seconds,
        "fit_peak_rss_gib": fit_peak / GIB,
        "fit_added_gib": (fit_peak - before) / GIB,
        "checkpoint_mb": weights / 1e6,
        "images_per_second": result.images_per_second,
        "num_train_images": model.config.num_train_images,
        "num_test_images": result.num_images,
        "grid": f"{model.grid_shape[0]}x{model.grid_shape[1]}",
        "positions": model.num_positions,
        "process": os.getpid(),
    }


def _child(job: dict, queue) -> None:
    try:
        queue.put(("ok", _run_size(job)))
    except BaseException as error:  # reported to the parent, which raises it with the size named
        queue.put(("error", f"{type(error).__name__}: {error}"))


def _run_isolated(job: dict) -> dict:
    """`_run_size` in a fresh (spawned) process, so its peak RSS is this size's alone."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(job, queue))
    process.start()
    try:
        status, value = queue.get()
    finally:
        process.join()
    if status != "ok":
        raise RuntimeError(f"size {job['label']} failed: {value}")
    return value


def write_tables(rows: list[dict], output_dir: Path, note: str) -> None:
    """results.json, results.csv and results.md (metrics in %)."""
    import csv

    write_json_atomically(output_dir / "results.json", {"note": note, "rows": rows})
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key) for key, _ in COLUMNS})

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if isinstance(value, str):
            return value.replace("x", " x ") if key in ("size", "grid") else value
        if value is None or not math.isfinite(value):
            return "n/a"
        if key in PERCENT:
            return f"{100 * value:.1f}"
        return f"{value:.2f}" if key.endswith("_gib") else f"{value:.1f}"

    lines = [
        "| " + " | ".join(header for _, header in COLUMNS) + " |",
        "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3),
        *("| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |" for row in rows),
    ]
    (output_dir / "results.md").write_text(note + "\n\n" + "\n".join(lines) + "\n")


def run_sweep(
    data: str | Path,
    sizes: list,
    preset: str | Path = "padim-lite0-offline",
    output_dir: str | Path = "padim-sweep",
    *,
    overrides: dict | None = None,
    backbone_weights: str | None = None,
    protocol: str = "original",
    batch_size: int = 16,
    cpu: bool = False,
    isolate: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Fits and evaluates the MVTec-style folder `data` at every size in `sizes`; writes models and tables.

    `sizes`: ints (squares), [height, width] pairs, or `"auto"` / `"auto:SIDE"` (the training images' aspect ratio,
    see `padim_hf.resolution`). Each size's model goes to `<output_dir>/<HxW>/model` and its row to
    `<output_dir>/<HxW>/result.json`, written last: a finished size is read back, not run again. `isolate` runs each
    size in a fresh process (its peak RSS is then its own; `False` runs them here, where peaks only grow).
    `overrides`: other PadimConfig fields (e.g. `{"n_features": 50}`).
    """
    data, output_dir = Path(data), Path(output_dir)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not sizes:
        raise ValueError("give at least one size")
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None and key != "image_size"}
    train = training_split(str(data), "train")
    image_sizes = training_image_sizes(train)
    image_aspect = common_aspect(image_sizes)
    base, _ = build_config(preset, **overrides)
    resolved = []
    for size in sizes:
        if is_auto(size):
            size = resolve_image_size(size, image_sizes, base.image_size, base.backbone, base.layers)
        resolved.append(size)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in resolved:
        label = size_label(size)
        config, _ = build_config(preset, **overrides, image_size=size)
        settings = {"data": str(data), "preset": str(preset), "overrides": overrides, "protocol": protocol, "batch_size": batch_size}
        finished = output_dir / label / RESULT_FILE
        if finished.is_file():
            row = json.loads(finished.read_text())
            if row.get("settings") != settings:
                raise ValueError(f"{finished} was run with other settings ({row.get('settings')}): use another --output-dir")
        else:
            if progress:
                print(f"sweep: {format_size(size)} (height x width) ...", flush=True)
            job = {
                **settings, "label": label, "overrides": {**overrides, "image_size": size}, "cpu": cpu,
                "backbone_weights": backbone_weights, "model_dir": str(output_dir / label / "model"), "data": str(data),
            }
            row = (_run_isolated if isolate else _run_size)(job)
            row |= {
                "size": label, "aspect": aspect_label(size, image_aspect), "image_size": size, "settings": settings,
                "estimated_peak_gib": estimate_fit_memory(config, batch_size, _held_out(train)).total / GIB,
            }
            write_json_atomically(finished, row)  # last: marks the size finished
        rows.append(row)
    width, height = max(image_sizes.items(), key=lambda item: len(item[1]))[0]
    note = (
        f"`{data.name}` ({len(train)} training images of {width} x {height} px, width x height), preset `{preset}`"
        f"{', ' + ', '.join(f'{k}={v}' for k, v in overrides.items()) if overrides else ''}, batch size {batch_size}; "
        f"pixel metrics with the `{protocol}` protocol; metrics in %."
    )
    write_tables(rows, output_dir, note)
    return SweepResult(rows, output_dir)


def _held_out(train) -> int:
    from .calibration import DEFAULT_HOLDOUT_FRACTION, holdout_size

    return holdout_size(len(train), DEFAULT_HOLDOUT_FRACTION)


def main(args: argparse.Namespace) -> None:
    """`padim-hf sweep` once its options are parsed (padim_hf.commands): `run_sweep`, then its table printed."""
    result = run_sweep(
        args.data, args.image_size, args.config, args.output_dir,
        overrides={name: getattr(args, name) for name in CONFIG_FIELDS if name != "image_size"},
        backbone_weights=args.backbone_weights, protocol=args.protocol, batch_size=args.batch_size, cpu=args.cpu,
        isolate=not args.in_process,
    )
    print(result.markdown)


if __name__ == "__main__":  # `python -m padim_hf.sweep`: the command line's logging and errors
    import sys

    from padim_hf.cli import main as command_line

    command_line(["sweep", *sys.argv[1:]])
