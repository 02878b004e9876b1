"""Run an exported PaDiM model with ONNX Runtime or OpenVINO: numpy, Pillow and the runtime, no PyTorch.

This file is copied into every export folder as `padim_runtime.py` (it must not import padim_hf or torch), so a
factory PC needs only `pip install numpy pillow onnxruntime` (or `openvino`):

    from padim_runtime import PadimRuntime
    detector = PadimRuntime("path/to/export")          # the folder holding padim_export.json
    result = detector.predict("part.png")[0]           # score, normalized_score, label, anomaly_map, mask
"""

import importlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

EXPORT_CONFIG = "padim_export.json"
ENGINES = ("onnxruntime", "openvino")
# OpenVINO's CPU plugin runs float32 graphs in bfloat16 on CPUs that have it unless told otherwise, so the precision
# is always set. "float32" matches PyTorch to ~1e-6. "bfloat16" (OpenVINO only) runs the graph in bfloat16: about
# twice as fast on CPUs with bfloat16 units; scores move by ~0.1-2 % and maps by up to ~6 % of their maximum on our
# tests. Nearly all of that is the backbone's rounding of the embedding: keeping the Gaussian in float32 changed
# neither on three models, and made WR50-Rd550's batch-1 call ~1.8x slower (BENCHMARKS.md).
PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}


# The mark padim_hf's exports put on every OpenVINO operation so that a plain compile keeps float32 (set as
# PRECISE_MARK; the IR saves it as DisablePrecisionConversion, the key it has once read back).
PRECISE_MARK = "precise_0"
FLOAT32_MARKS = ("DisablePrecisionConversion_0", PRECISE_MARK)


def allow_lower_precision(graph) -> None:
    """Removes the float32 marks from an OpenVINO graph, so that a bfloat16 inference precision applies to it."""
    for operation in graph.get_ops():
        info = operation.get_rt_info()
        for mark in FLOAT32_MARKS:
            if mark in info:
                del info[mark]


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB: EXIF orientation applied, 16-bit scaled to 8 bits, alpha composited on white (as padim_hf does)."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        # Declared 16-bit is scaled by 65535; 32-bit integers by their range (up to 255: 8-bit), as padim_hf does.
        full_scale = 255.0 if image.mode == "I" and values.max(initial=0) <= 255 else 65535.0
        scaled = values / full_scale * 255.0
        image = PIL.Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = PIL.Image.fromarray(np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def open_image(image) -> PIL.Image.Image:
    """A decoded PIL image from a PIL image or a file path; unreadable files raise an error naming them."""
    if isinstance(image, PIL.Image.Image):
        return image
    try:
        with PIL.Image.open(image) as opened:
            opened.load()
            return opened
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {image}: {error}") from error


def import_engine(name: str):
    """The engine's Python package, or an error saying how to install it (here and with padim_hf)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ModuleNotFoundError(
            f"the {name} engine is not installed: pip install {name}  (with padim_hf: pip install \"padim-hf[export]\")",
            name=name,
        ) from error


class PadimRuntime:
    """An exported PaDiM model (ONNX or OpenVINO folder) with the pre- and post-processing of `padim_export.json`.

    `engine` defaults to what the folder holds (OpenVINO IR when both are present); `device` is an OpenVINO device
    ("CPU", "GPU") or, for ONNX Runtime, a list of execution providers (default: CPU). `precision`: "float32"
    (default) or, with OpenVINO on a device with bfloat16 units, "bfloat16" (see `PRECISIONS`).
    """

    def __init__(self, folder: str | Path, engine: str | None = None, device=None, precision: str = "float32"):
        self.folder = Path(folder)
        config_path = self.folder / EXPORT_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a padim_hf export folder (padim-hf export writes one)")
        self.config = json.loads(config_path.read_text())
        if engine is None:
            engine = "openvino" if (self.folder / "model.xml").is_file() else "onnxruntime"
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        self.engine = engine
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision != "float32" and engine != "openvino":
            raise ValueError(f"{precision} runs on OpenVINO only: {engine} runs this export in float32")
        self.precision = precision
        self.output_names = list(self.config["outputs"])
        if engine == "onnxruntime":
            onnxruntime = import_engine("onnxruntime")
            path = self._require("model.onnx")
            self._session = onnxruntime.InferenceSession(str(path), providers=device or ["CPUExecutionProvider"])
        else:
            openvino = import_engine("openvino")
            path = self._require("model.xml")
            core, device = openvino.Core(), device or "CPU"
            if precision == "bfloat16" and "BF16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
                raise RuntimeError(
                    f"OpenVINO's {device} device has no bfloat16 support on this machine: use precision='float32'"
                )
            graph = core.read_model(str(path))
            if precision == "bfloat16":
                allow_lower_precision(graph)
            config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision]}
            self._compiled = core.compile_model(graph, device, config)
            self._request = self._compiled.create_infer_request()

    def _require(self, name: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export the model with --format "
                                    f"{'onnx' if name.endswith('.onnx') else 'openvino'} first")
        return path

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the graph's `pixel_values` (square or not)."""
        height, width = self.config["inputs"]["pixel_values"][-2:]
        return int(height), int(width)

    def preprocess(self, images: list) -> np.ndarray:
        """(B, 3, H, W) float32 pixel values: RGB, bicubic resize to (height, width), optional centre crop, rescale,
        normalise."""
        settings = self.config["preprocessing"]
        height, width = settings["resize"]
        batch = []
        for image in images:
            resized = to_rgb(open_image(image)).resize((width, height), PIL.Image.Resampling.BICUBIC)
            pixels = np.asarray(resized, dtype=np.float32) * np.float32(settings["rescale_factor"])
            if settings["center_crop"] is not None:
                crop_h, crop_w = settings["center_crop"]
                top, left = (height - crop_h) // 2, (width - crop_w) // 2
                pixels = pixels[top : top + crop_h, left : left + crop_w]
            pixels = (pixels - np.float32(settings["image_mean"])) / np.float32(settings["image_std"])
            batch.append(pixels.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(batch), dtype=np.float32)

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs (anomaly_map (B, 1, H, W), pred_score (B,), ...) for preprocessed pixel values."""
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.engine == "onnxruntime":
            values = self._session.run(self.output_names, {"pixel_values": pixel_values})
            return dict(zip(self.output_names, values))
        results = self._request.infer({"pixel_values": pixel_values})
        return {name: np.asarray(results[self._compiled.output(name)]) for name in self.output_names}

    def anomaly_map_at(self, anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A model-resolution map (H, W) at an image's (height, width): the cropped-away margin takes the border
        values, then bilinear resize (padim_hf's `post_process_anomaly_maps`)."""
        settings = self.config["preprocessing"]
        if settings["center_crop"] is not None:
            full_h, full_w = settings["resize"]
            crop_h, crop_w = anomaly_map.shape
            top, left = (full_h - crop_h) // 2, (full_w - crop_w) // 2
            anomaly_map = np.pad(anomaly_map, ((top, full_h - crop_h - top), (left, full_w - crop_w - left)), mode="edge")
        resized = PIL.Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(
            (size[1], size[0]), PIL.Image.Resampling.BILINEAR
        )
        return np.asarray(resized, dtype=np.float32)

    def predict(self, images, image_threshold: float | None = None, pixel_threshold: float | None = None) -> list[dict]:
        """Per image: `score`, `normalized_score` (None without calibration), `label` (None without a threshold),
        `anomaly_map` at the image's size and `mask` (None without a pixel threshold). Thresholds default to the
        calibrated ones."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        images = [open_image(image) for image in images]
        outputs = self.run(self.preprocess(images))
        config = self.config
        image_threshold = config["image_threshold"] if image_threshold is None else image_threshold
        pixel_threshold = config["pixel_threshold"] if pixel_threshold is None else pixel_threshold
        results = []
        for index, image in enumerate(images):
            score = float(outputs["pred_score"][index])
            anomaly_map = self.anomaly_map_at(outputs["anomaly_map"][index, 0], (image.height, image.width))
            results.append({
                "score": score,
                "normalized_score": normalized_score(score, config),
                "label": None if image_threshold is None else bool(score >= image_threshold),
                "anomaly_map": anomaly_map,
                "mask": None if pixel_threshold is None else anomaly_map >= pixel_threshold,
            })
        return results


def normalized_score(score: float, config: dict) -> float | None:
    """`score` in [0, 1] with the image threshold at 0.5 (padim_hf.postprocess.normalized_score), or None."""
    threshold, low, high = config.get("image_threshold"), config.get("score_min"), config.get("score_max")
    if None in (threshold, low, high):
        return None
    return float(min(max((score - threshold) / max(high - low, 1e-12) + 0.5, 0.0), 1.0))


__all__ = ["PadimRuntime", "normalized_score"]
