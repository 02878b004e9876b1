"""Non-square inputs end to end (issue 18): config and processor geometry, `--image-size HEIGHTxWIDTH` / `auto`, and a
non-square model on real portrait images (cookie, 576 wide x 768 high) through fit, predict, the pipeline, exports,
the torch-free runtime and the Space.
"""

import argparse
import json
import logging
import os

import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import pipeline

from padim_hf import PadimConfig, PadimImageProcessor, PadimModel
from padim_hf.cli import main as cli_main
from padim_hf.data import load_split
from padim_hf.fit import build_model, resolve_auto_image_size, training_split
from padim_hf.image_processing_padim import load_image
from padim_hf.predict import predict_images
from padim_hf.resolution import parse_image_size, parse_size, resolve_image_size, training_image_sizes
from padim_hf.runtime import PadimRuntime
from tests.conftest import SHARED_DATA, require_shared, small_lite0_config
from tests.test_space import SPACE_DIR, load_module

COOKIE = SHARED_DATA / "real_defects" / "cookie"
COOKIE_HEIGHT, COOKIE_WIDTH = 768, 576  # portrait
SIZE = [128, 96]  # the cookie's own 4:3 portrait aspect ratio, HEIGHTxWIDTH


# ---------------------------------------------------------------------------------------------------------------
# Sizes: parsing, config, processor


def test_sizes_parse_as_height_by_width():
    assert parse_size("256") == 256
    assert parse_size("192x256") == [192, 256]
    assert parse_image_size("auto") == "auto" and parse_image_size("AUTO:384") == "auto:384"
    for bad in ("0", "12x", "axb", "1x2x3", "-5", "auto:12x34"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_image_size(bad)


def test_square_configs_keep_an_int_and_non_square_ones_a_height_width_pair(tmp_path):
    square = small_lite0_config(image_size=64, crop_size=56)
    assert square.input_size == (56, 56) and square.resize_size == (64, 64)
    square.save_pretrained(tmp_path / "square")
    stored = json.loads((tmp_path / "square" / "config.json").read_text())
    assert stored["image_size"] == 64 and stored["crop_size"] == 56  # existing checkpoints' format, unchanged

    portrait = small_lite0_config(image_size=(80, 48), crop_size=[64, 48])
    assert portrait.image_size == [80, 48] and portrait.input_size == (64, 48) and portrait.resize_size == (80, 48)
    portrait.save_pretrained(tmp_path / "portrait")
    assert json.loads((tmp_path / "portrait" / "config.json").read_text())["image_size"] == [80, 48]
    assert PadimConfig.from_pretrained(tmp_path / "portrait").input_size == (64, 48)
    processor = PadimImageProcessor.from_padim_config(portrait)
    assert processor.size == {"height": 80, "width": 48} and processor.crop_size == {"height": 64, "width": 48}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=[64]), r"\[height, width\]"),
        (dict(image_size=[64, 0]), "positive"),
        (dict(image_size=[64, 48, 32]), r"\[height, width\]"),
        (dict(image_size=[64, 48], crop_size=[56, 56]), "must fit in image_size"),
    ],
)
def test_invalid_sizes_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_lite0_config(**overrides)


def test_processor_resizes_to_height_by_width_and_maps_come_back_at_each_image_size():
    processor = PadimImageProcessor.from_padim_config(small_lite0_config(image_size=[48, 80]))
    wide = np.zeros((30, 200, 3), np.uint8)
    wide[:, 150:] = 255  # the right quarter is white
    pixel_values = processor([wide], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 48, 80)
    assert pixel_values[0, 0, :, 62:].min() > 0.9 and pixel_values[0, 0, :, :55].max() < -0.9  # not transposed
    maps = torch.zeros(1, 1, 48, 80)
    maps[..., 60:] = 1.0
    (restored,) = processor.post_process_anomaly_maps(maps, [(30, 200)])
    assert restored.shape == (30, 200) and restored[:, 155:].min() == 1 and restored[:, :145].max() == 0


def test_model_grid_and_input_check_follow_height_and_width(lite0_weights):
    model = PadimModel(small_lite0_config(image_size=[72, 100])).load_backbone_weights(lite0_weights)
    assert model.grid_shape == (18, 25) and model.num_positions == 450  # Lite0 stage 1: stride 4
    images = torch.randn(5, 3, 72, 100, generator=torch.Generator().manual_seed(0))
    assert model.embed(images).shape == (5, 24, 18, 25)
    model.fit([images])
    assert model(images).anomaly_map.shape == (5, 1, 72, 100)
    with pytest.raises(ValueError, match=r"\(batch, 3, 72, 100\)"):
        model(images.transpose(2, 3).contiguous())  # (100, 72): the transposed input is refused, not reshaped


# ---------------------------------------------------------------------------------------------------------------
# --image-size auto: the training images' aspect ratio


def test_auto_size_follows_the_training_images_aspect_ratio():
    train = training_split(str(require_shared(COOKIE)), "train")
    sizes = training_image_sizes(train)
    assert list(sizes) == [(COOKIE_WIDTH, COOKIE_HEIGHT)] and len(sizes[(COOKIE_WIDTH, COOKIE_HEIGHT)]) == 31
    # 256 x 256 pixels at 3:4 (width:height), sides multiples of 4 (Lite0 stage 1's stride, the grid's)
    size = resolve_image_size("auto", sizes, 256, "tf_efficientnet_lite0", (1, 2, 3))
    assert size == [296, 220]
    assert resolve_image_size("auto:128", sizes, 256, "tf_efficientnet_lite0", (1, 2, 3)) == [148, 112]
    overrides = resolve_auto_image_size("padim-lite0-offline", train, {"image_size": "auto", "n_features": 8})
    assert overrides == {"image_size": [296, 220], "n_features": 8}


def test_auto_size_refuses_mixed_aspect_ratios_naming_files_and_sizes(tmp_path):
    good = tmp_path / "part" / "train" / "good"
    good.mkdir(parents=True)
    for index, size in enumerate([(120, 90), (120, 90), (90, 120)]):
        PIL.Image.new("RGB", size, (120, 120, 120)).save(good / f"{index}.png")
    (tmp_path / "part" / "test" / "good").mkdir(parents=True)
    PIL.Image.new("RGB", (120, 90)).save(tmp_path / "part" / "test" / "good" / "0.png")
    train = training_split(str(tmp_path / "part"), "train")
    with pytest.raises(ValueError, match=r"120 x 90 \(2 images: 0.png, 1.png\); 90 x 120 \(1 image: 2.png\)"):
        resolve_auto_image_size("padim-lite0-offline", train, {"image_size": "auto"})
    output = tmp_path / "model"
    with pytest.raises(SystemExit):
        cli_main(["fit", "--data", str(tmp_path / "part"), "--image-size", "auto", "--output-dir", str(output)])
    assert not output.exists()


def test_a_size_that_stretches_the_training_images_is_warned_about(caplog):
    train = training_split(str(require_shared(COOKIE)), "train")
    with caplog.at_level(logging.WARNING, logger="padim_hf.resolution"):
        resolve_auto_image_size("padim-lite0-offline", train, {"image_size": [96, 128]})  # landscape for a portrait camera
    assert "576 x 768 (width x height)" in caplog.text and "stretched 1.78x" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="padim_hf.resolution"):
        resolve_auto_image_size("padim-lite0-offline", train, {"image_size": SIZE})
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------------------------
# A non-square model on real portrait images, end to end


@pytest.fixture(scope="module")
def cookie_model(tmp_path_factory):
    """Lite0 (offline weights, 32 channels) fitted by the CLI on cookie's 31 training images at 128 x 96 (height x
    width: the camera's portrait aspect), exported to ONNX and OpenVINO by the CLI."""
    cookie = require_shared(COOKIE)
    model_dir = tmp_path_factory.mktemp("cookie") / "model"
    cli_main(["fit", "--data", str(cookie), "--image-size", "128x96", "--n-features", "32", "--output-dir", str(model_dir), "--cpu"])
    for fmt in ("onnx", "openvino"):
        cli_main(["export", "--model", str(model_dir), "--format", fmt, "--output-dir", str(model_dir / fmt)])
    return model_dir


@pytest.fixture(scope="module")
def cookie_test_images():
    """6 cracked cookies with their masks, and 3 good ones (not test/good/000.png, whose left border shows the tray's
    edge, which the model rightly scores as the most anomalous spot of that image)."""
    test = load_split(str(require_shared(COOKIE)), "test")
    cracked = [row for row in test if row["label"] == 1][:6]
    good = [row for row in test if row["label"] == 0][1:4]
    return cracked, good


# Blue squares pasted on the tray around a good cookie (top, left, side): away from the centre and from the diagonal,
# so a map whose rows and columns were swapped, flipped or squashed would peak elsewhere.
PATCHES = [(100, 450, 64), (660, 60, 64), (660, 460, 64)]


def test_non_square_model_maps_each_image_at_its_own_size_with_the_defect_where_the_mask_is(cookie_model, cookie_test_images):
    model = PadimModel.from_pretrained(cookie_model)
    processor = PadimImageProcessor.from_pretrained(cookie_model)
    assert model.config.image_size == SIZE and model.grid_shape == (32, 24)
    cracked, good = cookie_test_images
    images, masks = [], []
    for row in good[:2]:
        pixels = np.array(load_image(row["path"]))
        for top, left, side in PATCHES:
            patched, mask = pixels.copy(), np.zeros(pixels.shape[:2], bool)
            patched[top : top + side, left : left + side] = (40, 90, 220)
            mask[top : top + side, left : left + side] = True
            for scale in (1.0, 0.75):  # each image's own size: the camera's, and a smaller one of the same aspect
                size = (round(COOKIE_WIDTH * scale), round(COOKIE_HEIGHT * scale))
                images.append(PIL.Image.fromarray(patched).resize(size, PIL.Image.BICUBIC))
                masks.append(np.asarray(PIL.Image.fromarray(mask).resize(size, PIL.Image.NEAREST)))
    output = model(**processor(images, return_tensors="pt"))
    assert output.anomaly_map.shape == (len(images), 1, *SIZE)
    maps = processor.post_process_anomaly_maps(output.anomaly_map, [image.size[::-1] for image in images])
    for anomaly_map, mask in zip(maps, masks):
        assert anomaly_map.shape == mask.shape  # (768, 576) or (576, 432): height x width of that image
        peak = np.unravel_index(int(anomaly_map.argmax()), anomaly_map.shape)
        assert mask[peak], f"map peaks at {peak}, outside the defect"
        assert roc_auc_score(mask.ravel(), anomaly_map.numpy().ravel()) > 0.95

    # Real cracks: the maps rank crack pixels above the rest of the image (PaDiM localises them only roughly here:
    # the cookies lie at different places on the tray, measured pixel AUROC 0.80-0.91 per image at this size).
    images = [load_image(row["path"]) for row in cracked]
    output = model(**processor(images, return_tensors="pt"))
    maps = processor.post_process_anomaly_maps(output.anomaly_map, [image.size[::-1] for image in images])
    aurocs = []
    for row, anomaly_map in zip(cracked, maps):
        mask = np.asarray(PIL.Image.open(row["mask"]["path"])) > 0
        assert anomaly_map.shape == mask.shape == (COOKIE_HEIGHT, COOKIE_WIDTH)
        aurocs.append(roc_auc_score(mask.ravel(), anomaly_map.numpy().ravel()))
    assert np.mean(aurocs) > 0.8, aurocs


def test_non_square_model_runs_through_predict_and_the_pipeline(cookie_model, cookie_test_images, tmp_path):
    cracked, _ = cookie_test_images
    paths = [row["path"] for row in cracked[:2]]
    rows = predict_images(cookie_model, paths, tmp_path / "out")
    for row in rows:
        assert PIL.Image.open(row["heatmap"]).size == (COOKIE_WIDTH, COOKIE_HEIGHT)
    results = pipeline("anomaly-detection", model=str(cookie_model))(paths)
    for result, row in zip(results, rows):
        assert result["anomaly_map"].shape == (COOKIE_HEIGHT, COOKIE_WIDTH)
        assert result["score"] == pytest.approx(row["score"], rel=1e-5)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_non_square_exports_match_pytorch(cookie_model, cookie_test_images, engine):
    model = PadimModel.from_pretrained(cookie_model)
    processor = PadimImageProcessor.from_pretrained(cookie_model)
    cracked, good = cookie_test_images
    images = [load_image(row["path"]) for row in cracked + good]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    reference = model(pixel_values)
    folder = cookie_model / ("onnx" if engine == "onnxruntime" else "openvino")
    runtime = PadimRuntime(folder, engine)
    assert runtime.input_size == tuple(SIZE)
    assert json.loads((folder / "padim_export.json").read_text())["preprocessing"]["resize"] == SIZE
    outputs = runtime.run(pixel_values.numpy())
    assert outputs["anomaly_map"].shape == (9, 1, *SIZE)
    reference_map = reference.anomaly_map.numpy()
    assert np.abs(outputs["anomaly_map"] - reference_map).max() / np.abs(reference_map).max() <= 1e-4
    np.testing.assert_allclose(outputs["pred_score"], reference.pred_score.numpy(), rtol=1e-4)
    # The torch-free runtime's own pre-processing (Pillow) and maps at each image's size.
    result = runtime.predict([row["path"] for row in cracked[:2]])
    for item, score in zip(result, reference.pred_score[:2].tolist()):
        assert item["anomaly_map"].shape == (COOKIE_HEIGHT, COOKIE_WIDTH)
        assert item["score"] == pytest.approx(score, rel=0.03)


@pytest.mark.slow  # imports the Gradio app (~20-35 s here)
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_space_shows_a_non_square_model_at_the_image_size(cookie_model, cookie_test_images, engine):
    app = load_module(SPACE_DIR / "app.py", "padim_space_app_resolution")
    detector = app.Detector.load(cookie_model, engine=engine)
    cracked, _ = cookie_test_images
    result = app.analyse(cracked[0]["path"], detector=detector)
    assert result.mask.shape == (COOKIE_HEIGHT, COOKIE_WIDTH)  # the defect mask at the upload's own size
    assert "128 x 96 px (height x width)" in app.model_card_markdown(detector)


# ---------------------------------------------------------------------------------------------------------------
# The resolution sweep


def test_sweep_fits_and_evaluates_every_size_and_resumes(tmp_path, monkeypatch, capsys):
    from padim_hf import sweep
    from padim_hf.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "part", n_train=12, n_test_good=2, n_test_defect=2, size=64)
    result = sweep.run_sweep(data, [48, "auto:48", [40, 56]], output_dir=tmp_path / "sweep", overrides={"n_features": 8},
                             cpu=True, isolate=False, progress=False)
    assert [row["size"] for row in result.rows] == ["48x48", "48x48", "40x56"]  # auto on square images: a square
    assert [row["aspect"] for row in result.rows] == ["native", "native", "1.40"]
    assert [row["grid"] for row in result.rows] == ["12x12", "12x12", "10x14"]
    for row in result.rows:
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and 0 <= row["pixel_aupro"] <= 1
        assert row["fit_seconds"] > 0 and row["fit_peak_rss_gib"] > 0 and row["estimated_peak_gib"] > 0
        assert row["checkpoint_mb"] == pytest.approx((tmp_path / "sweep" / row["size"] / "model" / "model.safetensors").stat().st_size / 1e6)
    assert "| 40 x 56 | 1.40 | 10 x 14 |" in result.markdown and "`original` protocol" in result.markdown
    monkeypatch.setattr(sweep, "_run_size", lambda job: pytest.fail("a finished size ran again"))
    again = sweep.run_sweep(data, [[40, 56]], output_dir=tmp_path / "sweep", overrides={"n_features": 8}, cpu=True,
                            isolate=False, progress=False)
    assert again.rows[0]["pixel_auroc"] == result.rows[2]["pixel_auroc"]


@pytest.mark.slow  # a spawned process imports torch and padim_hf again (~15-30 s here)
def test_sweep_command_runs_each_size_in_its_own_process(tmp_path, capsys):
    from padim_hf.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "part", n_train=12, n_test_good=2, n_test_defect=2, size=64)
    cli_main(["sweep", "--data", str(data), "--image-size", "40x56", "--n-features", "8", "--output-dir", str(tmp_path / "out"), "--cpu"])
    table = capsys.readouterr().out
    assert "| Size (h x w) | Aspect | Grid | Fit (s) | Fit peak RSS (GiB) |" in table and "| 40 x 56 | 1.40 | 10 x 14 |" in table
    row = json.loads((tmp_path / "out" / "40x56" / "result.json").read_text())
    assert row["process"] != os.getpid()  # a fresh process: the peak RSS is this size's own
    assert 0 < row["fit_added_gib"] < row["fit_peak_rss_gib"]
