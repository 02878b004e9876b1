"""Gradio Space: PaDiM anomaly heatmaps for one uploaded image.

The model is loaded with `AutoModel` / `AutoImageProcessor` and `trust_remote_code=True`, so the Space needs only
the model repository (its code files travel with it), not the `padim_hf` package. Which model: the env variable
`PADIM_MODEL` (a Hub repo id or a local directory); run from a checkout, the default is `padim-demo/model`, which
`padim-hf demo` writes. `PADIM_ENGINE=onnxruntime` or `openvino` runs the model's export (`onnx/` or `openvino/` in
the repo, see `padim-hf push --export`) instead of the PyTorch model.
"""

import importlib.util

import logging
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import PIL.Image
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from transformers import AutoConfig, AutoImageProcessor, AutoModel

logger = logging.getLogger(__name__)

MODEL_ENV = "PADIM_MODEL"
REVISION_ENV = "PADIM_REVISION"  # a commit hash of the model repo: the remote code that runs is then fixed
ENGINE_ENV = "PADIM_ENGINE"
PRECISION_ENV = "PADIM_PRECISION"  # "bfloat16": run an OpenVINO export in bfloat16 (CPUs with bfloat16 units)
EXPORT_FOLDERS = {"onnxruntime": ("onnx", "model.onnx"), "openvino": ("openvino", "model.xml")}
SPACE_DIR = Path(__file__).resolve().parent
DEFAULT_LOCAL_MODEL = SPACE_DIR.parent / "padim-demo" / "model"
EXAMPLES_DIR = SPACE_DIR / "examples"
# Images are downscaled to this longest side before anything else: PaDiM sees a few hundred pixels anyway, and the
# overlay/mask stay cheap to draw and send. Bigger uploads are refused outright (decoding alone would need GBs).
MAX_SIDE = 1024
MAX_PIXELS = 100_000_000
# Pillow warns about images over ~89 MP; MAX_PIXELS is the limit here. Set once at import: `catch_warnings` is not
# thread-safe and requests are served concurrently.
warnings.filterwarnings("ignore", category=PIL.Image.DecompressionBombWarning)
# Hugging Face's free CPU Spaces have 2 vCPUs: more concurrent PaDiM forwards would only slow each other down.
CONCURRENCY_LIMIT = 2 if not torch.cuda.is_available() else 4
HOW_TO_MAKE_A_MODEL = (
    "Make one with `padim-hf demo` (it fits a detector and writes `padim-demo/model`), or set the environment "
    f"variable `{MODEL_ENV}` to a PaDiM model's Hub repo id or local directory."
)


class Thresholds(NamedTuple):
    image: float
    pixel: float
    calibrated: bool


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


def gaussian_distance_quantile(dimensions: int, probability: float = 0.999) -> float:
    """Mahalanobis distance exceeded with `1 - probability` under an exact `dimensions`-d Gaussian.

    Wilson-Hilferty's approximation of the chi-square quantile (accurate to a few percent from 2 dimensions up),
    so the Space needs no scipy.
    """
    z = {0.99: 2.326, 0.999: 3.090, 0.9999: 3.719}[probability]
    k = float(dimensions)
    chi_square = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return math.sqrt(chi_square)


def default_thresholds(config) -> Thresholds:
    """The calibrated thresholds, each standing in for the other when only one is set.

    Uncalibrated models get the 99.9% quantile of the Gaussian distance: a lower bound (real distances are larger,
    more so the fewer training images), which the UI says.
    """
    image, pixel = config.image_threshold, config.pixel_threshold
    if image is None and pixel is None:
        guess = gaussian_distance_quantile(config.n_features)
        return Thresholds(image=guess, pixel=guess, calibrated=False)
    image = float(image if image is not None else pixel)
    pixel = float(pixel if pixel is not None else image)
    return Thresholds(image=image, pixel=pixel, calibrated=True)


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
    try:
        image = PIL.Image.open(path)
        check_pixel_count(image.width, image.height)
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale straight away
        image.load()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"the image is too large to analyse: {error}") from error
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path.name} is not an image Pillow can read (PNG, JPEG, BMP, TIFF, WebP, ...)") from error
    return image


def check_pixel_count(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"the image is {width}x{height} pixels; images up to {MAX_PIXELS // 1_000_000} megapixels are accepted"
        )
    if width < 1 or height < 1:
        raise ValueError("the image is empty")


def colour_range(thresholds: Thresholds) -> tuple[float, float]:
    """Fixed heatmap colour range for a model: centred on the pixel threshold, so colours mean the same on every
    image (a per-image min-max scale would paint a perfect part red)."""
    return 0.5 * thresholds.pixel, 2.0 * thresholds.pixel


def figure_size(height: int, width: int, longest: float = 6.4, colour_bar: float = 1.2) -> tuple[float, float]:
    """Figure (width, height) in inches fitting the image's aspect ratio into a `longest`-inch box, plus room for
    the colour bar; very thin images are not stretched beyond 2 inches on their short side."""
    if height >= width:
        return max(2.0, longest * width / height) + colour_bar, longest
    return longest, max(2.0, (longest - colour_bar) * height / width)


def render_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float, vmin: float, vmax: float
) -> np.ndarray:
    """The image with the heatmap blended over it, the mask outline, and a colour bar marking the threshold."""
    figure = Figure(figsize=figure_size(*anomaly_map.shape), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(figure)  # the object-oriented API, not pyplot: requests are served concurrently
    axes = figure.add_subplot()
    axes.imshow(image)
    heat = axes.imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.45, interpolation="bilinear")
    mask = anomaly_map >= pixel_threshold
    if mask.any() and not mask.all():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.5)
    axes.set_axis_off()
    # The bar is drawn from an opaque copy of the colour map: a translucent bar is hard to read.
    colour_bar = figure.colorbar(ScalarMappable(norm=heat.norm, cmap=heat.cmap), ax=axes, fraction=0.046, pad=0.02)
    colour_bar.set_label("anomaly score")
    colour_bar.ax.axhline(min(max(pixel_threshold, vmin), vmax), color="white", linewidth=2)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def analyse(
    image: str | Path | PIL.Image.Image | np.ndarray,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    detector: Detector | None = None,
) -> Analysis:
    """Scores one image: heatmap overlay, binary defect mask, anomaly score and verdict.

    Thresholds default to the model's calibrated ones. Raises ValueError (bad input) or RuntimeError (no model)
    with a message meant for the user.
    """
    detector = detector if detector is not None else DETECTOR
    if detector is None:
        raise RuntimeError(LOAD_MESSAGE)
    defaults = detector.thresholds()
    image_threshold = defaults.image if image_threshold is None else float(image_threshold)
    pixel_threshold = defaults.pixel if pixel_threshold is None else float(pixel_threshold)
    rgb = load_image(image, detector.processor.decode)
    anomaly_map, score = detector.predict(rgb)
    mask = anomaly_map >= pixel_threshold
    overlay = render_overlay(np.asarray(rgb), anomaly_map, pixel_threshold, *colour_range(defaults))
    anomalous = score >= image_threshold
    label, comparison = ("Anomalous", "≥") if anomalous else ("Normal", "<")
    verdict = f"{label}: score {score:.2f} {comparison} threshold {image_threshold:.2f}"
    return Analysis(overlay=overlay, mask=mask.astype(np.uint8) * 255, score=score, verdict=verdict)


def predict(image: str | None, image_threshold: float, pixel_threshold: float):
    """Gradio callback: `analyse` with errors turned into messages shown in the UI."""
    if image is None:
        return None, None, None, ""
    try:
        result = analyse(image, image_threshold, pixel_threshold)
    except (ValueError, RuntimeError) as error:
        raise gr.Error(str(error), print_exception=False) from error
    except Exception as error:  # anything else is a bug: log it, but show the user a message, not a traceback
        logger.exception("analysis failed")
        raise gr.Error(f"Analysis failed ({type(error).__name__}: {error})", print_exception=False) from error
    return unique_image(result.overlay), unique_image(result.mask), round(result.score, 4), result.verdict


def unique_image(pixels: np.ndarray) -> PIL.Image.Image:
    """`pixels` as a PIL image whose PNG bytes are unique to this request.

    Gradio caches output images under the hash of their bytes and rewrites that file in place on every request:
    two concurrent requests with identical outputs (two all-black masks) make one client read a file the other is
    truncating. A random PNG text chunk gives every output its own file.
    """
    image = PIL.Image.fromarray(pixels)
    image.info["padim-space-request"] = uuid.uuid4().hex
    return image


def readable_upload_errors(component: gr.Image) -> gr.Image:
    """Makes `component` report undecodable uploads as a readable message instead of a bare "Error".

    Gradio decodes uploads before the callback runs, outside its try/except. The instance's `preprocess` is wrapped
    rather than gr.Image subclassed, because subclassing makes Gradio write a `.pyi` stub next to this file.
    """
    preprocess = component.preprocess

    def checked_preprocess(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as error:
            name = getattr(payload, "orig_name", None) or "The upload"
            raise gr.Error(
                f"{name} is not an image that can be read (PNG, JPEG, BMP, TIFF, WebP, ...): {type(error).__name__}",
                print_exception=False,
            ) from error

    component.preprocess = checked_preprocess
    return component


def input_size_label(config) -> str:
    """"256 x 192" for the model's input (height x width); a model saved by an older padim_hf has an int (a square)."""
    size = config.input_size
    height, width = (size, size) if isinstance(size, int) else size
    return f"{height} x {width}"


def model_card_markdown(detector: Detector) -> str:
    """Backbone, training set and evaluation metrics of the loaded model, as Markdown."""
    config = detector.config
    thresholds = detector.thresholds()
    lines = [
        f"**Model** `{detector.source}`",
        f"- Backbone: `{config.backbone}` (stages {list(config.layers)}, {config.n_features} random channels)",
        f"- Input size: {input_size_label(config)} px (height x width)",
        f"- Trained on: {config.train_dataset or 'unknown'} ({config.num_train_images} defect-free images)",
    ]
    if thresholds.calibrated:
        lines.append(f"- Calibrated thresholds: image {thresholds.image:.2f}, pixel {thresholds.pixel:.2f}")
    else:
        lines.append(
            f"- **Uncalibrated model**: the thresholds start at {thresholds.image:.2f}, the 99.9% quantile of a "
            f"{config.n_features}-d Gaussian's distance. Real scores run higher (much higher after few training "
            "images): move the sliders, or evaluate the model on labelled images to calibrate it."
        )
    metrics = evaluation_metrics(config.metrics)
    if metrics:
        recorded = config.metrics or {}
        dataset = dataset_description(recorded.get("dataset"))
        count = f", {recorded['num_images']} images" if isinstance(recorded.get("num_images"), int) else ""
        protocol = f", {recorded['protocol']} protocol" if isinstance(recorded.get("protocol"), str) else ""
        lines.append(f"\n**Evaluation**{f' on {dataset}' if dataset else ''}{count}{protocol}\n")
        lines.append("| metric | value |\n|---|---|")
        lines.extend(f"| {key.replace('_', ' ')} | {value:.3f} |" for key, value in metrics.items())
    else:
        lines.append("- Not evaluated yet: no metrics.")
    return "\n".join(lines)


def evaluation_metrics(metrics: dict | None) -> dict[str, float]:
    """The scores in `config.metrics` (AUROC, AUPRO, F1: floats), without what evaluate records beside them: counts
    (`num_images`, `calibration_images_excluded`: integers), the protocol name and the dataset."""
    return {key: value for key, value in (metrics or {}).items() if isinstance(value, float)}


def dataset_description(dataset) -> str:
    """`metrics["dataset"]` as evaluate writes it ({"name", "config", "split"}) in words, e.g. "hazelnut (test split)"."""
    if not isinstance(dataset, dict):
        return str(dataset) if dataset else ""
    details = [f"configuration {dataset['config']}" if dataset.get("config") else None]
    details.append(f"{dataset['split']} split" if dataset.get("split") else None)
    details = ", ".join(detail for detail in details if detail)
    name = f"`{dataset['name']}`" if dataset.get("name") else "an unnamed dataset"
    return f"{name} ({details})" if details else name


def slider_maximum(thresholds: Thresholds) -> float:
    # Room above the threshold for stricter settings; uncalibrated guesses are lower bounds, so give more room.
    factor = 3.0 if thresholds.calibrated else 30.0
    return float(f"{factor * max(thresholds.image, thresholds.pixel):.2g}")


def widened_maximum(score: float | None, maximum: float) -> float | None:
    """A new top for the threshold sliders when `score` comes near the current one, else None.

    An uncalibrated model's first guess can be far below its real scores; the sliders grow (never shrink, so a
    chosen threshold stays in range) to keep room above every score seen in the session.
    """
    if score is None or score < 0.8 * maximum:
        return None
    return float(f"{2.0 * score:.2g}")


def widen_sliders(score: float | None, maximum: float):
    """Gradio callback: `widened_maximum` applied to both sliders and the session's state."""
    widened = widened_maximum(score, maximum)
    if widened is None:
        return gr.update(), gr.update(), maximum
    update = gr.update(maximum=widened, step=widened / 1000)
    return update, update, widened


def threshold_slider(label: str, value: float, maximum: float, elem_id: str) -> gr.Slider:
    return gr.Slider(0.0, maximum, value=round(value, 2), step=maximum / 1000, label=label, elem_id=elem_id)


def build_demo(detector: Detector | None, message: str = "") -> gr.Blocks:
    """The Space's UI. With no detector it shows `message` (how to get a model) and analyses nothing."""
    # delete_cache: served images are removed after an hour, so a long-running Space does not fill its disk.
    with gr.Blocks(title="PaDiM anomaly detection", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# PaDiM anomaly detection\nUpload a photo of a part (or pick an example): the heatmap shows where it "
            "differs from the defect-free images the model was fitted on."
        )
        if detector is None:
            gr.Markdown(f"### No model loaded\n{message}", elem_id="no-model")
            thresholds = Thresholds(image=1.0, pixel=1.0, calibrated=False)
        else:
            thresholds = detector.thresholds()
        maximum = slider_maximum(thresholds)
        with gr.Row():
            with gr.Column():
                # type="filepath" with image_mode=None hands over the upload undecoded: load_image decodes it once,
                # downscaling huge images, and reports unreadable files as messages.
                image = readable_upload_errors(
                    gr.Image(
                        label="Image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="input-image",
                    )
                )
                image_threshold = threshold_slider(
                    "Verdict threshold (image score)", thresholds.image, maximum, "image-threshold"
                )
                pixel_threshold = threshold_slider(
                    "Mask threshold (pixel score)", thresholds.pixel, maximum, "pixel-threshold"
                )
                button = gr.Button("Analyse", variant="primary")
                examples = sorted(EXAMPLES_DIR.glob("*.png"))
                if examples:
                    gr.Examples(
                        [[str(path)] for path in examples],
                        inputs=[image],
                        label="Examples (synthetic fabric)",
                        elem_id="examples",
                    )
            with gr.Column():
                overlay = gr.Image(
                    label="Anomaly heatmap (white: mask threshold)", format="png", interactive=False, elem_id="overlay"
                )
                with gr.Row():
                    score = gr.Number(label="Anomaly score", precision=2, interactive=False, elem_id="score")
                    verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="verdict")
                mask = gr.Image(
                    label="Defect mask (pixels at or above the mask threshold)",
                    format="png",
                    interactive=False,
                    elem_id="mask",
                )
        if detector is not None:
            with gr.Accordion("About this model", open=True):
                gr.Markdown(model_card_markdown(detector), elem_id="model-info")
        slider_top = gr.State(maximum)
        gr.on(
            [image.change, button.click, image_threshold.release, pixel_threshold.release],
            predict,
            inputs=[image, image_threshold, pixel_threshold],
            outputs=[overlay, mask, score, verdict],
            api_name="analyse",
        ).success(
            widen_sliders,
            inputs=[score, slider_top],
            outputs=[image_threshold, pixel_threshold, slider_top],
            api_visibility="private",
        )
    return demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)


def model_source() -> str:
    return os.environ.get(MODEL_ENV) or str(DEFAULT_LOCAL_MODEL)


def model_revision() -> str | None:
    return os.environ.get(REVISION_ENV) or None


def model_engine() -> str:
    return os.environ.get(ENGINE_ENV) or "torch"


def model_precision() -> str:
    return os.environ.get(PRECISION_ENV) or "float32"


def load_detector(source: str, revision: str | None = None, engine: str | None = None) -> tuple[Detector | None, str]:
    """The detector at `source`, or None and a message saying what went wrong and how to get a model."""
    if source == str(DEFAULT_LOCAL_MODEL) and not DEFAULT_LOCAL_MODEL.exists():
        if os.environ.get("SPACE_ID"):  # running on Hugging Face: the fix is a Space setting, not a local command
            return None, (
                f"This Space has no model configured: set the Space variable `{MODEL_ENV}` to a PaDiM model repo id."
            )
        return None, f"No model at `{DEFAULT_LOCAL_MODEL}`. {HOW_TO_MAKE_A_MODEL}"
    try:
        return Detector.load(source, revision, engine or model_engine(), model_precision()), ""
    except Exception as error:  # any loading failure is reported in the UI, the app still starts
        logger.exception("could not load %s", source)
        return None, f"Could not load the model `{source}`: {type(error).__name__}: {error}\n\n{HOW_TO_MAKE_A_MODEL}"


DETECTOR, LOAD_MESSAGE = load_detector(model_source(), model_revision())
demo = build_demo(DETECTOR, LOAD_MESSAGE)

if __name__ == "__main__":
    demo.launch(max_file_size="50mb")
