"""The Gradio Space (spaces/app.py): the analysis function, the HTTP API through gradio_client, and a real browser.

The model is a small real one: ImageNet EfficientNet-Lite0 (offline weights) fitted on 8 synthetic fabric images,
its thresholds calibrated on held-out synthetic images, saved with its remote code and loaded by the app through
`PADIM_MODEL`, exactly as a Space loads a Hub repo.
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import numpy as np
import PIL.Image
import pytest
import torch

from padim_hf import PadimConfig, PadimImageProcessor, PadimModel
from padim_hf.weights import export_lite0_weights

from .test_hub import hub, hub_env  # noqa: F401  (the loopback Hub fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "spaces"
EXAMPLES = SPACE_DIR / "examples"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def load_module(path: Path, name: str):
    """Imports a file of spaces/ (not a package: on a Space it is the repository root)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic = load_module(SPACE_DIR / "synthetic.py", "padim_space_synthetic")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def analyse(app, image, *args, **kwargs):
    """The app's analysis with its start-up detector (the model PADIM_MODEL names), unless a test passes another."""
    kwargs.setdefault("detector", app.DETECTOR)
    return app.analyse(image, *args, **kwargs)


MAX_SIDE = 1024  # spaces/detector.py's MAX_SIDE, checked by test_huge_image_is_downscaled_before_analysis


def defect_image(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return synthetic.add_defect(synthetic.fabric(700 + seed), kind, seed=800 + seed)


@pytest.fixture(scope="session")
def fitted_model(tmp_path_factory) -> PadimModel:
    weights = export_lite0_weights(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors")
    config = PadimConfig(backbone="tf_efficientnet_lite0", n_features=50, image_size=64)
    processor = PadimImageProcessor.from_padim_config(config)
    train = [synthetic.fabric(seed, noise=0.02) for seed in range(8)]
    model = PadimModel(config).load_backbone_weights(weights)
    return model.fit([processor(train, return_tensors="pt")["pixel_values"]])


def calibrate(model: PadimModel) -> None:
    """Thresholds halfway between held-out good and defective synthetic images, and the pixel AUROC on them, as
    an evaluation would set them."""
    from sklearn.metrics import roc_auc_score

    processor = PadimImageProcessor.from_padim_config(model.config)
    good = [synthetic.fabric(seed) for seed in range(600, 604)]
    bad, truths = zip(*(defect_image(kind, seed) for seed, kind in enumerate(synthetic.DEFECT_KINDS * 2)))
    with torch.no_grad():
        outputs = model(**processor(good + list(bad), return_tensors="pt"))
    scores = outputs.pred_score
    highest_good, lowest_bad = scores[: len(good)].max().item(), scores[len(good) :].min().item()
    assert highest_good < lowest_bad, "the synthetic defects must be separable for these tests to mean anything"
    truths = [np.zeros(image.shape[:2], bool) for image in good] + list(truths)
    maps = processor.post_process_anomaly_maps(outputs.anomaly_map, [truth.shape for truth in truths])
    labels = np.concatenate([truth.ravel() for truth in truths])
    pixel_auroc = roc_auc_score(labels, np.concatenate([anomaly_map.numpy().ravel() for anomaly_map in maps]))
    assert pixel_auroc > 0.9
    model.config.image_threshold = (highest_good + lowest_bad) / 2
    model.config.pixel_threshold = (highest_good + lowest_bad) / 2
    model.config.train_dataset = "synthetic fabric (spaces/synthetic.py)"
    # The shape `padim-hf evaluate` writes (evaluate.record_evaluation): scores, the dataset as {name, config,
    # split}, the image count, the protocol and how many calibration images were left out.
    model.config.metrics = {
        "image_auroc": 1.0,
        "pixel_auroc": float(pixel_auroc),
        "pixel_aupro": None,
        "dataset": {"name": "synthetic-fabric", "config": None, "split": "held_out"},
        "num_images": len(good) + len(bad),
        "protocol": "model",
        "calibration_images_excluded": 0,
    }


@pytest.fixture(scope="session")
def model_dir(fitted_model, tmp_path_factory) -> Path:
    calibrate(fitted_model)
    directory = tmp_path_factory.mktemp("space-model")
    fitted_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def uncalibrated_model_dir(fitted_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("space-model-uncalibrated")
    config = fitted_model.config
    saved = config.image_threshold, config.pixel_threshold
    config.image_threshold = config.pixel_threshold = None
    try:
        fitted_model.save_pretrained(directory)
    finally:
        config.image_threshold, config.pixel_threshold = saved
    return directory


@pytest.fixture(scope="session")
def app(model_dir, tmp_path_factory):
    """spaces/app.py imported the way `python app.py` runs it, with PADIM_MODEL pointing at the test model.

    Gradio's upload folder (where uploads and the Space's session folders go) is this test session's own, so what
    a test finds there was made by this session, not by another test run on the same machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PADIM_MODEL", str(model_dir))
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        module = load_module(SPACE_DIR / "app.py", "padim_space_app")
        assert module.DETECTOR is not None, module.LOAD_MESSAGE
        assert str(module.demo.space.sessions.root).startswith(os.environ["GRADIO_TEMP_DIR"])
        yield module


@pytest.fixture(scope="session")
def server(app):
    """The app served on a free loopback port; yields its URL."""
    port = free_port()
    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()


@pytest.fixture
def text_file_named_png(tmp_path) -> Path:
    path = tmp_path / "not_really.png"
    path.write_text("this is a text file, not a PNG\n")
    return path


def require_chromium() -> None:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is absent: install it with .ci/install-browser.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


# --- the analysis function ---------------------------------------------------------------------------------------


def test_examples_ship_with_the_space_and_are_small():
    names = sorted(path.name for path in EXAMPLES.glob("*.png"))
    assert names == ["good_1.png", "good_2.png", "hole.png", "scratch.png", "stain.png"]
    assert all((EXAMPLES / name).stat().st_size < 8_000 for name in names)


@pytest.mark.parametrize("kind", synthetic.DEFECT_KINDS)
def test_defects_score_above_good_images_and_the_mask_covers_them(app, kind):
    good = analyse(app, synthetic.fabric(900))
    image, truth = defect_image(kind, seed=5)
    result = analyse(app, image)
    thresholds = app.DETECTOR.thresholds()
    assert thresholds.calibrated
    assert result.score > thresholds.image > good.score
    assert result.verdict.startswith("Anomalous") and good.verdict.startswith("Normal")
    assert not good.mask.any()
    mask = result.mask > 0
    assert result.mask.shape == truth.shape and set(np.unique(result.mask)) == {0, 255}
    assert mask[truth].mean() > 0.95  # the whole defect is flagged ...
    assert mask.mean() < 0.6  # ... and not the whole image
    # The hottest pixel lies on the defect, or within the blur's reach of it.
    anomaly_map, score = app.DETECTOR.predict(PIL.Image.fromarray(image))
    peak = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    distances = np.hypot(*(np.argwhere(truth) - peak).T)
    assert distances.min() < 12
    assert result.score == score
    assert anomaly_map.max() == pytest.approx(score, rel=0.02)  # resizing the map barely moves its maximum


def test_overlay_is_the_image_with_a_heatmap_and_colour_bar(app):
    result = analyse(app, EXAMPLES / "stain.png")
    height, width, channels = result.overlay.shape
    assert channels == 3 and result.overlay.dtype == np.uint8
    assert width > height > 300  # the figure: image plus a colour bar on the right
    # jet's red and blue both appear: the heat at the stain and the cold background.
    red = (result.overlay[..., 0] > 180) & (result.overlay[..., 2] < 90)
    blue = (result.overlay[..., 2] > 150) & (result.overlay[..., 0] < 90)
    assert red.mean() > 0.01 and blue.mean() > 0.01


@pytest.mark.parametrize("shape", [(60, 900), (900, 60), (1000, 1000)])
def test_overlay_stays_screen_sized_for_any_aspect_ratio(app, shape):
    image = np.asarray(PIL.Image.fromarray(synthetic.fabric(3, size=1000)).crop((0, 0, shape[1], shape[0])))
    result = analyse(app, image)
    assert result.mask.shape == shape
    assert max(result.overlay.shape[:2]) <= 800 and min(result.overlay.shape[:2]) >= 150


def test_thresholds_move_the_mask_and_the_verdict(app):
    image, _ = defect_image("stain", seed=1)
    default = analyse(app, image)
    strict = analyse(app, image, image_threshold=default.score * 1.1, pixel_threshold=default.score * 0.9)
    lax = analyse(app, image, pixel_threshold=app.DETECTOR.thresholds().pixel * 0.8)
    assert strict.score == pytest.approx(default.score)
    assert default.verdict.startswith("Anomalous") and strict.verdict.startswith("Normal")
    assert 0 < (strict.mask > 0).sum() < (default.mask > 0).sum() < (lax.mask > 0).sum()
    assert f"{default.score:.2f}" in default.verdict


def test_grayscale_rgba_and_16_bit_images_give_the_rgb_result(app, tmp_path):
    rgb = synthetic.fabric(901)
    gray = np.asarray(PIL.Image.fromarray(rgb).convert("L"))
    reference_gray = analyse(app, np.repeat(gray[..., None], 3, axis=-1)).score
    assert analyse(app, gray).score == pytest.approx(reference_gray, rel=1e-4)
    PIL.Image.fromarray(gray).save(tmp_path / "gray.png")
    assert analyse(app, tmp_path / "gray.png").score == pytest.approx(reference_gray, rel=1e-4)
    PIL.Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert analyse(app, tmp_path / "gray16.png").score == pytest.approx(reference_gray, rel=1e-3)

    reference = analyse(app, rgb).score
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    PIL.Image.fromarray(opaque).save(tmp_path / "rgba.png")
    assert analyse(app, tmp_path / "rgba.png").score == pytest.approx(reference, rel=1e-4)
    # A transparent hole shows white (composited like the image processor does): an anomaly on fabric.
    holed = opaque.copy()
    holed[50:70, 50:70, 3] = 0
    assert analyse(app, holed).score > app.DETECTOR.thresholds().image > reference


def test_exif_rotation_is_applied(app, tmp_path):
    image, truth = defect_image("scratch", seed=3)
    stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(image[:, :96])))  # 96 x 128 stored sideways ...
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 degrees clockwise to view" as its EXIF orientation
    stored.save(tmp_path / "rotated.png", exif=exif)
    result = analyse(app, tmp_path / "rotated.png")
    assert result.mask.shape == (128, 96)
    assert (result.mask > 0)[truth[:, :96]].mean() > 0.9


def test_huge_image_is_downscaled_before_analysis(app, tmp_path):
    image, truth = defect_image("hole", seed=2)
    huge = np.asarray(PIL.Image.fromarray(image).resize((6000, 4800), PIL.Image.Resampling.NEAREST))
    path = tmp_path / "huge.png"
    PIL.Image.fromarray(huge).save(path, compress_level=1)
    result = analyse(app, path)
    assert app.sys.modules["detector"].MAX_SIDE == MAX_SIDE
    assert result.mask.shape == (MAX_SIDE * 4 // 5, MAX_SIDE)  # aspect ratio kept
    assert result.verdict.startswith("Anomalous")
    assert result.score == pytest.approx(analyse(app, image).score, rel=0.1)


def test_images_over_the_pixel_limit_are_refused_with_a_message(app, monkeypatch, tmp_path):
    PIL.Image.fromarray(synthetic.fabric(1)).save(tmp_path / "big.png")
    monkeypatch.setattr(app.sys.modules["detector"], "MAX_PIXELS", 100 * 100)
    with pytest.raises(ValueError, match=r"128x128 pixels; images up to"):
        analyse(app, tmp_path / "big.png")


def test_non_images_are_refused_with_a_message(app, text_file_named_png):
    import gradio as gr

    with pytest.raises(ValueError, match="not_really.png is not an image"):
        analyse(app, text_file_named_png)
    with pytest.raises(gr.Error, match="not an image"):
        app.demo.space.predict(str(text_file_named_png), 1.0, 1.0, gr.Request(session_hash="unit-test"))
    with pytest.raises(ValueError, match="shape"):
        analyse(app, np.zeros((4, 4, 2), np.uint8))


def test_sliders_start_at_the_calibrated_thresholds(app):
    import gradio as gr

    thresholds = app.DETECTOR.thresholds()
    sliders = {block.label: block for block in app.demo.blocks.values() if isinstance(block, gr.Slider)}
    verdict, mask = sliders["Verdict threshold (image score)"], sliders["Mask threshold (pixel score)"]
    assert verdict.value == pytest.approx(thresholds.image, abs=0.005)
    assert mask.value == pytest.approx(thresholds.pixel, abs=0.005)
    assert verdict.maximum >= 2 * thresholds.image and verdict.minimum == 0


def test_model_panel_lists_backbone_training_set_and_metrics(app):
    text = app.model_card_markdown(app.DETECTOR)
    assert "`tf_efficientnet_lite0`" in text and "50 random channels" in text
    assert "synthetic fabric (spaces/synthetic.py) (8 defect-free images)" in text
    pixel_auroc = app.DETECTOR.config.metrics["pixel_auroc"]
    assert "| image auroc | 1.000 |" in text and f"| pixel auroc | {pixel_auroc:.3f} |" in text
    assert "on `synthetic-fabric` (held_out split), 10 images, model protocol" in text
    assert "| num" not in text and "calibration images" not in text and "{" not in text  # no counts as metrics, no dict repr
    assert "pixel aupro" not in text  # undefined metrics (None) are not listed
    assert f"image {app.DETECTOR.thresholds().image:.2f}" in text


def test_a_model_without_thresholds_gives_heatmaps_and_scores_but_no_verdict(app, uncalibrated_model_dir):
    """No threshold of the Space's own making: padim_hf calls no part good or defective without one, nor does the
    Space; the panel says so in padim_hf's words and points to fitting (which calibrates)."""
    from padim_hf.calibration import describe_calibration

    detector = app.Detector.load(uncalibrated_model_dir)
    thresholds = detector.thresholds()
    assert not thresholds.calibrated and thresholds.image is None and thresholds.pixel is None
    text = app.model_card_markdown(detector)
    assert describe_calibration(detector.config) in text and "Fit your own detector" in text
    result = analyse(app, EXAMPLES / "hole.png", detector=detector)
    assert result.verdict.startswith("No verdict") and f"{result.score:.2f}" in result.verdict
    assert not result.mask.any() and result.overlay.shape[2] == 3
    explicit = analyse(app, EXAMPLES / "hole.png", result.score / 2, result.score / 2, detector=detector)
    assert explicit.verdict.startswith("Anomalous") and explicit.mask.any()  # thresholds given are used
    space = app.Space(detector)
    import gradio as gr

    *_, verdict = space.predict(str(EXAMPLES / "hole.png"), 1.0, 1.0, gr.Request(session_hash="no-threshold"))
    assert verdict.startswith("No verdict")  # the (hidden) sliders' values are not a threshold
    sliders = [block for block in app.build_demo(space).blocks.values() if isinstance(block, gr.Slider)]
    assert sliders and not any(slider.visible for slider in sliders)


def test_sliders_grow_to_leave_room_above_every_score(app):
    assert app.widened_maximum(None, 100.0) is None
    assert app.widened_maximum(50.0, 100.0) is None
    assert app.widened_maximum(90.0, 100.0) == 180.0
    assert app.widened_maximum(799.53, 280.0) == 1600.0
    image_update, pixel_update, top = app.widen_sliders(799.53, 280.0)
    assert image_update["maximum"] == pixel_update["maximum"] == top == 1600.0
    assert app.widen_sliders(10.0, 280.0)[2] == 280.0


def test_a_model_that_fails_to_load_is_reported_and_fitting_still_works(app, tmp_path):
    import gradio as gr

    detector, message = app.load_detector(str(tmp_path / "elsewhere"))
    assert detector is None and "Could not load the model" in message and "PADIM_MODEL" in message
    assert "Fit your own detector" in message
    space = app.Space(None, message, root=tmp_path / "sessions")
    with pytest.raises(gr.Error, match="Could not load the model"):
        space.predict(str(EXAMPLES / "good_1.png"), 1.0, 1.0, gr.Request(session_hash="no-model"))
    blocks = app.build_demo(space)
    markdown = [block.value for block in blocks.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("No model loaded" in text and "Could not load the model" in text for text in markdown)
    assert any(getattr(block, "elem_id", None) == "fit-button" for block in blocks.blocks.values())


def test_space_metadata_is_deployable():
    import gradio

    import yaml

    readme = (SPACE_DIR / "README.md").read_text()
    assert readme.startswith("---\n")
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert front_matter["sdk"] == "gradio" and front_matter["sdk_version"] == gradio.__version__
    assert front_matter["app_file"] == "app.py" and (SPACE_DIR / front_matter["app_file"]).is_file()
    assert len(front_matter["short_description"]) <= 60  # the Hub's limit
    # "Sign in with Hugging Face" for pushing: OAuth on, with the scope that creates the user's own repos.
    assert front_matter["hf_oauth"] is True and "contribute-repos" in front_matter["hf_oauth_scopes"]
    lines = (SPACE_DIR / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    packages = {re.split(r"[<>=!~\[ ;@]", requirement)[0].lower() for requirement in requirements}
    assert not any(name.startswith("gradio") for name in packages)  # gradio comes from sdk_version
    # The app fits with padim_hf and its offline backbone, and draws with matplotlib.
    assert any(re.match(r"padim-hf\[offline\]", requirement) for requirement in requirements)
    assert "matplotlib" in packages


# --- checking uploads for a fit (fitting.py) ---------------------------------------------------------------------


def write_images(folder: Path, count: int, size=(96, 96), seed: int = 0, kind: str = "fabric") -> list[Path]:
    """`count` good images: synthetic fabric, or (kind="texture") the demo's grey weave, a different product."""
    from padim_hf.demo import texture

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        if kind == "fabric":
            pixels = synthetic.fabric(seed * 1000 + index, size=max(size), noise=0.02)[: size[1], : size[0]]
        else:
            pixels = (texture(rng, max(size))[: size[1], : size[0]] * 255).astype(np.uint8)
        paths.append(folder / f"{kind}_{seed}_{index:02d}.png")
        PIL.Image.fromarray(pixels).save(paths[-1])
    return paths


def zip_files(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_good_images_come_from_files_and_zips_alike(app, tmp_path):
    fitting = app.fitting
    paths = write_images(tmp_path / "files", 12)
    archive = zip_files(
        tmp_path / "parts.zip",
        {f"good/{path.name}": path.read_bytes() for path in paths[:6]}
        | {"__MACOSX/good/._x.png": b"resource fork", ".DS_Store": b"finder"},  # what zips from a Mac carry
    )
    from_files = fitting.read_good_images(paths, app.decode)
    mixed = fitting.read_good_images([archive, *paths[6:]], app.decode)
    assert len(from_files) == len(mixed) == 12
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(from_files, mixed))
    assert all(image.mode == "RGB" and image.size == (96, 96) for image in mixed)


@pytest.mark.parametrize(
    "case, message",
    [
        ("too few", r"3 images uploaded; a fit needs at least 10 good images"),
        ("too many", r"12 images uploaded; up to 11 images per fit are accepted"),
        ("too large", r"fabric_0_00.png is 0.0 MB; images up to 0 MB are accepted"),
        ("too much in all", r"the images add up to 0 MB; up to 0 MB per fit are accepted"),
        ("not an image", r"notes.txt is not an image \(PNG, JPEG, BMP, TIFF, WebP\) or a .zip of images"),
        ("not an image inside", r"fake.png is not an image Pillow can read"),
        ("zip with other files", r"parts.zip: good/readme.md is not an image"),
        ("broken zip", r"broken.zip is not a zip file that can be opened"),
        ("empty zip", r"empty.zip holds no images"),
        ("mixed aspect ratios", r"mixed aspect ratios: 96 x 96 \(10 images, e.g. fabric_0_00.png.*; 128 x 96 \(2 images: fabric_1_00.png, fabric_1_01.png\)"),
        ("huge", r"fabric_0_00.png is 96x96 pixels; images up to 0 megapixels are accepted"),
    ],
)
def test_every_refused_upload_gets_a_message(app, tmp_path, monkeypatch, case, message):
    fitting = app.fitting
    paths = write_images(tmp_path / "good", 12)
    if case == "too few":
        paths = paths[:3]
    elif case == "too many":
        monkeypatch.setattr(fitting, "MAX_FIT_IMAGES", 11)
    elif case == "too large":
        monkeypatch.setattr(fitting, "MAX_IMAGE_BYTES", 1000)
    elif case == "too much in all":
        monkeypatch.setattr(fitting, "MAX_FIT_BYTES", 10_000)
    elif case == "not an image":
        (tmp_path / "notes.txt").write_text("good parts, batch 7")
        paths.append(tmp_path / "notes.txt")
    elif case == "not an image inside":
        (tmp_path / "fake.png").write_text("not a PNG")
        paths.append(tmp_path / "fake.png")
    elif case == "zip with other files":
        paths = [zip_files(tmp_path / "parts.zip", {"good/a.png": paths[0].read_bytes(), "good/readme.md": b"#"})]
    elif case == "broken zip":
        (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
        paths = [tmp_path / "broken.zip"]
    elif case == "empty zip":
        paths = [zip_files(tmp_path / "empty.zip", {"__MACOSX/._a.png": b""})]
    elif case == "mixed aspect ratios":
        paths = paths[:10] + write_images(tmp_path / "wide", 2, size=(128, 96), seed=1)
    elif case == "huge":
        monkeypatch.setattr(app.sys.modules["detector"], "MAX_PIXELS", 1000)
    with pytest.raises(fitting.UploadError, match=message):
        fitting.read_good_images(paths, app.decode)


def test_a_fit_keeps_the_uploads_aspect_ratio(app, tmp_path):
    """4:3 photos fit a 4:3 model at about the chosen pixel count (padim_hf's auto size), not a squashed square."""
    images = app.fitting.read_good_images(write_images(tmp_path / "wide", 10, size=(128, 96)), app.decode)
    detector = app.fitting.fit_detector(images, 128)
    height, width = detector.config.image_size
    assert width > height and abs(width / height - 4 / 3) < 0.1 and abs(height * width / 128**2 - 1) < 0.2
    assert detector.config.image_threshold is not None and detector.config.calibration["num_images"] >= 5


def test_a_zip_member_is_never_read_past_its_declared_size(app, tmp_path, monkeypatch):
    """A zip whose directory under-states a member's size (a zip bomb's trick) cannot make the Space inflate more
    than MAX_IMAGE_BYTES: the member is read up to the declared size, then fails to decode."""
    import zipfile

    fitting = app.fitting
    archive = zip_files(tmp_path / "bomb.zip", {"a.png": b"\0" * 5_000_000})
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("a.png")
    info.file_size = 100  # what a lying directory entry would say
    with pytest.raises(fitting.UploadError, match=r"bomb.zip: a.png is damaged \(Bad CRC-32"):
        fitting.read_member(archive, info, "bomb.zip: a.png")


def test_sessions_keep_their_files_apart_and_delete_them_at_the_end(app, tmp_path):
    sessions = app.fitting.Sessions(tmp_path / "sessions")
    upload_a, shared, upload_b = (tmp_path / "gradio" / name / "a.png" for name in ("h1", "h2", "h3"))
    for path in (upload_a, shared, upload_b):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"png")
    first, second = sessions.get("session-a"), sessions.get("session-b/../../etc")
    assert first.folder != second.folder and second.folder.parent == tmp_path / "sessions"  # hashed names only
    sessions.add_uploads("session-a", [upload_a, shared])
    sessions.add_uploads("session-b/../../etc", [shared, upload_b])
    (first.folder / "model.zip").write_bytes(b"zip")
    sessions.end("session-a")
    assert not first.folder.exists() and not upload_a.exists() and not upload_a.parent.exists()
    assert shared.exists() and upload_b.exists() and second.folder.exists()  # still held by the other session
    sessions.end("session-b/../../etc")
    assert not shared.exists() and not upload_b.exists() and not second.folder.exists() and len(sessions) == 0


def test_push_never_falls_back_to_the_spaces_own_token(app, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "the-space-owners-token")
    for token in ("", None):
        with pytest.raises(app.fitting.UploadError, match="sign in with Hugging Face first"):
            app.fitting.push_to_hub(model_dir, "padim-detector", "alice", token, private=True)
    with pytest.raises(app.fitting.UploadError, match="is not a repository name"):
        app.fitting.push_to_hub(model_dir, "../etc", "alice", "user-token", private=True)


def test_one_fit_per_cpu_core(app, monkeypatch):
    import gradio as gr

    cpus = len(os.sched_getaffinity(0))
    assert app.fitting.available_cpus() <= cpus
    fit_event = next(fn for fn in app.demo.fns.values() if fn.api_name == "fit")
    assert fit_event.concurrency_limit == app.FIT_SLOTS == app.fitting.available_cpus()
    assert isinstance(app.demo, gr.Blocks)


# --- python app.py, as a duplicated Space runs it -------------------------------------------------------------------


def artefacts(name: str) -> Path:
    """Where a browser test leaves its screenshots (gitignored; CI keeps them with the run)."""
    folder = Path(os.environ.get("PADIM_TEST_ARTEFACTS", REPO_ROOT / "test-artefacts")) / "space" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_app(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str, float]:
    """`python app.py` in spaces/ with `env` added; returns the process, its URL and the seconds it took to serve."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key not in ("PADIM_MODEL", "HF_HUB_OFFLINE")}
    environment.update(
        GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"), **env,
    )
    log = tmp_path / "app.log"
    started = time.monotonic()
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=SPACE_DIR, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
    deadline = started + 240
    while True:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.terminate()
            raise AssertionError(f"app.py did not start: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.25)
    return process, f"http://127.0.0.1:{port}/", time.monotonic() - started


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.mark.slow
def test_duplicated_space_starts_with_a_working_example(tmp_path):
    """A Space duplicated as it is has no PADIM_MODEL: `python app.py` fits the example detector and serves it."""
    from playwright.sync_api import expect

    require_chromium()
    shots = artefacts("duplicated")
    process, url, startup = start_app(tmp_path)
    try:
        print(f"python app.py served after {startup:.1f} s (example detector fitted at start-up)")
        for page in open_page(url):
            info = page.locator("#model-info")
            expect(info).to_contain_text("example: synthetic fabric")
            expect(info).to_contain_text("held-out")  # the library's calibration, described
            page.screenshot(path=str(shots / "1-start.png"), full_page=True)
            examples, verdict = page.locator("#examples .gallery-item"), page.locator("#verdict textarea")
            expect(examples).to_have_count(5)  # sorted: good_1, good_2, hole, scratch, stain
            for index, expected in ((0, "^Normal"), (1, "^Normal"), (2, "^Anomalous"), (3, "^Anomalous"), (4, "^Anomalous")):
                shown = verdict.input_value()
                examples.nth(index).click()
                expect(verdict).not_to_have_value(shown, timeout=60_000)  # this example's answer (the score differs)
                expect(verdict).to_have_value(re.compile(expected))
                page.screenshot(path=str(shots / f"2-example-{index}.png"), full_page=True)
            expect(page.locator("#overlay img")).to_be_visible()
    finally:
        stop_app(process)
    assert "fitted the example detector" in (tmp_path / "app.log").read_text()


# --- the HTTP API, through gradio_client --------------------------------------------------------------------------


@pytest.mark.slow
def test_client_gets_heatmap_mask_score_and_verdict(app, server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    thresholds = app.DETECTOR.thresholds()
    overlay, mask, score, verdict = client.predict(
        handle_file(str(EXAMPLES / "scratch.png")), thresholds.image, thresholds.pixel, api_name="/analyse"
    )
    expected = analyse(app, EXAMPLES / "scratch.png")
    assert score == pytest.approx(expected.score, abs=0.01)
    assert verdict == expected.verdict and verdict.startswith("Anomalous")
    served_mask = np.asarray(PIL.Image.open(mask))
    assert served_mask.shape == expected.mask.shape and np.array_equal(served_mask > 127, expected.mask > 0)
    assert np.asarray(PIL.Image.open(overlay).convert("RGB")).shape == expected.overlay.shape


@pytest.mark.slow
def test_twenty_concurrent_requests_all_get_their_own_answer(app, server):
    from gradio_client import Client, handle_file

    names = ["good_1", "good_2", "stain", "scratch", "hole"] * 4
    expected = {name: analyse(app, EXAMPLES / f"{name}.png").score for name in set(names)}
    thresholds = app.DETECTOR.thresholds()

    def ask(name: str):
        client = Client(server, verbose=False)
        return client.predict(
            handle_file(str(EXAMPLES / f"{name}.png")), thresholds.image, thresholds.pixel, api_name="/analyse"
        )

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, names))
    for name, (overlay, mask, score, verdict) in zip(names, answers):
        good = name.startswith("good")
        assert score == pytest.approx(expected[name], abs=0.01), name
        assert verdict.startswith("Normal" if good else "Anomalous"), name
        # Every served file arrives whole (identical outputs of concurrent requests once raced in Gradio's cache).
        assert (np.asarray(PIL.Image.open(mask)) > 0).any() != good, name
        assert PIL.Image.open(overlay).size[0] > 500, name


@pytest.mark.slow
def test_client_bad_upload_gets_a_message_not_a_traceback(server, text_file_named_png):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="not_really.png is not an image") as caught:
        client.predict(handle_file(str(text_file_named_png)), 1.0, 1.0, api_name="/analyse")
    assert "Traceback" not in str(caught.value)


# --- a real browser -----------------------------------------------------------------------------------------------


@pytest.fixture
def page(server):
    yield from open_page(server)


def open_page(url: str):
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            # Not "networkidle": Gradio keeps a heartbeat request open for apps with session state.
            page.goto(url, wait_until="load")
            page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=60_000)
            yield page
        finally:
            browser.close()


@pytest.mark.slow
def test_browser_upload_shows_heatmap_score_and_verdict(app, page, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#model-info")).to_contain_text("tf_efficientnet_lite0")
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLES / "hole.png"))
    verdict = page.locator("#verdict textarea")
    expect(verdict).to_have_value(re.compile("^Anomalous"), timeout=60_000)
    score = float(page.locator("#score input").input_value())
    assert score == pytest.approx(analyse(app, EXAMPLES / "hole.png").score, abs=0.01)
    heatmap = page.locator("#overlay img")
    expect(heatmap).to_be_visible()
    width = heatmap.evaluate("img => img.naturalWidth")
    assert width == analyse(app, EXAMPLES / "hole.png").overlay.shape[1]
    expect(page.locator("#mask img")).to_be_visible()
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    assert (tmp_path / "space.png").stat().st_size > 20_000


@pytest.mark.slow
def test_browser_examples_are_analysed_when_picked(app, page):
    from playwright.sync_api import expect

    examples = page.locator("#examples .gallery-item")
    expect(examples).to_have_count(5)  # sorted: good_1, good_2, hole, scratch, stain
    verdict = page.locator("#verdict textarea")
    examples.nth(0).click()
    expect(verdict).to_have_value(re.compile("^Normal"), timeout=60_000)
    assert float(page.locator("#score input").input_value()) == pytest.approx(
        analyse(app, EXAMPLES / "good_1.png").score, abs=0.01
    )
    examples.nth(4).click()
    expect(verdict).to_have_value(re.compile("^Anomalous"), timeout=60_000)
    assert float(page.locator("#score input").input_value()) == pytest.approx(
        analyse(app, EXAMPLES / "stain.png").score, abs=0.01
    )


@pytest.mark.slow
def test_browser_bad_upload_shows_an_error_message(page, text_file_named_png, tmp_path):
    from playwright.sync_api import expect

    page.locator("#input-image input[type=file]").set_input_files(str(text_file_named_png))
    message = page.get_by_text("not_really.png is not an image")
    expect(message.first).to_be_visible(timeout=60_000)
    assert page.get_by_text("Traceback").count() == 0
    page.wait_for_timeout(500)  # let the toast finish fading in before the screenshot
    page.screenshot(path=str(tmp_path / "space-error.png"), full_page=True)


@pytest.mark.slow
def test_browser_sliders_grow_past_a_high_score(app, model_dir, tmp_path):
    from playwright.sync_api import expect

    require_chromium()
    low = Path(shutil.copytree(model_dir, tmp_path / "low-threshold"))
    config = json.loads((low / "config.json").read_text())
    config["image_threshold"] = config["pixel_threshold"] = 1.0  # far below a defect's score
    (low / "config.json").write_text(json.dumps(config))
    detector = app.Detector.load(low)
    demo = app.build_demo(app.Space(detector, root=tmp_path / "sessions"))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        for page in open_page(f"http://127.0.0.1:{port}/"):
            slider = page.locator("#image-threshold input[type=range]")
            first_top = float(slider.get_attribute("max"))
            assert first_top == app.slider_maximum(detector.thresholds()) == 3.0
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLES / "hole.png"))
            expect(page.locator("#verdict textarea")).to_have_value(re.compile("^Anomalous"), timeout=60_000)
            score = float(page.locator("#score input").input_value())
            assert score > first_top  # the situation the widening is for
            page.wait_for_function(
                "([selector, top]) => parseFloat(document.querySelector(selector).max) !== top",
                arg=["#image-threshold input[type=range]", first_top],
                timeout=10_000,
            )
            assert float(slider.get_attribute("max")) == app.widened_maximum(score, first_top)
    finally:
        demo.close()


@pytest.mark.slow
def test_browser_model_without_thresholds_hides_the_sliders(app, uncalibrated_model_dir, tmp_path):
    from playwright.sync_api import expect

    require_chromium()
    demo = app.build_demo(app.Space(app.Detector.load(uncalibrated_model_dir), root=tmp_path / "sessions"))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        for page in open_page(f"http://127.0.0.1:{port}/"):
            expect(page.locator("#model-info")).to_contain_text("No threshold")
            expect(page.locator("#image-threshold")).to_be_hidden()
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLES / "hole.png"))
            expect(page.locator("#verdict textarea")).to_have_value(re.compile("^No verdict"), timeout=60_000)
            page.screenshot(path=str(artefacts("no-threshold") / "no-verdict.png"), full_page=True)
    finally:
        demo.close()


# --- fitting in the browser ---------------------------------------------------------------------------------------


def choose_fit_files(page, files: list[Path], size: str = "128 px") -> None:
    """Opens the Fit tab, uploads `files` and picks the input size (the Fit button is left to the caller)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Fit your own detector").click()
    page.locator("#fit-files input[type=file]").set_input_files([str(path) for path in files])
    expect(page.locator("#fit-files tbody tr")).to_have_count(len(files), timeout=30_000)  # uploaded
    page.get_by_label(size).check()


def analyse_in_browser(page, image: Path) -> tuple[float, str]:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Inspect").click()
    verdict = page.locator("#verdict textarea")
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    expect(verdict).to_have_value(re.compile("^(Normal|Anomalous)"), timeout=60_000)
    return float(page.locator("#score input").input_value()), verdict.input_value()


def defect_file(folder: Path, kind: str = "hole", size: int = 96) -> Path:
    image, _ = synthetic.add_defect(synthetic.fabric(4242, size=size, noise=0.02), kind, seed=17)
    folder.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image).save(folder / f"{kind}.png")
    return folder / f"{kind}.png"


def made_files() -> set[Path]:
    """Model zips and heatmaps in Gradio's upload folder (where the Space's session folders live)."""
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder())
    return {*root.rglob("padim-model.zip"), *root.rglob("heatmap-*.png")}


def fitted_sessions(app, demo=None) -> dict:
    return {key: s for key, s in (demo or app.demo).space.sessions.snapshot().items() if s.detector is not None}


@pytest.mark.slow
def test_browser_fit_inspect_and_download(app, server, tmp_path):
    """Upload good images, fit, read the held-out calibration, analyse a defective part, download the model."""
    import zipfile

    from padim_hf.calibration import describe_calibration

    from playwright.sync_api import expect

    shots = artefacts("fit")
    before = set(fitted_sessions(app))
    for page in open_page(server):
        choose_fit_files(page, write_images(tmp_path / "good", 10))
        page.screenshot(path=str(shots / "1-uploaded.png"), full_page=True)
        page.locator("#fit-button").click()
        result = page.locator("#fit-result")
        expect(result).to_contain_text("Fitted on 10 good images at 128 x 128 px", timeout=120_000)
        (session,) = [s for key, s in fitted_sessions(app).items() if key not in before]
        config = session.detector.config
        assert config.num_train_images == 10 and config.input_size in (128, (128, 128), [128, 128])
        assert config.calibration["num_images"] >= 1 and config.image_threshold is not None
        expect(result).to_contain_text(describe_calibration(config))  # the library's own words
        page.screenshot(path=str(shots / "2-fitted.png"), full_page=True)

        with page.expect_download() as download:
            page.locator("#download").click()
        download.value.save_as(tmp_path / "model.zip")
        with zipfile.ZipFile(tmp_path / "model.zip") as archive:
            archive.extractall(tmp_path / "unzipped")
        downloaded = PadimModel.from_pretrained(tmp_path / "unzipped" / "model").eval()
        assert downloaded.config.image_threshold == pytest.approx(config.image_threshold)

        defect = defect_file(tmp_path / "test")
        expect(page.locator("#model-info")).to_contain_text("fitted in this session")
        score, verdict = analyse_in_browser(page, defect)
        page.screenshot(path=str(shots / "3-defect.png"), full_page=True)
        processor = PadimImageProcessor.from_pretrained(tmp_path / "unzipped" / "model")
        with torch.no_grad():
            expected = downloaded(**processor(PIL.Image.open(defect), return_tensors="pt")).pred_score.item()
        assert score == pytest.approx(expected, abs=0.01)  # the session's model is the one downloaded
        assert verdict.startswith("Anomalous") and expected >= config.image_threshold
        expect(page.locator("#overlay img")).to_be_visible()
        expect(page.locator("#mask img")).to_be_visible()


@pytest.mark.slow
def test_browser_refused_uploads_say_why(server, tmp_path):
    from playwright.sync_api import expect

    shots = artefacts("refused")
    (tmp_path / "notes.txt").write_text("batch 7")
    cases = {
        "few": (write_images(tmp_path / "few", 3), "3 images uploaded; a fit needs at least 10 good images"),
        "text": ([*write_images(tmp_path / "text", 10), tmp_path / "notes.txt"], "notes.txt is not an image"),
        "shapes": (
            write_images(tmp_path / "square", 10) + write_images(tmp_path / "wide", 1, size=(128, 96), seed=3),
            "mixed aspect ratios",
        ),
    }
    for page in open_page(server):
        for name, (files, message) in cases.items():
            choose_fit_files(page, files)
            page.locator("#fit-button").click()
            expect(page.get_by_text(message).first).to_be_visible(timeout=60_000)
            page.wait_for_timeout(300)  # let the toast fade in before the screenshot
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            assert page.get_by_text("Traceback").count() == 0
            page.reload(wait_until="load")  # a fresh page for the next case
            page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=60_000)


@pytest.mark.slow
def test_two_sessions_fitting_at_once_get_their_own_models(app, server, tmp_path):
    """Two browsers fit different products at the same time: each analyses with its own model, sees only its own
    files, and what a session uploaded and made is deleted when its tab closes."""
    from playwright.sync_api import expect, sync_playwright

    require_chromium()
    shots = artefacts("two-sessions")
    data = {10: write_images(tmp_path / "fabric", 10, kind="fabric"), 12: write_images(tmp_path / "grey", 12, kind="texture")}
    defect = defect_file(tmp_path / "test")
    before = set(fitted_sessions(app))
    made_before = made_files()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pages = {}
            for count in data:  # separate browser contexts: separate cookies and sessions, like two users
                page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
                page.goto(server, wait_until="load")
                page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=60_000)
                choose_fit_files(page, data[count])
                pages[count] = page
            for page in pages.values():
                page.locator("#fit-button").click()
            for count, page in pages.items():
                expect(page.locator("#fit-result")).to_contain_text(f"Fitted on {count} good images", timeout=180_000)
                page.screenshot(path=str(shots / f"fitted-{count}.png"), full_page=True)
            sessions = {s.detector.config.num_train_images: s for k, s in fitted_sessions(app).items() if k not in before}
            assert sorted(sessions) == [10, 12]
            for count, session in sessions.items():
                mine = {path.name for path in data[count]}
                assert {path.name for path in session.uploads} == mine  # its own uploads, nobody else's
                expected = session.detector.predict(PIL.Image.open(defect).convert("RGB"))[1]
                score, _ = analyse_in_browser(pages[count], defect)
                assert score == pytest.approx(expected, abs=0.01), count
                expect(pages[count].locator("#model-info")).to_contain_text(f"({count} defect-free images)")
            assert abs(sessions[10].detector.predict(PIL.Image.open(defect).convert("RGB"))[1] - score) > 0.1
            for session in sessions.values():
                assert session.folder.exists() and all(path.exists() for path in session.uploads)
            pages[10].close()  # the first user closes the tab: their session ends
            deadline = time.monotonic() + 60
            # The same defect image went through both sessions: the same bytes and name are one upload file, which
            # stays while the other session holds it.
            own = sessions[10].uploads - sessions[12].uploads
            assert {path.name for path in own} == {path.name for path in data[10]}
            while (sessions[10].folder.exists() or any(path.exists() for path in own)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not sessions[10].folder.exists() and not any(path.exists() for path in own)
            assert sessions[12].folder.exists() and all(path.exists() for path in sessions[12].uploads)
            # Nothing the sessions made was copied elsewhere by Gradio: every model zip and heatmap made during this
            # test that is still on disk lies in a live session's folder (Gradio serves its upload folder as it is).
            live = {session.folder for session in app.demo.space.sessions.snapshot().values()}
            made = made_files() - made_before
            assert made and all(path.parent in live for path in made), made
        finally:
            browser.close()


@pytest.mark.slow
def test_queue_says_where_you_are_while_another_fit_runs(app, monkeypatch, tmp_path):
    """With one fit slot, a second user's fit waits, and the page shows its place in the queue."""
    import threading

    from playwright.sync_api import expect, sync_playwright

    require_chromium()
    shots = artefacts("queue")
    release, fit_detector = threading.Event(), app.fitting.fit_detector

    def slow_fit(*args, **kwargs):  # the first fit holds its slot until the second user has seen the queue
        release.wait(timeout=120)
        return fit_detector(*args, **kwargs)

    monkeypatch.setattr(app.fitting, "fit_detector", slow_fit)
    demo = app.build_demo(app.Space(app.DETECTOR, fit_slots=1, root=tmp_path / "sessions"))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                first, second = (browser.new_context().new_page() for _ in range(2))
                for page, seed in ((first, 0), (second, 1)):
                    page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                    page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=60_000)
                    choose_fit_files(page, write_images(tmp_path / f"good{seed}", 10, seed=seed))
                first.locator("#fit-button").click()
                first.wait_for_timeout(500)
                second.locator("#fit-button").click()
                expect(second.locator("#fit-result").get_by_text(re.compile(r"queue: 1/1"))).to_be_visible(timeout=30_000)
                second.screenshot(path=str(shots / "waiting.png"), full_page=True)
                release.set()
                for page in (first, second):
                    expect(page.locator("#fit-result")).to_contain_text("Fitted on 10 good images", timeout=120_000)
            finally:
                browser.close()
    finally:
        release.set()
        demo.close()


@pytest.mark.slow
def test_browser_fit_shows_padim_hfs_progress_bar(app, monkeypatch, tmp_path):
    """The Fit button's progress bar is fit_padim's own (tqdm, tracked by Gradio), with the image count as its total.
    The second batch is slowed down here so that the page can be looked at mid-fit."""
    from playwright.sync_api import expect

    require_chromium()

    import padim_hf.fit

    collate, batches = padim_hf.fit._FitCollator.__call__, []

    def slow_second_batch(self, rows):  # images 17-20 take 4 s to prepare: the bar stands at 16/20 meanwhile
        batches.append(len(rows))
        if len(batches) == 2:
            time.sleep(4.0)
        return collate(self, rows)

    monkeypatch.setattr(padim_hf.fit._FitCollator, "__call__", slow_second_batch)
    demo = app.build_demo(app.Space(app.DETECTOR, root=tmp_path / "sessions"))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        for page in open_page(f"http://127.0.0.1:{port}/"):
            choose_fit_files(page, write_images(tmp_path / "good", 20))
            page.locator("#fit-button").click()
            expect(page.locator("#fit-result")).to_contain_text(re.compile(r"16/20 img.*fit \[cpu\] - 80\.0%", re.S), timeout=60_000)
            page.screenshot(path=str(artefacts("progress") / "fitting.png"), full_page=True)
            expect(page.locator("#fit-result")).to_contain_text("Fitted on 20 good images", timeout=120_000)
    finally:
        demo.close()


@pytest.mark.slow
def test_push_goes_to_the_signed_in_users_account_with_their_token_only(model_dir, tmp_path):
    """The Space process holds its owner's HF_TOKEN; a user signs in (OAuth against a loopback provider), fits and
    pushes: the loopback Hub sees the user's token on every request, and the owner's on none."""
    from playwright.sync_api import expect

    from .hub_server import serve as serve_hub
    from .oauth_server import User
    from .oauth_server import serve as serve_oauth

    require_chromium()
    shots = artefacts("push")
    owner_token, user_token = "hf_space_owner_write_token", "hf_alice_oauth_token"
    hub = serve_hub(tmp_path / "hub", {owner_token: "space-owner", user_token: "alice"})
    provider = serve_oauth(User("alice", user_token))
    process, url, _ = start_app(
        tmp_path,
        PADIM_MODEL=str(model_dir),  # a configured model: no example to fit at start-up
        HF_TOKEN=owner_token,  # valid on this Hub: a push that fell back to it would succeed, as the owner
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),
        SYSTEM="spaces",  # with SPACE_ID: what tells Gradio it runs on a Space (gradio.utils.get_space)
        SPACE_ID="space-owner/padim-space",
        **provider.space_environment(),
    )
    try:
        for page in open_page(url):
            page.get_by_role("tab", name="Fit your own detector").click()
            page.screenshot(path=str(shots / "1-signed-out.png"), full_page=True)
            page.locator("#login").click()  # to the provider and back: the page reloads
            deadline = time.monotonic() + 60
            while not provider.state.tokens_issued and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            page.wait_for_load_state("load")
            page.locator("#input-image input[type=file]").wait_for(state="attached", timeout=60_000)
            page.get_by_role("tab", name="Fit your own detector").click()
            expect(page.locator("#login")).to_contain_text("Logout (alice)", timeout=60_000)
            page.screenshot(path=str(shots / "2-signed-in.png"), full_page=True)
            choose_fit_files(page, write_images(tmp_path / "good", 10))
            page.locator("#fit-button").click()
            expect(page.locator("#fit-result")).to_contain_text("Fitted on 10 good images", timeout=120_000)
            page.locator("#push-repo").get_by_role("textbox").fill("fabric-detector")
            page.locator("#push-button").click()
            expect(page.locator("#push-result")).to_contain_text("Pushed", timeout=120_000)
            page.screenshot(path=str(shots / "3-pushed.png"), full_page=True)
    finally:
        stop_app(process)
        provider.close()
    try:
        assert provider.state.tokens_issued == [user_token]
        repo = hub.state.repos["alice/fabric-detector"]
        assert repo.private  # the checkbox's default
        files = repo.commits[repo.branches["main"]]
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
        sent = {header for header in hub.state.authorizations if header}
        assert sent == {f"Bearer {user_token}"}, sent
        assert not any(repo_id.startswith("space-owner/") for repo_id in hub.state.repos)
    finally:
        hub.close()


def test_padim_revision_pins_the_model_commit(app, model_dir, hub_env, monkeypatch, tmp_path):
    import json
    import shutil

    from padim_hf.hub import push_model_commit

    first = push_model_commit(model_dir, "tester/space-pinned")
    changed = Path(shutil.copytree(model_dir, tmp_path / "changed"))
    config = json.loads((changed / "config.json").read_text())
    config["image_threshold"] = 123.0
    (changed / "config.json").write_text(json.dumps(config))
    push_model_commit(changed, "tester/space-pinned")
    monkeypatch.setenv("PADIM_MODEL", "tester/space-pinned")
    monkeypatch.setenv("PADIM_REVISION", first.oid)
    pinned, message = app.startup_detector()
    assert pinned is not None, message
    assert pinned.config.image_threshold == pytest.approx(app.DETECTOR.config.image_threshold)
    assert first.oid in app.model_card_markdown(pinned)
    monkeypatch.delenv("PADIM_REVISION")
    latest, message = app.startup_detector()
    assert latest.config.image_threshold == 123.0


def test_space_precision_variable_runs_the_openvino_export_in_bfloat16(app, model_dir, tmp_path, monkeypatch):
    import openvino

    from padim_hf.export import export

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 units: OpenVINO cannot run bfloat16 here")
    exported = tmp_path / "model"
    shutil.copytree(model_dir, exported)
    export(exported, exported / "openvino", "openvino")
    monkeypatch.setenv("PADIM_PRECISION", "bfloat16")
    detector, message = app.load_detector(str(exported), engine="openvino")
    assert message == "" and detector.runtime.engine == "openvino" and detector.runtime.precision == "bfloat16"
    image = PIL.Image.fromarray(defect_image("scratch")[0])
    score, expected = detector.predict(image)[1], app.Detector.load(exported).predict(image)[1]
    assert 1e-4 * expected < abs(score - expected) <= 0.02 * expected  # bfloat16 really ran (float32: ~1e-6)
    detector, message = app.load_detector(str(exported), engine="torch")
    assert detector is None and "PADIM_PRECISION='bfloat16' needs PADIM_ENGINE=openvino" in message


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_space_runs_the_exported_model(app, model_dir, engine, tmp_path):
    from padim_hf.export import export

    exported = tmp_path / "model"
    shutil.copytree(model_dir, exported)
    export(exported, exported / ("onnx" if engine == "onnxruntime" else "openvino"), "onnx" if engine == "onnxruntime" else "openvino")
    torch_detector = app.Detector.load(exported)
    detector, message = app.load_detector(str(exported), engine=engine)
    assert message == "" and detector.model is None and detector.runtime.engine == engine
    assert detector.config.image_threshold == torch_detector.config.image_threshold
    image = PIL.Image.fromarray(defect_image("scratch")[0])
    anomaly_map, score = detector.predict(image)
    expected_map, expected_score = torch_detector.predict(image)
    assert anomaly_map.shape == expected_map.shape == (image.height, image.width)
    assert abs(score - expected_score) <= 1e-4 * expected_score
    assert np.abs(anomaly_map - expected_map).max() <= 1e-4 * np.abs(expected_map).max()
