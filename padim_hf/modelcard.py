"""Model cards (README.md) for fitted PaDiM models: Hub metadata, `model-index` results and a readable body."""

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .calibration import GOOD_ONLY, describe_calibration
from .configuration_padim import PadimConfig, format_size
from .files import dataset_reference, without_local_paths

GALLERY_FILE = "gallery.png"
# The Hub has no anomaly-detection task; pixel maps and masks make image segmentation the closest listed task,
# which keeps the metadata valid. The pipeline itself is registered under "anomaly-detection".
PIPELINE_TAG = "image-segmentation"
PIPELINE_TASK = "anomaly-detection"
METRIC_NAMES = {
    "image_auroc": ("roc_auc", "Image AUROC", "image-classification"),
    "pixel_auroc": ("roc_auc", "Pixel AUROC", "image-segmentation"),
    "pixel_aupro": ("aupro", "Pixel AUPRO", "image-segmentation"),
    "image_f1_max": ("f1", "Image F1-max", "image-classification"),
    "pixel_f1_max": ("f1", "Pixel F1-max", "image-segmentation"),
}
MVTEC_LICENSE = "cc-by-nc-sa-4.0"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CITATION = """@inproceedings{defard2021padim,
  title     = {PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization},
  author    = {Defard, Thomas and Setkaluk, Aleksandr and Loesch, Angelique and Audigier, Romaric},
  booktitle = {Pattern Recognition. ICPR International Workshops and Challenges},
  year      = {2021},
  eprint    = {2011.08785},
  archivePrefix = {arXiv}
}"""


def is_hub_dataset_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub dataset id ("org/name") rather than a local path: only ids go in metadata."""
    return bool(name) and HUB_ID.match(name) is not None and not Path(name).exists()


def dataset_label(name: str | None) -> str:
    """A short human name for a dataset given as a Hub id or a local path."""
    if not name:
        return "unknown"
    return name if is_hub_dataset_id(name) else Path(name.rstrip("/")).name or name


def is_mvtec(config: PadimConfig) -> bool:
    names = [config.train_dataset or "", ((config.metrics or {}).get("dataset") or {}).get("name") or ""]
    return any("mvtec" in name.lower() for name in names)


def default_license(config: PadimConfig) -> str:
    # Gaussian statistics are derived from the training images, so a model fitted on MVTec AD inherits its
    # non-commercial licence; otherwise the package's own licence is the sensible default.
    return MVTEC_LICENSE if is_mvtec(config) else "apache-2.0"


def eval_results(config: PadimConfig) -> list[EvalResult]:
    """`model-index` entries for every metric in `config.metrics` (empty when the model was not evaluated)."""
    metrics = config.metrics or {}
    dataset = metrics.get("dataset") or {}
    name = dataset.get("name") or config.train_dataset
    results = []
    for key, (metric_type, metric_name, task_type) in METRIC_NAMES.items():
        if metrics.get(key) is None:
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                task_name="Anomaly detection" if task_type == "image-classification" else "Anomaly localization",
                dataset_type=name if is_hub_dataset_id(name) else dataset_label(name),
                dataset_name=dataset_label(name),
                dataset_config=dataset.get("config"),
                dataset_split=dataset.get("split"),
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(metrics[key]), 4),
            )
        )
    return results


def card_data(
    config: PadimConfig, model_name: str, license: str | None = None, tags: list[str] | None = None
) -> ModelCardData:
    datasets = [name for name in {config.train_dataset, ((config.metrics or {}).get("dataset") or {}).get("name")} if is_hub_dataset_id(name)]
    results = eval_results(config)
    return ModelCardData(
        library_name="transformers",  # loadable with stock transformers (trust_remote_code); counted via config.json
        pipeline_tag=PIPELINE_TAG,
        license=license or default_license(config),
        tags=["anomaly-detection", "padim", "padim_hf", *(tags or [])],
        datasets=sorted(datasets) or None,
        base_model=f"timm/{config.backbone}",
        model_name=model_name,
        eval_results=results or None,
    )


def intro_section(config: PadimConfig, model_name: str) -> str:
    return (
        f"# {model_name}\n\n"
        f"A **PaDiM** anomaly detector (Defard et al. 2020, [arXiv 2011.08785](https://arxiv.org/abs/2011.08785)) "
        f"built with `padim_hf`. It models every patch position of "
        f"defect-free images as a multivariate Gaussian over `{config.backbone}` features; the anomaly map of an "
        f"image is the Mahalanobis distance of each patch to its Gaussian, and the image score is the map's "
        f"maximum. No defective examples are needed to fit it."
    )


def training_section(config: PadimConfig) -> str:
    if is_hub_dataset_id(config.train_dataset):
        source = f"[{config.train_dataset}](https://huggingface.co/datasets/{config.train_dataset})"
    elif config.train_dataset:  # a local folder: its name says what it is, its full path says nothing to readers
        source = f"the local folder `{dataset_label(config.train_dataset)}`"
    else:
        source = "an unrecorded source"
    crop = f"centre crop to {format_size(config.crop_size)}" if config.crop_size is not None else "no crop"
    mean = ", ".join(f"{value:g}" for value in config.image_mean)
    std = ", ".join(f"{value:g}" for value in config.image_std)
    return (
        "## Training data and preprocessing\n\n"
        f"Fitted on **{config.num_train_images}** defect-free images from {source}.\n\n"
        f"Preprocessing (the bundled image processor does it): convert to RGB, bicubic resize to "
        f"{format_size(config.image_size)}{'' if isinstance(config.image_size, int) else ' (height x width)'}, {crop}, normalise with mean ({mean}) and std ({std}). "
        f"Anomaly maps are mapped back to each input image's own size."
    )


def configuration_section(config: PadimConfig) -> str:
    embedding = sum(config.stage_channels)
    rows = [
        ("Backbone", f"`{config.backbone}` (timm, ImageNet weights)"),
        ("Feature stages", ", ".join(str(layer) for layer in config.layers) + f" ({embedding} channels)"),
        ("Kept channels (Rd)", f"{config.n_features} of {embedding}, random subset drawn with seed {config.seed}"),
        ("Covariance regulariser epsilon", f"{config.epsilon:g}"),
        ("Anomaly map blur sigma", f"{config.blur_sigma:g}"),
        ("Covariance storage", config.covariance_storage),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Configuration\n\n| Setting | Value |\n|---|---|\n{table}"


def evaluation_section(config: PadimConfig) -> str:
    metrics = config.metrics or {}
    if not any(metrics.get(key) is not None for key in METRIC_NAMES):
        return "## Evaluation\n\nThis model has not been evaluated yet (`padim-hf evaluate` adds results here)."
    dataset = metrics.get("dataset") or {}
    where = dataset_label(dataset.get("name") or config.train_dataset)
    if dataset.get("config"):
        where += f" / {dataset['config']}"
    where += f", split `{dataset.get('split') or 'test'}`"
    if metrics.get("num_images"):
        where += f" ({metrics['num_images']} images)"
    rows = "\n".join(
        f"| {label} | {float(metrics[key]):.4f} |" for key, (_, label, _) in METRIC_NAMES.items() if metrics.get(key) is not None
    )
    protocol = {
        "model": "Pixel metrics at the model's input resolution, masks resized and cropped like the images "
        "(the PaDiM paper's protocol).",
        "original": "Pixel metrics at each image's original resolution.",
    }.get(metrics.get("protocol"), "")
    return (
        f"## Evaluation\n\nOn {where}:\n\n| Metric | Value |\n|---|---|\n{rows}\n\n{protocol}"
        f"\n\n{calibration_text(config)}"
    )


def verdict_section(config: PadimConfig) -> str:
    """What `label` / `pred_label` mean for this model, in words (`padim_hf.calibration.describe_calibration`)."""
    text = describe_calibration(config)
    calibration = config.calibration or {}
    record = calibration if calibration.get("method") == GOOD_ONLY else calibration.get("good_only")
    if record and record.get("scores"):
        text += (
            f"\n\nThe {record['num_images']} held-out good scores are stored in `config.json` "
            "(`calibration.scores`): `padim-hf calibrate --model DIR --false-alarm-rate 0.005` moves the threshold to "
            "another rate without refitting, `--good-images DIR` recalibrates on new good images from the line."
        )
    metrics = config.metrics or {}
    if metrics.get("false_alarm_rate") is not None or metrics.get("recall") is not None:
        dataset = metrics.get("dataset") or {}
        where = f"split `{dataset.get('split') or 'test'}` of {dataset_label(dataset.get('name') or config.train_dataset)}"
        parts = []
        if metrics.get("false_alarm_rate") is not None:
            parts.append(f"flagged {metrics['false_alarm_rate']:.1%} of the good images")
        if metrics.get("recall") is not None:
            parts.append(f"{metrics['recall']:.1%} of the defective ones")
        text += f"\n\nOn {where}, this threshold {' and '.join(parts)}."
    return "## Verdicts\n\n" + text


def calibration_text(config: PadimConfig) -> str:
    """Which images chose the thresholds and score range, and that the metrics above exclude them."""
    if (config.calibration or {}).get("method") == GOOD_ONLY:
        return "Thresholds: good-only calibration (see Verdicts below); no test image chose them."
    thresholds = [f"image threshold {config.image_threshold:.4g}" if config.image_threshold is not None else None,
                  f"pixel threshold {config.pixel_threshold:.4g}" if config.pixel_threshold is not None else None]
    listed = ", ".join(t for t in thresholds if t)
    calibration = config.calibration
    if not calibration:
        if not listed:
            return "No thresholds are calibrated: scores are raw Mahalanobis distances."
        return f"Thresholds on raw scores: {listed} (which images chose them is not recorded)."
    source = calibration.get("dataset") or {}
    where = f"split `{source.get('split')}` of {dataset_label(source.get('name'))}"
    if calibration.get("fraction"):
        where = (
            f"a {calibration['fraction']:g} fraction of {where} (seed {calibration.get('seed')}, stratified by "
            f"{calibration.get('stratified_by', 'label')}), left out of the metrics above"
        )
    return (
        f"F1-optimal thresholds on raw scores ({listed or 'none'}) and the score range used to normalise scores were "
        f"chosen on {calibration.get('num_images', len(calibration.get('images', [])))} calibration images from "
        f"{where}; `config.json` lists them under `calibration.images`."
    )


def gallery_section(has_gallery: bool) -> str:
    if not has_gallery:
        return ""
    return f"## Examples\n\n![Test images, ground truth and predicted anomaly maps]({GALLERY_FILE})"


def usage_section(repo_id: str) -> str:
    return f"""## Usage

With the package (`pip install padim-hf`):

```python
import padim_hf
from transformers import pipeline

padim_hf.register()  # teaches transformers the PaDiM model, its image processor and the "{PIPELINE_TASK}" pipeline
detector = pipeline("{PIPELINE_TASK}", model="{repo_id}")
result = detector("image.png")  # or a PIL image, or a list of them
result["score"], result["label"], result["anomaly_map"], result["mask"]
```

With plain transformers, the code stored in this repository is used:

```python
from transformers import pipeline

detector = pipeline("{PIPELINE_TASK}", model="{repo_id}", trust_remote_code=True)
```

Lower level: `PadimModel.from_pretrained("{repo_id}")` with `AutoImageProcessor.from_pretrained("{repo_id}")`;
the processor's `post_process_anomaly_maps` resizes maps to the original image sizes."""


def deployment_section(repo_id: str, exports: list[str]) -> str:
    """How to run the exported graphs in `onnx/` / `openvino/` with numpy, Pillow and the runtime only."""
    if not exports:
        return ""
    engines = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
    lines = [
        "## Run without PyTorch",
        "",
        "This repository also holds the model exported to "
        + " and ".join(f"`{name}/`" for name in exports)
        + " (graph + `padim_export.json` with the pre-processing and thresholds + `padim_runtime.py`). "
        "On a machine with only numpy, Pillow and the runtime:",
        "",
        "```bash",
        f"pip install numpy pillow {' '.join(engines[name][0] for name in exports)} huggingface_hub",
        f"hf download {repo_id} --include '{exports[0]}/*' --local-dir detector",
        "```",
        "",
        "```python",
        "import sys",
        f"sys.path.insert(0, \"detector/{exports[0]}\")",
        "from padim_runtime import PadimRuntime",
        "",
        f"detector = PadimRuntime(\"detector/{exports[0]}\", engine=\"{engines[exports[0]][0]}\")",
        "result = detector.predict(\"image.png\")[0]",
        "result[\"score\"], result[\"label\"], result[\"anomaly_map\"]  # map at the image's size",
        "```",
        "",
        "The graph takes `pixel_values` (batch, 3, S, S) and returns `anomaly_map` and `pred_score` (plus `pred_label`"
        " / `normalized_score` when calibrated); its maps match PyTorch's within 1e-4 relative. OpenVINO must compile"
        " it with `{\"INFERENCE_PRECISION_HINT\": \"f32\"}` (padim_runtime does): its CPU plugin would otherwise"
        " run it in bfloat16. On CPUs with bfloat16 units, `PadimRuntime(..., precision=\"bfloat16\")` runs the"
        " OpenVINO export in bfloat16 on purpose: about twice as fast, scores move by up to ~2 %.",
    ]
    return "\n".join(lines)


def limitations_section(config: PadimConfig) -> str:
    return (
        "## Limitations\n\n"
        "- The model knows only what normal looked like in its training images: a different product, camera, "
        "lighting or framing raises scores everywhere. Refit for each product and setup.\n"
        "- Positions are modelled one by one on a fixed grid, so objects must be roughly aligned as in training.\n"
        "- Scores are Mahalanobis distances with no absolute scale: thresholds only carry over if they were "
        "calibrated on data from the same setup"
        + (" (none is calibrated for this model)." if config.image_threshold is None else ".")
        + "\n- Defects much smaller than the backbone's feature stride, relative to the resized image, may be missed."
    )


def citation_section() -> str:
    return f"## Citation\n\n```bibtex\n{CITATION}\n```"


def build_model_card(
    config: PadimConfig,
    repo_id: str | None = None,
    *,
    has_gallery: bool = False,
    license: str | None = None,
    tags: list[str] | None = None,
    exports: list[str] | None = None,
) -> ModelCard:
    """The model card of a fitted PaDiM model: metadata from `config` (incl. `config.metrics`), readable body.

    `exports` names the exported folders the repository holds ("onnx", "openvino"), shown with torch-free usage."""
    model_name = repo_id.split("/")[-1] if repo_id else f"padim-{config.backbone}"
    data = card_data(config, model_name, license=license, tags=tags)
    sections = [
        intro_section(config, model_name),
        training_section(config),
        configuration_section(config),
        evaluation_section(config),
        verdict_section(config),
        gallery_section(has_gallery),
        usage_section(repo_id or "path/to/model"),
        deployment_section(repo_id or "path/to/model", list(exports or [])),
        limitations_section(config),
        citation_section(),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def model_card_for_directory(
    model_dir: str | Path,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    tags: list[str] | None = None,
    exports: list[str] | None = None,
) -> ModelCard:
    """The card for a saved model directory (reads its config.json; embeds gallery.png when present). `exports`
    defaults to the exported folders (`onnx/`, `openvino/`) the directory holds."""
    model_dir = Path(model_dir)
    config = PadimConfig.from_pretrained(model_dir)
    if exports is None:
        exports = [name for name in ("onnx", "openvino") if (model_dir / name / "padim_export.json").is_file()]
    # The card is published: dataset references as Hub ids or folder names, never local paths.
    config.train_dataset = dataset_reference(config.train_dataset)
    config.metrics = without_local_paths(config.metrics)
    config.calibration = without_local_paths(getattr(config, "calibration", None))
    return build_model_card(
        config, repo_id, has_gallery=(model_dir / GALLERY_FILE).is_file(), license=license, tags=tags, exports=exports
    )


__all__ = ["build_model_card", "model_card_for_directory"]
