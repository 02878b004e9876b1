"""The "anomaly-detection" pipeline: image(s) in, score, label, anomaly map and mask per image out.

This file is copied next to every saved model and named in its config's `custom_pipelines`, so it must not import
padim_hf: users without the package load it with `trust_remote_code=True`.
"""

import base64
import binascii
import importlib.util
import os
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import Pipeline

TASK = "anomaly-detection"  # config.json's `custom_pipelines` names this class under the task (PadimConfig.to_dict)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
URL_TIMEOUT = 10.0  # seconds per connect/read of an image URL: a stalled server must not hang the pipeline


def read_image_source(image, timeout: float | None = URL_TIMEOUT):
    """What the image processor's decoder takes: a PIL image or array as it is, a local path, or the bytes of a
    URL (fetched with `timeout` seconds per network operation) or of base64 text."""
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return os.fspath(image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout) as response:
            return response.read()
    looks_like_file = isinstance(image, str) and os.path.splitext(image)[1].lower() in IMAGE_SUFFIXES
    if isinstance(image, os.PathLike) or looks_like_file:
        raise FileNotFoundError(f"image file not found: {image}")
    if isinstance(image, str):
        try:
            return base64.b64decode(image.split(",", 1)[-1], validate=True)
        except binascii.Error as error:
            raise ValueError("expected an image path, an http(s) URL or base64 image data") from error
    raise TypeError(f"expected a PIL image, an image path or URL, got {type(image).__name__}")


EXPORT_FOLDERS = {"onnxruntime": ("onnx", "model.onnx"), "openvino": ("openvino", "model.xml")}


def load_exported_runtime(name_or_path: str, engine: str, precision: str = "float32"):
    """The `PadimRuntime` of the export in `onnx/` or `openvino/` of a model directory or Hub repo (written by
    `padim-hf export` / `padim-hf push --export`), imported from the export's own `padim_runtime.py`.
    `precision="bfloat16"`: an OpenVINO export run in bfloat16 (see `padim_runtime.PRECISIONS`)."""
    if engine not in EXPORT_FOLDERS:
        raise ValueError(f"unknown engine {engine!r}: choose torch, onnxruntime or openvino")
    subfolder, marker = EXPORT_FOLDERS[engine]
    folder = Path(name_or_path) / subfolder
    if not Path(name_or_path).is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path), allow_patterns=[f"{subfolder}/*"])) / subfolder
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"{name_or_path} has no {subfolder}/{marker}: export it first (padim-hf export)")
    spec = importlib.util.spec_from_file_location(f"padim_runtime_{engine}", folder / "padim_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Older exports' runtimes take no precision argument: pass it only when asked for.
    return module.PadimRuntime(folder, engine, **({} if precision == "float32" else {"precision": precision}))


def normalized_score(score: float, config) -> float | None:
    """`score` in [0, 1] with the calibrated image threshold at 0.5 (padim_hf.postprocess.normalized_score; repeated
    here because this file cannot import padim_hf), or None when the model has no threshold and score range."""
    if None in (config.image_threshold, config.score_min, config.score_max):
        return None
    spread = max(config.score_max - config.score_min, 1e-12)
    return float(min(max((score - config.image_threshold) / spread + 0.5, 0.0), 1.0))


class AnomalyDetectionPipeline(Pipeline):
    """PaDiM anomaly detection.

    Each image gives a dict:
        - `score` (`float`): the image anomaly score (maximum of the model's anomaly map).
        - `normalized_score` (`float` or `None`): `score` mapped to [0, 1] with the image threshold at 0.5, from the
          score range calibration recorded (`None` without one); as `padim-hf predict` reports it.
        - `label` (`bool` or `None`): `score >= config.image_threshold`; `None` when no threshold is calibrated.
        - `anomaly_map` (`np.ndarray` of shape `(height, width)`, float32): per-pixel scores at the image's
          original size (the image processor's `post_process_anomaly_maps`).
        - `mask` (`np.ndarray` of bool or `None`): `anomaly_map >= config.pixel_threshold`; `None` when uncalibrated.

    Inputs: a PIL image, a local path or URL, or a list of them (then a list of dicts comes back). URLs are fetched
    with a timeout (`timeout=` seconds, default `URL_TIMEOUT`).

    `engine="onnxruntime"` or `"openvino"` (a pipeline argument) runs the model's export in `onnx/` / `openvino/`
    instead of the PyTorch model; pre- and post-processing are the same. With OpenVINO, `precision="bfloat16"` runs
    the graph in bfloat16 (CPUs with bfloat16 units; about twice as fast, scores move by up to ~2 %).
    """

    _load_processor = False
    _load_image_processor = True
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self, image_threshold=None, pixel_threshold=None, timeout=None, engine=None, precision=None, **kwargs
    ):
        # Thresholds default to the model's calibrated ones; callers may override them per call.
        if precision not in (None, "float32") and engine in (None, "torch"):
            raise ValueError(f"precision={precision!r} needs engine='openvino' (the PyTorch model runs float32)")
        if engine is not None and engine != "torch":
            self.runtime = load_exported_runtime(self.model.name_or_path, engine, precision or "float32")
        elif engine == "torch":
            self.runtime = None
        preprocess = {} if timeout is None else {"timeout": float(timeout)}
        postprocess = {}
        if image_threshold is not None:
            postprocess["image_threshold"] = float(image_threshold)
        if pixel_threshold is not None:
            postprocess["pixel_threshold"] = float(pixel_threshold)
        return preprocess, {}, postprocess

    def preprocess(self, image, timeout: float = URL_TIMEOUT) -> dict[str, Any]:
        # The image processor's decoder (EXIF orientation, alpha, 16-bit...), as for every other entry point.
        source = read_image_source(image, timeout)
        image = self.image_processor.decode(source, name=image if isinstance(image, str) and len(image) < 500 else None)
        inputs = self.image_processor(image, return_tensors="pt")
        # (height, width) of the original image, to map the anomaly map back onto it; a (1, 2) tensor so that
        # pipeline batching (batch_size > 1) stacks and splits it like the pixel values.
        inputs["target_size"] = torch.tensor([[image.height, image.width]])
        return inputs

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        target_size = model_inputs.pop("target_size")
        if getattr(self, "runtime", None) is not None:
            outputs = self.runtime.run(model_inputs["pixel_values"].cpu().numpy())
            anomaly_map, pred_score = torch.from_numpy(outputs["anomaly_map"]), torch.from_numpy(outputs["pred_score"])
            return {"anomaly_map": anomaly_map, "pred_score": pred_score, "target_size": target_size}
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        return {"anomaly_map": outputs.anomaly_map, "pred_score": outputs.pred_score, "target_size": target_size}

    def postprocess(self, model_outputs: dict[str, Any], image_threshold=None, pixel_threshold=None) -> dict[str, Any]:
        config = self.model.config
        image_threshold = config.image_threshold if image_threshold is None else image_threshold
        pixel_threshold = config.pixel_threshold if pixel_threshold is None else pixel_threshold
        target_size = tuple(int(side) for side in model_outputs["target_size"].reshape(-1).tolist())
        anomaly_map = self.image_processor.post_process_anomaly_maps(model_outputs["anomaly_map"].float(), [target_size])[0]
        anomaly_map = anomaly_map.cpu().numpy().astype(np.float32)
        score = float(model_outputs["pred_score"].reshape(-1)[0])
        return {
            "score": score,
            "normalized_score": normalized_score(score, config),
            "label": None if image_threshold is None else bool(score >= image_threshold),
            "anomaly_map": anomaly_map,
            "mask": None if pixel_threshold is None else anomaly_map >= pixel_threshold,
        }


__all__ = ["AnomalyDetectionPipeline", "TASK"]
