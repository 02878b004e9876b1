"""Gradio Space: PaDiM anomaly detection. Inspect a part's image with a detector, or fit your own from good images.

Reads top to bottom:

1. The model the Space starts with: the one `PADIM_MODEL` names (a Hub repo id or a local folder, loaded with
   `trust_remote_code=True` and pinned by `PADIM_REVISION`), or else, so that a duplicated Space works as it is, a
   small example detector fitted at start-up on the bundled synthetic fabric (`synthetic.py`), offline.
2. The UI: the "Inspect" tab (heatmap, mask, score, verdict) and the "Fit your own detector" tab (upload good
   images, fit, see the held-out calibration, download the model, push it to your own Hub account).
3. The callbacks. Each browser session has its own detector and folder (`fitting.Sessions`): a session analyses
   with the model it fitted, else with the start-up one, and everything it uploaded or made is deleted when the
   browser tab closes.

`detector.py` loads models and analyses images; `fitting.py` checks uploads and calls padim_hf to fit, calibrate,
save and push. The library does the work; this file only wires it.
"""

import hashlib
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import torch
from gradio.utils import get_space, get_upload_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))  # detector.py, fitting.py, synthetic.py beside this file
import fitting  # noqa: E402
import synthetic  # noqa: E402
from detector import ENGINE_ENV, PRECISION_ENV, Detector, Thresholds, analyse  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_ENV = "PADIM_MODEL"
REVISION_ENV = "PADIM_REVISION"  # a commit hash of the model repo: the remote code that runs is then fixed
SPACE_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPACE_DIR / "examples"
# The start-up example: fitted like a user's model (fitting.fit_detector), on synthetic fabric with a little noise.
EXAMPLE_TRAIN_IMAGES = 40
EXAMPLE_SIZE = 128
EXAMPLE_SOURCE = "example: synthetic fabric (synthetic.py)"
# Hugging Face's free CPU Spaces have 2 vCPUs: more concurrent PaDiM forwards would only slow each other down.
CONCURRENCY_LIMIT = 2 if not torch.cuda.is_available() else 4
FIT_SLOTS = fitting.available_cpus()  # one fit at a time per CPU core; the others wait in the queue
MAX_UPLOAD = "50mb"  # Gradio's per-file limit (a zip of good images); fitting.py limits images and totals further


# --- 1. the model the Space starts with -------------------------------------------------------------------------


def example_detector() -> Detector:
    """The start-up detector when no model is configured: fitted on synthetic fabric by the same function that
    fits users' models (about FALSE_ALARM_RATE of good parts flagged, calibrated on held-out images)."""
    images = [PIL.Image.fromarray(synthetic.fabric(seed, noise=0.02)) for seed in range(EXAMPLE_TRAIN_IMAGES)]
    detector = fitting.fit_detector(images, EXAMPLE_SIZE, source=EXAMPLE_SOURCE)
    detector.config.train_dataset = "synthetic fabric (synthetic.py)"
    return detector


def load_detector(source: str, revision: str | None = None, engine: str | None = None) -> tuple[Detector | None, str]:
    """The detector at `source`, or None and a message saying what went wrong (shown in the UI; the Space still
    starts, and users can fit their own)."""
    engine = engine or os.environ.get(ENGINE_ENV) or "torch"
    precision = os.environ.get(PRECISION_ENV) or "float32"
    try:
        return Detector.load(source, revision, engine, precision), ""
    except Exception as error:  # any loading failure is reported in the UI, the app still starts
        logger.exception("could not load %s", source)
        return None, (
            f"Could not load the model `{source}` (`{MODEL_ENV}`): {type(error).__name__}: {error}\n\n"
            f"Fix `{MODEL_ENV}`, unset it to start with the example detector, or fit your own in the "
            "\"Fit your own detector\" tab."
        )


def startup_detector() -> tuple[Detector | None, str]:
    """`PADIM_MODEL` when it is set, else the example detector fitted now."""
    source = os.environ.get(MODEL_ENV)
    if source:
        return load_detector(source, os.environ.get(REVISION_ENV) or None)
    started = time.perf_counter()
    detector = example_detector()
    logger.warning("no %s set: fitted the example detector in %s", MODEL_ENV, fitting.elapsed(started))
    return detector, ""


def oauth_available() -> bool:
    """Whether "Sign in with Hugging Face" really signs users in: on a Space with `hf_oauth: true`. Elsewhere
    Gradio would mock it with the machine's own login, so the push section is not offered."""
    return bool(get_space() and os.environ.get("OAUTH_CLIENT_ID"))


# --- 2. the UI ------------------------------------------------------------------------------------------------------


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
        lines.append(f"- Thresholds: image {thresholds.image:.2f}, pixel {thresholds.pixel:.2f}")
    if getattr(config, "calibration", None) or not thresholds.calibrated:
        # padim_hf's own description: what the verdicts mean, or that there are none and how to get them.
        lines.append(f"- Verdicts: {fitting.calibration_summary(detector)}")
    if not thresholds.calibrated:
        lines.append("- Fit your own detector in the second tab: it gets a threshold from your good images.")
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
    """Room above the thresholds for stricter settings (a model without thresholds shows no sliders)."""
    if not thresholds.calibrated:
        return 1.0
    return float(f"{3.0 * max(thresholds.image, thresholds.pixel):.2g}")


def widened_maximum(score: float | None, maximum: float) -> float | None:
    """A new top for the threshold sliders when `score` comes near the current one, else None.

    A defect can score far above the thresholds; the sliders grow (never shrink, so a chosen threshold stays in
    range) to keep room above every score seen in the session.
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


def threshold_slider(label: str, value: float | None, maximum: float, elem_id: str) -> gr.Slider:
    # Hidden for a model without thresholds: there is nothing to start from (fitting one shows them).
    return gr.Slider(
        0.0, maximum, value=round(value or 0.0, 2), step=maximum / 1000, label=label, elem_id=elem_id,
        visible=value is not None,
    )


INTRO = (
    "# PaDiM anomaly detection\nUpload a photo of a part (or pick an example): the heatmap shows where it differs "
    "from the defect-free images the detector was fitted on. No detector of your own yet? Fit one from your good "
    "images in the second tab."
)
FIT_HELP = f"""Upload {fitting.MIN_FIT_IMAGES} to {fitting.MAX_FIT_IMAGES} photos of **good** parts (several files at
once, or one .zip), all of one shape, up to {fitting.MAX_IMAGE_BYTES // 2**20} MB each. The detector is fitted on this
Space's CPU with an ImageNet EfficientNet-Lite0 backbone. About one image in ten (at least five) is held out, scored,
then added to the fit: their scores set the verdict threshold, aiming at {fitting.FALSE_ALARM_RATE:.0%} false alarms
(the result says what your number of images allows). Your images and your model are yours alone and are deleted when
you close this tab: download the model, or push it to your Hub account, to keep it."""


def build_demo(space: "Space") -> gr.Blocks:
    """The UI: the Inspect tab and the Fit tab, wired to `space`'s callbacks."""
    thresholds = space.detector.thresholds() if space.detector else Thresholds(image=None, pixel=None)
    maximum = slider_maximum(thresholds)
    # delete_cache: files Gradio serves are removed after an hour, so a long-running Space does not fill its disk.
    with gr.Blocks(title="PaDiM anomaly detection", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Inspect", id="inspect"):
            if space.detector is None:
                gr.Markdown(f"### No model loaded\n{space.message}", elem_id="no-model")
            with gr.Row():
                with gr.Column():
                    # type="filepath" with image_mode=None hands over the upload undecoded: load_image decodes it
                    # once, downscaling huge images, and reports unreadable files as messages.
                    image = readable_upload_errors(
                        gr.Image(
                            label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
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
                    gr.Examples(
                        [[str(path)] for path in sorted(EXAMPLES_DIR.glob("*.png"))],
                        inputs=[image],
                        label="Examples (synthetic fabric)",
                        elem_id="examples",
                    )
                with gr.Column():
                    overlay = gr.Image(
                        label="Anomaly heatmap (white: mask threshold)", format="png", interactive=False,
                        elem_id="overlay",
                    )
                    with gr.Row():
                        score = gr.Number(label="Anomaly score", precision=2, interactive=False, elem_id="score")
                        verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="verdict")
                    mask = gr.Image(
                        label="Defect mask (pixels at or above the mask threshold)", format="png",
                        interactive=False, elem_id="mask",
                    )
            with gr.Accordion("About this model", open=True):
                model_info = gr.Markdown(
                    model_card_markdown(space.detector) if space.detector else "", elem_id="model-info"
                )
        with gr.Tab("Fit your own detector", id="fit"):
            gr.Markdown(FIT_HELP)
            if oauth_available():
                with gr.Row():
                    gr.LoginButton(elem_id="login", scale=0, min_width=260)
                    gr.Markdown("To push your model to your Hub account, sign in **before** fitting: signing in "
                                "reloads the page, which starts a new session.")
            files = gr.File(
                label="Good images (PNG, JPEG, BMP, TIFF, WebP) or a .zip of them", file_count="multiple",
                height=240, elem_id="fit-files",
            )
            size = gr.Radio(
                [(f"{px} px" + (" (default)" if px == fitting.DEFAULT_FIT_SIZE else ""), px) for px in fitting.FIT_SIZES],
                value=fitting.DEFAULT_FIT_SIZE, label="Input size: about N x N pixels, at your images' aspect ratio (larger: finer maps, slower fit)", elem_id="fit-size",
            )
            fit_button = gr.Button("Fit", variant="primary", elem_id="fit-button")
            fit_result = gr.Markdown(elem_id="fit-result", min_height=90)  # room for the progress bar
            download = gr.DownloadButton("Download the model (.zip)", visible=False, elem_id="download")
            with gr.Group():
                gr.Markdown("### Push the model to your Hugging Face account")
                if oauth_available():
                    repo = gr.Textbox(label="Repository name (in your namespace)", value="padim-detector", elem_id="push-repo")
                    private = gr.Checkbox(label="Private", value=True, elem_id="push-private")
                    push_button = gr.Button("Push", elem_id="push-button")
                    push_result = gr.Markdown(elem_id="push-result")
                    push_button.click(
                        space.push, inputs=[repo, private], outputs=[push_result], api_visibility="private"
                    )
                else:
                    gr.Markdown(
                        "Pushing needs \"Sign in with Hugging Face\", which works when this app runs as a Space with "
                        "`hf_oauth: true` (as this folder's README sets). Here, download the zip and run "
                        "`padim-hf push model your-name/your-repo`.",
                        elem_id="push-unavailable",
                    )
        slider_top = gr.State(maximum)
        gr.on(
            [image.change, button.click, image_threshold.release, pixel_threshold.release],
            space.predict,
            inputs=[image, image_threshold, pixel_threshold],
            outputs=[overlay, mask, score, verdict],
            api_name="analyse",
        ).success(
            widen_sliders,
            inputs=[score, slider_top],
            outputs=[image_threshold, pixel_threshold, slider_top],
            api_visibility="private",
        )
        fit_button.click(
            space.fit,
            inputs=[files, size],
            outputs=[fit_result, download, model_info, image_threshold, pixel_threshold, slider_top],
            concurrency_limit=space.fit_slots,
            concurrency_id="fit",
            api_name="fit",
        )
        demo.unload(space.end_session)
    demo.space = space  # for tests and for anyone embedding the app
    return demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)


# --- 3. the callbacks -----------------------------------------------------------------------------------------------


class Space:
    """The start-up detector, the browser sessions, and the callbacks the UI calls."""

    def __init__(self, detector: Detector | None, message: str = "", *, fit_slots: int = FIT_SLOTS, root: Path | None = None):
        self.detector, self.message, self.fit_slots = detector, message, fit_slots
        # Under Gradio's upload folder: files returned from there are served as they are, not copied elsewhere.
        self.sessions = fitting.Sessions(root or Path(get_upload_folder()) / "padim-space-sessions")
        self.example_hashes = {file_hash(path) for path in EXAMPLES_DIR.glob("*.png")}

    def session_detector(self, request: gr.Request | None) -> Detector:
        detector = self.sessions.detector(request.session_hash if request else None) or self.detector
        if detector is None:
            raise gr.Error(self.message, print_exception=False)
        return detector

    def predict(self, image: str | None, image_threshold: float, pixel_threshold: float, request: gr.Request):
        """Analyses one image with the session's detector; errors become messages in the UI."""
        if image is None:
            return None, None, None, ""
        detector = self.session_detector(request)
        if not detector.thresholds().calibrated:  # hidden sliders: no verdict rather than one from their values
            image_threshold = pixel_threshold = None
        session = self.sessions.get(request.session_hash)
        if Path(image).is_file() and file_hash(image) not in self.example_hashes:  # examples are shared
            self.sessions.add_uploads(request.session_hash, [image])
        try:
            result = analyse(image, image_threshold, pixel_threshold, detector=detector)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from error
        except Exception as error:  # anything else is a bug: log it, but show the user a message, not a traceback
            logger.exception("analysis failed")
            raise gr.Error(f"Analysis failed ({type(error).__name__}: {error})", print_exception=False) from error
        # Written to the session's folder (deleted with the session), each under a name of its own.
        overlay = save_png(result.overlay, session.folder, "heatmap")
        mask = save_png(result.mask, session.folder, "mask")
        return overlay, mask, round(result.score, 4), result.verdict

    def fit(self, files: list[str] | None, size: int, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """Fits the session's own detector on the uploaded good images."""
        session = self.sessions.get(request.session_hash)
        self.sessions.add_uploads(request.session_hash, files or [])
        if not files:
            raise gr.Error("Upload good images first (several files, or one .zip).", print_exception=False)
        try:
            progress(0, desc="Checking the images")
            images = fitting.read_good_images(files, decode)
            progress(0, desc=f"Fitting on {len(images)} images")
            started = time.perf_counter()
            detector = fitting.fit_detector(images, int(size))
            took = fitting.elapsed(started)
            detector.config.train_dataset = f"{len(images)} images uploaded to the Space"
            model_zip = fitting.save_model(detector, session.folder)
        except fitting.UploadError as error:
            raise gr.Error(str(error), print_exception=False) from error
        session.detector, session.model_zip = detector, model_zip
        thresholds = detector.thresholds()
        top = slider_maximum(thresholds)
        summary = (
            f"**Fitted** on {len(images)} good images at {input_size_label(detector.config)} px (height x width) "
            f"in {took}.\n\n"
            f"**Held-out calibration:** {fitting.calibration_summary(detector)}\n\n"
            "Your detector now answers in the **Inspect** tab."
        )
        return (
            summary,
            gr.DownloadButton(value=str(model_zip), visible=True),
            model_card_markdown(detector),
            gr.update(value=round(thresholds.image, 2), maximum=top, step=top / 1000, visible=True),
            gr.update(value=round(thresholds.pixel, 2), maximum=top, step=top / 1000, visible=True),
            top,
        )

    def push(
        self,
        repo: str,
        private: bool,
        request: gr.Request,
        profile: gr.OAuthProfile | None,
        oauth_token: gr.OAuthToken | None,
    ) -> str:
        """Pushes the session's model with the signed-in user's token (never the Space's own HF_TOKEN)."""
        session = self.sessions.get(request.session_hash)
        if profile is None or oauth_token is None:
            raise gr.Error("Sign in with Hugging Face first: the model goes to your own account.", print_exception=False)
        if session.detector is None:
            raise gr.Error("Fit a detector first.", print_exception=False)
        try:
            url = fitting.push_to_hub(
                session.folder / fitting.MODEL_FOLDER, repo, profile.username, oauth_token.token, private
            )
        except (fitting.UploadError, RuntimeError, OSError) as error:  # padim_hf.HubPushError is a RuntimeError
            raise gr.Error(str(error), print_exception=False) from error
        return f"Pushed: [{url}]({url})"

    def end_session(self, request: gr.Request) -> None:
        """The browser tab closed: the session's uploads, model and images are deleted."""
        self.sessions.end(request.session_hash)


def decode(image, name: str | None = None) -> PIL.Image.Image:
    """padim_hf's one image decoder (EXIF orientation, alpha, 16-bit, ...): uploads for a fit go through it as
    analysis and fitting do."""
    from padim_hf.image_processing_padim import decode_image

    return decode_image(image, name)


def save_png(pixels: np.ndarray, folder: Path, stem: str) -> str:
    path = folder / f"{stem}-{uuid.uuid4().hex[:12]}.png"
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- start ----------------------------------------------------------------------------------------------------------

DETECTOR, LOAD_MESSAGE = startup_detector()
demo = build_demo(Space(DETECTOR, LOAD_MESSAGE))

if __name__ == "__main__":
    demo.launch(max_file_size=MAX_UPLOAD)
