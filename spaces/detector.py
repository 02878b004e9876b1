"""A loaded PaDiM detector and the analysis of one image: heatmap overlay, defect mask, score and verdict.

No Gradio here: app.py wires these functions to the UI. A detector is either loaded from a model repo or folder
(`Detector.load`: `AutoModel` with `trust_remote_code=True`, pinned by a revision) or wraps a model fitted in this
process (`Detector.from_model`: the start-up example model and the models users fit in their session).
"""

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from transformers import AutoConfig, AutoImageProcessor, AutoModel

ENGINE_ENV = "PADIM_ENGINE"
PRECISION_ENV = "PADIM_PRECISION"  # "bfloat16": run an OpenVINO export in bfloat16 (CPUs with bfloat16 units)
EXPORT_FOLDERS = {"onnxruntime": ("onnx", "model.onnx"), "openvino": ("openvino", "model.xml")}
# Images are downscaled to this longest side before anything else: PaDiM sees a few hundred pixels anyway, and the
# overlay/mask stay cheap to draw and send. Bigger uploads are refused outright (decoding alone would need GBs).
MAX_SIDE = 1024
MAX_PIXELS = 100_000_000
# Pillow warns about images over ~89 MP; MAX_PIXELS is the limit here. Set once at import: `catch_warnings` is not
# thread-safe and requests are served concurrently.
warnings.filterwarnings("ignore", category=PIL.Image.DecompressionBombWarning)


class Thresholds(NamedTuple):
    """The model's verdict (image) and mask (pixel) thresholds; None where the model has none (padim_hf then calls
    no part good or defective: `padim_hf.calibration.describe_calibration` says how to set one)."""

    image: float | None
    pixel: float | None

    @property
    def calibrated(self) -> bool:
        return self.image is not None


class Analysis(NamedTuple):
    overlay: np.ndarray  # (H', W', 3) uint8: the image, heatmap, mask contour and colour bar
    mask: np.ndarray  # (H, W) uint8, 255 where the anomaly map reaches the pixel threshold
    score: float  # image anomaly score: the model's pred_score, in raw units
    verdict: str


def load_runtime(source: str, engine: str, revision: str | None = None, precision: str = "float32"):
    """The exported model's `PadimRuntime` (from its own `padim_runtime.py`) in `onnx/` or `openvino/` of `source`."""
    if engine not in EXPORT_FOLDERS:
        raise ValueError(f"{ENGINE_ENV}={engine!r}: choose torch, onnxruntime or openvino")
    subfolder, marker = EXPORT_FOLDERS[engine]
    folder = Path(source) / subfolder
    if not Path(source).is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, revision=revision, allow_patterns=[f"{subfolder}/*"])) / subfolder
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"{source} has no {subfolder}/{marker}: push it with `padim-hf push --export {subfolder}`")
    spec = importlib.util.spec_from_file_location("padim_runtime", folder / "padim_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Older exports' runtimes take no precision argument: pass it only when asked for.
    return module.PadimRuntime(folder, engine, **({} if precision == "float32" else {"precision": precision}))


@dataclass
class Detector:
    """A loaded PaDiM model with its image processor; `runtime` runs an exported model instead of `model`."""

    model: torch.nn.Module | None
    processor: Any
    source: str
    runtime: Any = None
    model_config: Any = None

    @classmethod
    def load(cls, source: str | Path, revision: str | None = None, engine: str = "torch", precision: str = "float32") -> "Detector":
        # trust_remote_code runs the repository's code: `revision` (PADIM_REVISION, a commit hash) pins what runs.
        if precision != "float32" and engine != "openvino":
            raise ValueError(f"{PRECISION_ENV}={precision!r} needs {ENGINE_ENV}=openvino (the {engine} engine runs float32)")
        if engine != "torch":
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=True, revision=revision)
            if getattr(config, "model_type", None) != "padim":
                raise ValueError(f"{source} is a {config.model_type!r} model, not a PaDiM model")
            processor = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=True, revision=revision)
            runtime = load_runtime(str(source), engine, revision, precision)
            return cls(model=None, processor=processor, source=str(source), runtime=runtime, model_config=config)
        model = AutoModel.from_pretrained(str(source), trust_remote_code=True, revision=revision).eval()
        if torch.cuda.is_available():  # GPU Space hardware
            model = model.to("cuda")
        if getattr(model.config, "model_type", None) != "padim":
            raise ValueError(f"{source} is a {model.config.model_type!r} model, not a PaDiM model")
        processor = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=True, revision=revision)
        if not hasattr(processor, "decode"):
            raise ValueError(
                f"{source} was saved by a padim_hf without the shared image decoder (processor.decode): re-save it "
                "with the current padim_hf and push it again"
            )
        shown = f"{source}@{revision}" if revision else str(source)
        return cls(model=model, processor=processor, source=shown)

    @classmethod
    def from_model(cls, model: torch.nn.Module, source: str) -> "Detector":
        """A detector for a PadimModel fitted in this process (its image processor is built from its config)."""
        from padim_hf import PadimImageProcessor

        return cls(model=model.eval(), processor=PadimImageProcessor.from_padim_config(model.config), source=source)

    @property
    def config(self):
        return self.model_config if self.model is None else self.model.config

    def predict(self, image: PIL.Image.Image) -> tuple[np.ndarray, float]:
        """(H, W) float32 anomaly map of an RGB image at the image's size, and the model's image score.

        The score is the model's `pred_score` (the maximum of the map at model resolution), the value thresholds are
        calibrated on; the maximum of the resized map can be slightly lower.
        """
        inputs = self.processor(images=[image], return_tensors="pt")
        sizes = [(image.height, image.width)]
        if self.runtime is not None:
            outputs = self.runtime.run(inputs["pixel_values"].numpy())
            (anomaly_map,) = self.processor.post_process_anomaly_maps(torch.from_numpy(outputs["anomaly_map"]), sizes)
            return anomaly_map.float().numpy(), float(outputs["pred_score"][0])
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"].to(device))
            sizes = [(image.height, image.width)]
            (anomaly_map,) = self.processor.post_process_anomaly_maps(outputs.anomaly_map, sizes)
        return anomaly_map.float().cpu().numpy(), float(outputs.pred_score[0])

    def thresholds(self) -> Thresholds:
        return default_thresholds(self.config)


def default_thresholds(config) -> Thresholds:
    """The model's thresholds (set by padim_hf's calibration), each standing in for the other when only one is set;
    both None for a model that has none."""
    image, pixel = config.image_threshold, config.pixel_threshold
    if image is None and pixel is None:
        return Thresholds(image=None, pixel=None)
    image = float(image if image is not None else pixel)
    pixel = float(pixel if pixel is not None else image)
    return Thresholds(image=image, pixel=pixel)


def load_image(image: str | Path | PIL.Image.Image | np.ndarray, decode: Callable[[Any], PIL.Image.Image]) -> PIL.Image.Image:
    """An RGB PIL image no longer than MAX_SIDE, from a path, PIL image or array of any common mode.

    `decode` is the model's image processor's decoder (`processor.decode`), the one the CLI, the pipeline and the
    processor use: EXIF orientation, palette, alpha on white, CMYK, 16-bit are handled the same everywhere, so an
    image gives the same map here as in `padim-hf predict`. This function only guards size: huge images are refused
    from their header and big ones downscaled first (JPEG decodes at a reduced scale straight away). Raises
    ValueError with a user-facing message for anything else.
    """
    name = "the image"
    if isinstance(image, np.ndarray):
        if image.ndim < 2 or 0 in image.shape[:2]:
            raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {image.shape}")
        check_pixel_count(image.shape[1], image.shape[0])
    elif isinstance(image, (str, Path)):
        name = Path(image).name
        image = open_image_file(Path(image))
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(f"expected an image, got {type(image).__name__}")
    if isinstance(image, PIL.Image.Image):
        check_pixel_count(image.width, image.height)
        image = downscale(image)  # first, so decoding handles at most MAX_SIDE^2 pixels
    rgb = decode(image, name=name)
    return downscale(rgb)  # arrays are only checked above


def downscale(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` shrunk to at most MAX_SIDE on its longest side (a new image: the caller's is left alone; its EXIF
    orientation tag travels with it)."""
    scale = MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast integer box reduction first, then Lanczos on the small image.
    resized = image.resize(size, PIL.Image.Resampling.LANCZOS, reducing_gap=3.0)
    resized.info = dict(image.info)
    return resized


def open_image_file(path: Path) -> PIL.Image.Image:
    if not path.is_file():
        raise ValueError(f"no such file: {path.name}")
    return open_image(path, path.name)


def open_image(source: Path | IO[bytes], name: str) -> PIL.Image.Image:
    """A PIL image from a file or an open binary stream (a zip member), decoded at most MAX_SIDE large; ValueError
    naming `name` when it is not an image or too large."""
    try:
        image = PIL.Image.open(source)
        check_pixel_count(image.width, image.height, name)
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale straight away
        image.load()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{name} is too large to analyse: {error}") from error
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name} is not an image Pillow can read (PNG, JPEG, BMP, TIFF, WebP, ...)") from error
    return image


def check_pixel_count(width: int, height: int, name: str = "the image") -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{name} is {width}x{height} pixels; images up to {MAX_PIXELS // 1_000_000} megapixels are accepted"
        )
    if width < 1 or height < 1:
        raise ValueError("the image is empty")


def colour_range(thresholds: Thresholds, anomaly_map: np.ndarray) -> tuple[float, float]:
    """Fixed heatmap colour range for a model: centred on the pixel threshold, so colours mean the same on every
    image (a per-image min-max scale would paint a perfect part red). A model with no threshold has no such anchor:
    its maps are drawn on their own range, which the colour bar's label says."""
    if thresholds.pixel is None:
        return float(anomaly_map.min()), float(anomaly_map.max())
    return 0.5 * thresholds.pixel, 2.0 * thresholds.pixel


def figure_size(height: int, width: int, longest: float = 6.4, colour_bar: float = 1.2) -> tuple[float, float]:
    """Figure (width, height) in inches fitting the image's aspect ratio into a `longest`-inch box, plus room for
    the colour bar; very thin images are not stretched beyond 2 inches on their short side."""
    if height >= width:
        return max(2.0, longest * width / height) + colour_bar, longest
    return longest, max(2.0, (longest - colour_bar) * height / width)


def render_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None, vmin: float, vmax: float
) -> np.ndarray:
    """The image with the heatmap blended over it, the mask outline, and a colour bar marking the threshold."""
    figure = Figure(figsize=figure_size(*anomaly_map.shape), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)  # the object-oriented API, not pyplot: requests are served concurrently
    axes = figure.add_subplot()
    axes.imshow(image)
    heat = axes.imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.45, interpolation="bilinear")
    mask = anomaly_map >= pixel_threshold if pixel_threshold is not None else None
    if mask is not None and mask.any() and not mask.all():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.5)
    axes.set_axis_off()
    # The bar is drawn from an opaque copy of the colour map: a translucent bar is hard to read.
    colour_bar = figure.colorbar(ScalarMappable(norm=heat.norm, cmap=heat.cmap), ax=axes, fraction=0.046, pad=0.02)
    if pixel_threshold is None:
        colour_bar.set_label("anomaly score (this image's range: the model has no threshold)")
    else:
        colour_bar.set_label("anomaly score")
        colour_bar.ax.axhline(min(max(pixel_threshold, vmin), vmax), color="white", linewidth=2)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def analyse(
    image: str | Path | PIL.Image.Image | np.ndarray,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    *,
    detector: Detector,
) -> Analysis:
    """Scores one image: heatmap overlay, binary defect mask, anomaly score and verdict.

    Thresholds default to the model's calibrated ones; with none (a model without thresholds, and none given)
    there is no verdict and no mask. Raises ValueError (bad input) with a message meant for the user.
    """
    defaults = detector.thresholds()
    image_threshold = defaults.image if image_threshold is None else float(image_threshold)
    pixel_threshold = defaults.pixel if pixel_threshold is None else float(pixel_threshold)
    rgb = load_image(image, detector.processor.decode)
    anomaly_map, score = detector.predict(rgb)
    mask = anomaly_map >= pixel_threshold if pixel_threshold is not None else np.zeros(anomaly_map.shape, bool)
    overlay = render_overlay(np.asarray(rgb), anomaly_map, pixel_threshold, *colour_range(defaults, anomaly_map))
    if image_threshold is None:
        verdict = f"No verdict: score {score:.2f}, and this model has no threshold"
    else:
        label, comparison = ("Anomalous", "≥") if score >= image_threshold else ("Normal", "<")
        verdict = f"{label}: score {score:.2f} {comparison} threshold {image_threshold:.2f}"
    return Analysis(overlay=overlay, mask=mask.astype(np.uint8) * 255, score=score, verdict=verdict)
