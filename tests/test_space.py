"""The Gradio Space (spaces/app.py): the analysis function, the HTTP API through gradio_client, and a real browser.

The model is a small real one: ImageNet EfficientNet-Lite0 (offline weights) fitted on 8 synthetic fabric images,
its thresholds calibrated on held-out synthetic images, saved with its remote code and loaded by the app through
`PADIM_MODEL`, exactly as a Space loads a Hub repo.
"""

import importlib.util
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
def app(model_dir):
    """spaces/app.py imported the way `python app.py` runs it, with PADIM_MODEL pointing at the test model."""
    previous = os.environ.get("PADIM_MODEL")
    os.environ["PADIM_MODEL"] = str(model_dir)
    try:
        module = load_module(SPACE_DIR / "app.py", "padim_space_app")
    finally:
        if previous is None:
            os.environ.pop("PADIM_MODEL")
        else:
            os.environ["PADIM_MODEL"] = previous
    assert module.DETECTOR is not None, module.LOAD_MESSAGE
    return module


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
    good = app.analyse(synthetic.fabric(900))
    image, truth = defect_image(kind, seed=5)
    result = app.analyse(image)
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
    result = app.analyse(EXAMPLES / "stain.png")
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
    result = app.analyse(image)
    assert result.mask.shape == shape
    assert max(result.overlay.shape[:2]) <= 800 and min(result.overlay.shape[:2]) >= 150


def test_thresholds_move_the_mask_and_the_verdict(app):
    image, _ = defect_image("stain", seed=1)
    default = app.analyse(image)
    strict = app.analyse(image, image_threshold=default.score * 1.1, pixel_threshold=default.score * 0.9)
    lax = app.analyse(image, pixel_threshold=app.DETECTOR.thresholds().pixel * 0.8)
    assert strict.score == pytest.approx(default.score)
    assert default.verdict.startswith("Anomalous") and strict.verdict.startswith("Normal")
    assert 0 < (strict.mask > 0).sum() < (default.mask > 0).sum() < (lax.mask > 0).sum()
    assert f"{default.score:.2f}" in default.verdict


def test_grayscale_rgba_and_16_bit_images_give_the_rgb_result(app, tmp_path):
    rgb = synthetic.fabric(901)
    gray = np.asarray(PIL.Image.fromarray(rgb).convert("L"))
    reference_gray = app.analyse(np.repeat(gray[..., None], 3, axis=-1)).score
    assert app.analyse(gray).score == pytest.approx(reference_gray, rel=1e-4)
    PIL.Image.fromarray(gray).save(tmp_path / "gray.png")
    assert app.analyse(tmp_path / "gray.png").score == pytest.approx(reference_gray, rel=1e-4)
    PIL.Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert app.analyse(tmp_path / "gray16.png").score == pytest.approx(reference_gray, rel=1e-3)

    reference = app.analyse(rgb).score
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    PIL.Image.fromarray(opaque).save(tmp_path / "rgba.png")
    assert app.analyse(tmp_path / "rgba.png").score == pytest.approx(reference, rel=1e-4)
    # A transparent hole shows white (composited like the image processor does): an anomaly on fabric.
    holed = opaque.copy()
    holed[50:70, 50:70, 3] = 0
    assert app.analyse(holed).score > app.DETECTOR.thresholds().image > reference


def test_exif_rotation_is_applied(app, tmp_path):
    image, truth = defect_image("scratch", seed=3)
    stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(image[:, :96])))  # 96 x 128 stored sideways ...
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # ... with "rotate 90 degrees clockwise to view" as its EXIF orientation
    stored.save(tmp_path / "rotated.png", exif=exif)
    result = app.analyse(tmp_path / "rotated.png")
    assert result.mask.shape == (128, 96)
    assert (result.mask > 0)[truth[:, :96]].mean() > 0.9


def test_huge_image_is_downscaled_before_analysis(app, tmp_path):
    image, truth = defect_image("hole", seed=2)
    huge = np.asarray(PIL.Image.fromarray(image).resize((6000, 4800), PIL.Image.Resampling.NEAREST))
    path = tmp_path / "huge.png"
    PIL.Image.fromarray(huge).save(path, compress_level=1)
    result = app.analyse(path)
    assert result.mask.shape == (app.MAX_SIDE * 4 // 5, app.MAX_SIDE)  # aspect ratio kept
    assert result.verdict.startswith("Anomalous")
    assert result.score == pytest.approx(app.analyse(image).score, rel=0.1)


def test_images_over_the_pixel_limit_are_refused_with_a_message(app, monkeypatch, tmp_path):
    PIL.Image.fromarray(synthetic.fabric(1)).save(tmp_path / "big.png")
    monkeypatch.setattr(app, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ValueError, match=r"128x128 pixels; images up to"):
        app.analyse(tmp_path / "big.png")


def test_non_images_are_refused_with_a_message(app, text_file_named_png):
    import gradio as gr

    with pytest.raises(ValueError, match="not_really.png is not an image"):
        app.analyse(text_file_named_png)
    with pytest.raises(gr.Error, match="not an image"):
        app.predict(str(text_file_named_png), 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        app.analyse(np.zeros((4, 4, 2), np.uint8))


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


def test_uncalibrated_model_starts_at_a_stated_default(app, uncalibrated_model_dir):
    from scipy.stats import chi2

    detector = app.Detector.load(uncalibrated_model_dir)
    thresholds = detector.thresholds()
    assert not thresholds.calibrated
    assert thresholds.image == thresholds.pixel == pytest.approx(np.sqrt(chi2.ppf(0.999, 50)), rel=0.01)
    text = app.model_card_markdown(detector)
    assert "Uncalibrated model" in text and f"{thresholds.image:.2f}" in text
    result = app.analyse(EXAMPLES / "good_1.png", detector=detector)
    assert result.score > thresholds.image  # why the panel warns: real scores run higher than the Gaussian bound
    assert app.slider_maximum(thresholds) > result.score


def test_sliders_grow_to_leave_room_above_every_score(app):
    assert app.widened_maximum(None, 100.0) is None
    assert app.widened_maximum(50.0, 100.0) is None
    assert app.widened_maximum(90.0, 100.0) == 180.0
    assert app.widened_maximum(799.53, 280.0) == 1600.0
    image_update, pixel_update, top = app.widen_sliders(799.53, 280.0)
    assert image_update["maximum"] == pixel_update["maximum"] == top == 1600.0
    assert app.widen_sliders(10.0, 280.0)[2] == 280.0


def test_without_a_model_the_app_says_how_to_make_one(app, tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setattr(app, "DEFAULT_LOCAL_MODEL", tmp_path / "padim-demo" / "model")
    detector, message = app.load_detector(str(tmp_path / "padim-demo" / "model"))
    assert detector is None and "padim-hf demo" in message and "PADIM_MODEL" in message
    monkeypatch.setenv("SPACE_ID", "someone/padim-space")
    detector, message = app.load_detector(str(tmp_path / "padim-demo" / "model"))
    assert detector is None and "set the Space variable `PADIM_MODEL`" in message
    monkeypatch.delenv("SPACE_ID")
    detector, message = app.load_detector(str(tmp_path / "elsewhere"))
    assert detector is None and "Could not load the model" in message and "padim-hf demo" in message
    monkeypatch.setattr(app, "DETECTOR", None)
    monkeypatch.setattr(app, "LOAD_MESSAGE", message)
    with pytest.raises(gr.Error, match="padim-hf demo"):
        app.predict(str(EXAMPLES / "good_1.png"), 1.0, 1.0)
    blocks = app.build_demo(None, message)
    markdown = [block.value for block in blocks.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("No model loaded" in text and "padim-hf demo" in text for text in markdown)


def test_default_model_is_padim_demo_in_the_repository(app, monkeypatch):
    monkeypatch.delenv("PADIM_MODEL", raising=False)
    assert Path(app.model_source()) == REPO_ROOT / "padim-demo" / "model"
    monkeypatch.setenv("PADIM_MODEL", "someone/fabric-padim")
    assert app.model_source() == "someone/fabric-padim"


def test_space_metadata_is_deployable():
    import gradio

    import yaml

    readme = (SPACE_DIR / "README.md").read_text()
    assert readme.startswith("---\n")
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert front_matter["sdk"] == "gradio" and front_matter["sdk_version"] == gradio.__version__
    assert front_matter["app_file"] == "app.py" and (SPACE_DIR / front_matter["app_file"]).is_file()
    assert front_matter["models"] and len(front_matter["short_description"]) <= 60  # the Hub's limit
    lines = (SPACE_DIR / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    packages = {re.split(r"[<>=!~\[ ;]", requirement)[0].lower() for requirement in requirements}
    assert not any(name.startswith(("gradio", "padim")) for name in packages)  # gradio comes from sdk_version
    # What the model's remote code and the app import.
    assert {"torch", "torchvision", "timm", "transformers", "huggingface_hub", "matplotlib", "pillow"} <= packages


@pytest.mark.slow
def test_python_app_py_serves_with_only_the_model_repo(app, model_dir, tmp_path):
    """What a Space runs: `python app.py`, with no padim_hf (hidden here), the model through trust_remote_code."""
    from gradio_client import Client, handle_file

    shadow = tmp_path / "shadow" / "padim_hf"
    shadow.mkdir(parents=True)
    marker = tmp_path / "padim_hf-was-imported"
    (shadow / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('padim_hf is hidden: a Space does not have it')\n"
    )
    port = free_port()
    env = dict(
        os.environ,
        PADIM_MODEL=str(model_dir),
        PYTHONPATH=str(shadow.parent),
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
    )
    log = tmp_path / "app.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py"], cwd=SPACE_DIR, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"app.py exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"app.py did not start: {log.read_text()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        # The slider's top (the API checks ranges): above the hole's score, so the verdict shows it was used.
        top = app.slider_maximum(app.DETECTOR.thresholds())
        _, _, score, verdict = client.predict(handle_file(str(EXAMPLES / "hole.png")), top, top, api_name="/analyse")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert not marker.exists(), "app.py tried to import padim_hf"
    processor = PadimImageProcessor.from_pretrained(model_dir)
    model = PadimModel.from_pretrained(model_dir)
    expected = model(**processor(PIL.Image.open(EXAMPLES / "hole.png"), return_tensors="pt")).pred_score.item()
    assert score == pytest.approx(expected, abs=0.01)
    assert score < top and verdict.startswith("Normal")  # the thresholds sent were used


# --- the HTTP API, through gradio_client --------------------------------------------------------------------------


@pytest.mark.slow
def test_client_gets_heatmap_mask_score_and_verdict(app, server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    thresholds = app.DETECTOR.thresholds()
    overlay, mask, score, verdict = client.predict(
        handle_file(str(EXAMPLES / "scratch.png")), thresholds.image, thresholds.pixel, api_name="/analyse"
    )
    expected = app.analyse(EXAMPLES / "scratch.png")
    assert score == pytest.approx(expected.score, abs=0.01)
    assert verdict == expected.verdict and verdict.startswith("Anomalous")
    served_mask = np.asarray(PIL.Image.open(mask))
    assert served_mask.shape == expected.mask.shape and np.array_equal(served_mask > 127, expected.mask > 0)
    assert np.asarray(PIL.Image.open(overlay).convert("RGB")).shape == expected.overlay.shape


@pytest.mark.slow
def test_twenty_concurrent_requests_all_get_their_own_answer(app, server):
    from gradio_client import Client, handle_file

    names = ["good_1", "good_2", "stain", "scratch", "hole"] * 4
    expected = {name: app.analyse(EXAMPLES / f"{name}.png").score for name in set(names)}
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
    assert score == pytest.approx(app.analyse(EXAMPLES / "hole.png").score, abs=0.01)
    heatmap = page.locator("#overlay img")
    expect(heatmap).to_be_visible()
    width = heatmap.evaluate("img => img.naturalWidth")
    assert width == app.analyse(EXAMPLES / "hole.png").overlay.shape[1]
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
        app.analyse(EXAMPLES / "good_1.png").score, abs=0.01
    )
    examples.nth(4).click()
    expect(verdict).to_have_value(re.compile("^Anomalous"), timeout=60_000)
    assert float(page.locator("#score input").input_value()) == pytest.approx(
        app.analyse(EXAMPLES / "stain.png").score, abs=0.01
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
def test_browser_sliders_grow_past_an_uncalibrated_guess(app, uncalibrated_model_dir):
    from playwright.sync_api import expect

    require_chromium()
    detector = app.Detector.load(uncalibrated_model_dir)
    demo = app.build_demo(detector)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        for page in open_page(f"http://127.0.0.1:{port}/"):
            expect(page.locator("#model-info")).to_contain_text("Uncalibrated model")
            slider = page.locator("#image-threshold input[type=range]")
            first_top = float(slider.get_attribute("max"))
            assert first_top == app.slider_maximum(detector.thresholds())
            page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLES / "hole.png"))
            expect(page.locator("#verdict textarea")).to_have_value(re.compile("^Anomalous"), timeout=60_000)
            score = float(page.locator("#score input").input_value())
            assert score > first_top  # the guess is far below real scores: the situation the widening is for
            page.wait_for_function(
                "([selector, top]) => parseFloat(document.querySelector(selector).max) !== top",
                arg=["#image-threshold input[type=range]", first_top],
                timeout=10_000,
            )
            assert float(slider.get_attribute("max")) == app.widened_maximum(score, first_top)
    finally:
        demo.close()


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
    pinned, message = app.load_detector(app.model_source(), app.model_revision())
    assert pinned is not None, message
    assert pinned.config.image_threshold == pytest.approx(app.DETECTOR.config.image_threshold)
    assert first.oid in app.model_card_markdown(pinned)
    monkeypatch.delenv("PADIM_REVISION")
    latest, message = app.load_detector(app.model_source(), app.model_revision())
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
