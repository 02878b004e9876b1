"""Fit and evaluate every category of an MVTec-style root with one preset: `run_benchmark` or `padim-hf benchmark`.

The root holds one MVTec-layout folder per category (MVTec AD, VisA converted to that layout, a user's own product
families). Per category the model is written to `<output>/<category>/model` and its figures to
`<output>/<category>/result.json`, written last: a category with a result.json is finished and skipped when the
run is repeated, so an interrupted benchmark resumes. The table (one row per category and a mean row, as in the
PaDiM paper's tables) is written as results.md, results.csv and results.json.
"""

import argparse
import csv
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .data import is_mvtec_folder, load_split
from .evaluate import evaluate_padim, record_evaluation
from .fit import (
    build_model,
    fit_padim,
    make_accelerator,
    resolve_auto_image_size,
    save_fitted,
    training_split,
)
from .options import CONFIG_FIELDS, PROTOCOLS

COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max", "fit_seconds", "images_per_second")
HEADERS = {
    "image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "pixel_aupro": "AUPRO", "image_f1_max": "Image F1-max",
    "pixel_f1_max": "Pixel F1-max", "fit_seconds": "Fit (s)", "images_per_second": "Eval (images/s)",
}
PERCENT = {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max"}
RESULT_FILE = "result.json"


@dataclass
class BenchmarkResult:
    """The rows of one benchmark (one per category, in order) and where its tables were written."""

    rows: list[dict]
    mean: dict
    output_dir: Path

    @property
    def markdown(self) -> str:
        return (self.output_dir / "results.md").read_text()


def find_categories(root: Path) -> list[str]:
    """Sorted names of the MVTec-style category folders (with train/good) directly under `root`."""
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark root not found: {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train" / "good").is_dir() and is_mvtec_folder(p))
    if not names:
        raise ValueError(f"{root} holds no MVTec-style category folders (<category>/train/good, <category>/test)")
    return names


def preset_name(preset: str | Path) -> str:
    """The short preset name used in repo ids: `padim-r18-rd100` -> `r18-rd100` (repos are `padim-<name>-<category>`)."""
    return Path(str(preset)).stem.removeprefix("padim-")


def write_json_atomically(path: Path, value) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(value, handle, indent=2)
        temporary = Path(handle.name)
    os.replace(temporary, path)


def run_category(
    root: Path,
    category: str,
    preset: str | Path,
    output_dir: Path,
    *,
    overrides: dict,
    backbone_weights: str | None,
    allow_random_backbone: bool,
    protocol: str,
    calibration_fraction: float | None,
    batch_size: int,
    num_workers: int,
    accelerator,
) -> dict:
    """Fits, evaluates and saves one category; returns its row."""
    data = root / category
    train = training_split(str(data), "train")
    overrides = resolve_auto_image_size(preset, train, overrides)  # "auto": this category's own aspect ratio
    model = build_model(preset, backbone_weights=backbone_weights, allow_random_backbone=allow_random_backbone, **overrides)
    started = time.perf_counter()
    model = fit_padim(
        model, train, batch_size=batch_size, num_workers=num_workers,
        accelerator=accelerator, allow_random_backbone=allow_random_backbone, progress=False,
    )
    fit_seconds = time.perf_counter() - started
    result = evaluate_padim(
        model, load_split(str(data), "test"), protocol=protocol, calibration=calibration_fraction,
        batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, progress=False,
    )
    model.config.train_dataset = str(data)
    record_evaluation(model, result, {"name": str(data), "config": None, "split": "test"})
    model_dir = output_dir / category / "model"
    save_fitted(model, model_dir, overwrite=True)  # a model without result.json is an unfinished run's: replaced
    return {
        "category": category,
        **result.metrics(),
        "fit_seconds": fit_seconds,
        "images_per_second": result.images_per_second,
        "num_train_images": model.config.num_train_images,
        "num_test_images": result.num_images,
        "num_calibration_images": result.num_calibration_images,
        "protocol": protocol,
        "model_dir": str(model_dir),
    }


def mean_row(rows: list[dict]) -> dict:
    """Mean of every column over the categories where it is defined."""
    mean = {"category": "mean"}
    for column in COLUMNS:
        values = [row[column] for row in rows if row.get(column) is not None and math.isfinite(row[column])]
        mean[column] = sum(values) / len(values) if values else None
    return mean


def write_tables(rows: list[dict], mean: dict, output_dir: Path, preset: str, protocol: str) -> None:
    """results.json (rows, mean, settings), results.csv and results.md (metrics in %, one decimal, as in the paper)."""
    write_json_atomically(output_dir / "results.json", {"preset": preset, "protocol": protocol, "rows": rows, "mean": mean})
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["category", *COLUMNS])
        writer.writeheader()
        for row in [*rows, mean]:
            writer.writerow({key: row.get(key) for key in ["category", *COLUMNS]})

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if value is None or not math.isfinite(value):
            return "n/a"
        return f"{100 * value:.1f}" if column in PERCENT else f"{value:.1f}"

    lines = [
        f"| Category | {' | '.join(HEADERS[c] for c in COLUMNS)} |",
        f"|---|{'---:|' * len(COLUMNS)}",
        *(f"| {row['category']} | {' | '.join(cell(row, c) for c in COLUMNS)} |" for row in rows),
        f"| **mean** | {' | '.join(cell(mean, c) for c in COLUMNS)} |",
    ]
    note = f"Preset `{preset}`, pixel metrics with the `{protocol}` protocol; metrics in %."
    (output_dir / "results.md").write_text(note + "\n\n" + "\n".join(lines) + "\n")


def run_benchmark(
    root: str | Path,
    preset: str | Path = "padim-lite0-offline",
    output_dir: str | Path = "padim-benchmark",
    *,
    categories: list[str] | None = None,
    overrides: dict | None = None,
    backbone_weights: str | None = None,
    allow_random_backbone: bool = False,
    protocol: str = "model",
    calibration_fraction: float | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    cpu: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Fits and evaluates every category of `root` (or `categories`) with `preset`; writes models and tables.

    Finished categories (those with `<output_dir>/<category>/result.json`) are read back, not run again.
    `overrides`: PadimConfig fields replacing the preset's (e.g. `{"image_size": 128}`); they are part of the
    setting, so resume only with the same ones. `push_to_hub`: an organisation or user; each model goes to
    `<push_to_hub>/padim-<preset name>-<category>` (see `preset_name`), and the repo id is kept in the row.
    """
    root, output_dir = Path(root), Path(output_dir)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(overrides) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}; known: {list(CONFIG_FIELDS)}")
    found = find_categories(root)
    if categories:
        missing = sorted(set(categories) - set(found))
        if missing:
            raise ValueError(f"categories {missing} are not MVTec-style folders in {root}; found {found}")
    names = [name for name in found if not categories or name in categories]
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cpu=cpu)
    rows = []
    bar = tqdm(names, unit="category", desc="benchmark", disable=not (progress and accelerator.is_main_process))
    for category in bar:
        bar.set_postfix_str(category)
        finished = output_dir / category / RESULT_FILE
        if finished.is_file():
            row = json.loads(finished.read_text())
            if (row.get("preset"), row.get("overrides"), row.get("protocol")) != (str(preset), overrides, protocol):
                raise ValueError(
                    f"{finished} was run with preset {row.get('preset')!r}, overrides {row.get('overrides')} and "
                    f"protocol {row.get('protocol')!r}, not {str(preset)!r}, {overrides}, {protocol!r}: "
                    "use another --output-dir (finished categories are not run again)"
                )
        else:
            row = run_category(
                root, category, preset, output_dir, overrides=overrides, backbone_weights=backbone_weights,
                allow_random_backbone=allow_random_backbone, protocol=protocol, calibration_fraction=calibration_fraction,
                batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
            )
            row |= {"preset": str(preset), "overrides": overrides}
        if push_to_hub and not row.get("repo_id") and accelerator.is_main_process:
            from .hub import push_model

            repo_id = f"{push_to_hub}/padim-{preset_name(preset)}-{category}"
            row["repo_url"] = push_model(row["model_dir"], repo_id, private=private, token=token)
            row["repo_id"] = repo_id
        if accelerator.is_main_process:
            write_json_atomically(finished, row)  # last: marks the category finished
        rows.append(row)
    mean = mean_row(rows)
    if accelerator.is_main_process:
        write_tables(rows, mean, output_dir, str(preset), protocol)
    return BenchmarkResult(rows, mean, output_dir)


def main(args: argparse.Namespace) -> None:
    """`padim-hf benchmark` once its options are parsed (padim_hf.commands): `run_benchmark`, then its table printed."""
    result = run_benchmark(
        args.data, args.config, args.output_dir, categories=args.categories,
        overrides={name: getattr(args, name) for name in CONFIG_FIELDS}, backbone_weights=args.backbone_weights,
        allow_random_backbone=args.allow_random_backbone, protocol=args.protocol,
        calibration_fraction=args.calibration_fraction, batch_size=args.batch_size, num_workers=args.num_workers,
        cpu=args.cpu, push_to_hub=args.push_to_hub, private=args.private, token=args.token,
    )
    if Path(result.output_dir / "results.md").is_file():
        print(result.markdown)


if __name__ == "__main__":  # `python -m padim_hf.benchmark` (torchrun, accelerate launch): the command line's logging and errors
    import sys

    from padim_hf.cli import main as command_line

    command_line(["benchmark", *sys.argv[1:]])
