"""PaDiM model configuration."""

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath

import torch
import timm
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


# config.json is published with the model: the data it was fitted and evaluated on is recorded as a Hub id or a
# folder name, never an absolute local path (user and customer names). These helpers live here, in a file every model
# folder carries for trust_remote_code, because `PadimConfig.to_dict` applies them.
WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def dataset_reference(source: str | os.PathLike | None) -> str | None:
    """What a model records about its data: a Hub dataset id (or any text that is not a local path) as it is, a
    local folder as its name only: an absolute path carries user and customer names and must not be published."""
    if source is None:
        return None
    text = os.fspath(source)
    if WINDOWS_PATH.match(text):
        return PureWindowsPath(text).name or text
    if is_absolute_path(text):
        return Path(text).expanduser().name or text
    path = Path(text)
    if ".." in path.parts or (path.exists() and len(path.parts) > 1):  # a local folder given relatively
        return path.resolve().name or text
    return text


def without_local_paths(value):
    """`value` (JSON-like: dicts, lists, strings) with every absolute local path reduced to its last component, and
    dataset references (`train_dataset`, a dataset's `name`) to Hub ids or folder names (`dataset_reference`)."""
    if isinstance(value, dict):
        return {
            key: dataset_reference(item) if key in ("train_dataset", "name") and isinstance(item, str) else without_local_paths(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and is_absolute_path(value):
        return PureWindowsPath(value).name if WINDOWS_PATH.match(value) else Path(value).expanduser().name
    return value


def is_absolute_path(text: str) -> bool:
    return text.startswith(("/", "~")) or WINDOWS_PATH.match(text) is not None


def backbone_stage_channels(backbone: str) -> list[int]:
    """Channel count of every feature stage timm exposes for `backbone` (built on the meta device: no weights)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, features_only=True)
    except RuntimeError as error:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"unknown timm backbone {backbone!r}: {error}") from error
    return list(model.feature_info.channels())


def backbone_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std timm's pretrained config uses for `backbone` (ImageNet's when timm has none)."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def draw_feature_indices(n_embedding: int, n_features: int, seed: int) -> list[int]:
    """A sorted random subset of embedding channels, drawn from a private generator so the global RNG is untouched."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_embedding, generator=generator)[:n_features].tolist())


def height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one side (a square) or as [height, width]."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def check_size(size, name: str) -> int | list[int]:
    """`size` as stored in config.json: an int stays an int (square; existing checkpoints load unchanged), a pair
    becomes [height, width]. Anything else (bools, floats, one or three sides, zero or negative sides) is an error."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"{name} must be positive, got {size}")
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        if min(size) < 1:
            raise ValueError(f"{name} sides must be positive, got {list(size)}")
        return [int(size[0]), int(size[1])]
    raise ValueError(f"{name} must be an int (a square) or [height, width], got {size!r}")


def format_size(size: int | Sequence[int]) -> str:
    """"256 x 256" or "192 x 256" (height x width), for messages and model cards."""
    height, width = height_width(size)
    return f"{height} x {width}"


# The "anomaly-detection" pipeline saved beside every model (pipeline_padim.py), named in config.json so users
# without padim_hf get it with `trust_remote_code=True`; `pt` lists transformers class names.
CUSTOM_PIPELINES = {
    "anomaly-detection": {"impl": "pipeline_padim.AnomalyDetectionPipeline", "pt": ["AutoModel"], "type": "image"}
}


@strict
class PadimConfig(PreTrainedConfig):
    r"""
    Configuration of a PaDiM anomaly detector (Defard et al. 2020, arXiv 2011.08785).

    Args:
        backbone (`str`): timm model name of the pretrained CNN, e.g. `"resnet18"`, `"wide_resnet50_2"`.
        layers (`list[int]`): timm `features_only` stage indices whose maps form the embedding (ResNet: 1, 2, 3).
        n_features (`int`): number of embedding channels kept (the paper's "Rd").
        feature_indices (`list[int]`, *optional*): the kept channels of the concatenated embedding. Drawn from
            `seed` with a private generator when not given; stored sorted (the Gaussian does not depend on order).
        seed (`int`): seed of that draw.
        image_size (`int` or `[height, width]`): images are resized to `image_size` x `image_size`, or to `height` x
            `width` (e.g. `[256, 192]` keeps a portrait camera's 4:3 aspect ratio instead of squashing it). The grid
            of Gaussians follows: `ceil(height / r) x ceil(width / r)` positions, r the first used stage's stride.
        crop_size (`int` or `[height, width]`, *optional*): centre crop after the resize (paper protocol: 256 ->
            224); `None` keeps the whole image, which keeps defects near the border visible.
        image_mean, image_std (`list[float]`, *optional*): normalisation; default: the backbone's timm config.
        epsilon (`float`): regulariser added to every covariance diagonal.
        blur_sigma (`float`): sigma of the Gaussian blur applied to the upsampled anomaly map (0 disables it).
        covariance_storage (`str`): `"float16"` (default) or `"float32"`: the dtype of the stored whitening factor.
            Scoring always computes in float32 with exactly the stored values (a model scores the same before and
            after saving). float16 halves the checkpoint (WR50-Rd550: 0.95 GB instead of 1.9 GB of Gaussian) and
            moves distances by ~1e-4 relative (image scores ~1e-4, pixel AUROC ~1e-6 on MVTec hazelnut, see
            BENCHMARKS.md); float32 also finalises in float64, for results exact to a float64 reference.
        image_threshold, pixel_threshold (`float`, *optional*): thresholds on raw scores: set by the fit from held-out
            good images at a target false-alarm rate (`padim_hf.calibration`), or F1-optimal ones by a labelled
            evaluation.
        score_min, score_max (`float`, *optional*): raw-score range used to normalise scores to [0, 1], set with the
            thresholds (the image threshold maps to 0.5).
        num_train_images (`int`): images the Gaussian was fitted on (0: not fitted).
        train_dataset (`str`, *optional*): where the training images came from.
        metrics (`dict`, *optional*): evaluation results, e.g. `{"image_auroc": 0.98}`, with the dataset, split,
            number of images and protocol they were computed on.
        calibration (`dict`, *optional*): where the thresholds and score range came from: `method` ("good-only
            quantile" or "labelled F1"), `num_images`, `target_false_alarm_rate`, `achieved_false_alarm_rate`, and
            per method the held-out good scores (good-only) or the dataset, split, fraction, seed and list of
            calibration images (labelled, left out of `metrics`). `padim_hf.calibration.describe_calibration` says it
            in words.
    """

    model_type = "padim"

    backbone: str = "resnet18"
    layers: list[int] | tuple[int, ...] = (1, 2, 3)
    n_features: int = 100
    feature_indices: list[int] | tuple[int, ...] | None = None
    seed: int = 0
    image_size: int | list[int] | tuple[int, ...] = 256
    crop_size: int | list[int] | tuple[int, ...] | None = None
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None
    epsilon: float = 0.01
    blur_sigma: float = 4.0
    covariance_storage: str = "float16"
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    num_train_images: int = 0
    train_dataset: str | None = None
    metrics: dict | None = None
    calibration: dict | None = None

    def __post_init__(self, **kwargs):
        if __name__ == "padim_hf.configuration_padim":
            # config.json names the pipeline code for trust_remote_code users (see to_dict); with the package
            # installed the registered "anomaly-detection" pipeline serves instead: transformers would otherwise
            # demand trust_remote_code for a task that config.json names.
            kwargs.pop("custom_pipelines", None)
        self.layers = sorted(self.layers)
        stage_channels = backbone_stage_channels(self.backbone)
        unknown = [layer for layer in self.layers if not 0 <= layer < len(stage_channels)]
        if unknown or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"layers {self.layers} invalid for {self.backbone!r}: it has feature stages 0..{len(stage_channels) - 1}"
            )
        n_embedding = sum(stage_channels[layer] for layer in self.layers)
        if not 0 < self.n_features <= n_embedding:
            raise ValueError(
                f"n_features={self.n_features} must be in 1..{n_embedding} (the embedding size of {self.backbone!r} "
                f"stages {self.layers})"
            )
        if self.feature_indices is None:
            self.feature_indices = draw_feature_indices(n_embedding, self.n_features, self.seed)
        indices = sorted(int(index) for index in self.feature_indices)
        if len(indices) != self.n_features:
            raise ValueError(f"feature_indices has {len(indices)} entries but n_features={self.n_features}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"feature_indices contains repeated channels: {indices}")
        if indices[0] < 0 or indices[-1] >= n_embedding:
            raise ValueError(f"feature_indices must lie in 0..{n_embedding - 1}, got {indices[0]}..{indices[-1]}")
        self.feature_indices = indices
        if self.image_mean is None or self.image_std is None:
            mean, std = backbone_normalisation(self.backbone)
            self.image_mean = list(self.image_mean or mean)
            self.image_std = list(self.image_std or std)
        self.image_size = check_size(self.image_size, "image_size")
        if self.crop_size is not None:
            self.crop_size = check_size(self.crop_size, "crop_size")
            if any(crop > side for crop, side in zip(height_width(self.crop_size), height_width(self.image_size))):
                raise ValueError(
                    f"crop_size={self.crop_size} must fit in image_size={self.image_size} (each side in 1..the resized side)"
                )
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {self.epsilon}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.covariance_storage not in ("float32", "float16"):
            raise ValueError(f"covariance_storage must be 'float32' or 'float16', got {self.covariance_storage!r}")
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Written whatever writes config.json (save_pretrained, or evaluate rewriting the config in place), but never
        # an attribute of the installed package's config (see __post_init__).
        output["custom_pipelines"] = copy.deepcopy(CUSTOM_PIPELINES)
        # config.json is published with the model: where the data came from is stored as a Hub id or folder name,
        # never an absolute local path (user and customer names), whoever set it (fit, demo, benchmark, a script).
        for key in ("train_dataset", "metrics", "calibration"):
            if output.get(key) is not None:
                output[key] = without_local_paths({key: output[key]})[key]
        return output

    @property
    def resize_size(self) -> tuple[int, int]:
        """(height, width) images are resized to."""
        return height_width(self.image_size)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the `pixel_values` the model sees: the crop, or the resized image."""
        return height_width(self.crop_size if self.crop_size is not None else self.image_size)

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the used backbone stages, in `layers` order."""
        channels = backbone_stage_channels(self.backbone)
        return [channels[layer] for layer in self.layers]


__all__ = ["PadimConfig", "format_size", "height_width"]
