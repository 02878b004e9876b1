import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2.functional import gaussian_blur
from transformers import AutoImageProcessor, AutoModel

from padim_hf import PadimConfig, PadimImageProcessor, PadimModel
from padim_hf.image_processing_padim import load_image
from padim_hf.modeling_padim import nearest_source_indices, upsample_blur_matrix
from tests.conftest import small_lite0_config


def test_config_draws_feature_indices_from_its_seed_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = PadimConfig(backbone="resnet18", n_features=100, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    assert first.feature_indices == PadimConfig(backbone="resnet18", n_features=100, seed=7).feature_indices
    assert first.feature_indices != PadimConfig(backbone="resnet18", n_features=100, seed=8).feature_indices
    assert len(set(first.feature_indices)) == 100 and max(first.feature_indices) < 448


def test_config_takes_normalisation_from_the_backbone():
    assert PadimConfig(backbone="tf_efficientnet_lite0").image_mean == [0.5, 0.5, 0.5]
    assert PadimConfig(backbone="resnet18").image_std == [0.229, 0.224, 0.225]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layers=(1, 7)), "layers"),
        (dict(n_features=449), "n_features=449"),
        (dict(n_features=3, feature_indices=[1, 1, 2]), "repeated"),
        (dict(n_features=2, feature_indices=[0, 448]), "0..447"),
        (dict(backbone="no_such_net"), "unknown timm backbone"),
        (dict(crop_size=300), "crop_size"),
        (dict(epsilon=0.0), "epsilon"),
    ],
)
def test_invalid_config_values_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        PadimConfig(**{"backbone": "resnet18", **overrides})


def test_backbone_stops_after_last_used_stage():
    model = PadimModel(small_lite0_config())
    assert len(model.backbone.blocks) == 5  # blocks.4 feeds stage 3; blocks 5 and 6 are never built into the net
    features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [24, 40, 112]


def test_fit_refuses_a_random_backbone_unless_asked(random_images):
    model = PadimModel(small_lite0_config())
    with pytest.raises(RuntimeError, match="randomly initialised backbone"):
        model.fit([random_images])
    model.fit([random_images], allow_random_backbone=True)
    assert model.config.num_train_images == 7


def test_fit_on_nothing_is_a_clear_error(lite0_weights):
    model = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights)
    with pytest.raises(ValueError, match="training set is empty"):
        model.fit([])


def test_backbone_autocast_leaves_statistics_and_distances_in_float32(lite0_weights, random_images):
    reference = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights)
    statistics = reference.collect_statistics([random_images])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = reference.collect_statistics([random_images])
        reference.set_gaussian(statistics)
        mixed_scores = reference(random_images).pred_score
    assert mixed.shifted_outer.blocks[0].dtype == torch.float32 and mixed_scores.dtype == torch.float32
    relative = (mixed.covariance() - statistics.covariance()).norm() / statistics.covariance().norm()
    assert relative < 0.05  # bf16 features move the covariance a little, not the arithmetic precision


def test_one_image_fit_gives_finite_maps(lite0_weights, random_images):
    model = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights).fit([random_images[:1]])
    output = model(random_images)
    assert torch.isfinite(output.anomaly_map).all()
    assert output.pred_score[0] < output.pred_score[1:].min()  # the training image itself is the most normal


def test_embedding_equals_nearest_interpolation_of_the_selected_channels(small_model, random_images):
    features = small_model.backbone(random_images)
    grid = features[0].shape[-2:]
    upsampled = torch.cat([F.interpolate(feature, size=grid, mode="nearest") for feature in features], dim=1)
    expected = upsampled[:, small_model.feature_indices]
    torch.testing.assert_close(small_model.embed(random_images), expected, rtol=0, atol=0)


@pytest.mark.parametrize("in_size, out_size", [(14, 56), (15, 63), (7, 64), (64, 64)])
def test_nearest_source_indices_match_torch_nearest_interpolation(in_size, out_size):
    source = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
    expected = F.interpolate(source, size=(out_size, 1), mode="nearest").flatten().long()
    assert nearest_source_indices(in_size, out_size, torch.device("cpu")).tolist() == expected.tolist()


@pytest.mark.parametrize("sigma", [4.0, 0.0])
def test_upsample_blur_matrices_equal_bilinear_upsampling_then_gaussian_blur(sigma):
    maps = torch.rand(3, 1, 12, 20, generator=torch.Generator().manual_seed(0)) * 10
    rows, cols = upsample_blur_matrix(12, 48, sigma), upsample_blur_matrix(20, 80, sigma)
    assert rows.shape == (48, 12) and cols.shape == (80, 20)
    expected = F.interpolate(maps, size=(48, 80), mode="bilinear", align_corners=False)
    if sigma:
        expected = gaussian_blur(expected, [33, 33], [sigma, sigma])
    torch.testing.assert_close(rows @ maps @ cols.T, expected, rtol=1e-5, atol=1e-5)

# float32 storage is limited by the float32 sums: 7 images give a rank-6 covariance + 0.01 I whose conditioning
# turns their ~1e-7 rounding into ~1e-4 in the distances (patch-level 4e-4 before and after block-row sums).
# A non-square input (48 high, 80 wide: a 12 x 20 grid) checks that rows and columns are never swapped anywhere.
@pytest.mark.parametrize(
    "storage, tolerance, size", [("float32", 3e-4, 64), ("float16", 1e-3, 64), ("float32", 3e-4, [48, 80])]
)
def test_anomaly_map_equals_plain_per_position_reference(lite0_weights, random_images, storage, tolerance, size):
    small_model = PadimModel(small_lite0_config(covariance_storage=storage, image_size=size)).load_backbone_weights(lite0_weights)
    height, width = small_model.config.input_size
    random_images = F.interpolate(random_images, size=(height, width), mode="bilinear", align_corners=False)
    small_model.fit([random_images[:4], random_images[4:]])
    embedding = small_model.embed(random_images).double()  # (B, C, h, w)
    patches = embedding.flatten(2).permute(2, 0, 1).numpy()  # (P, B, C)
    queries = small_model.embed(random_images.flip(0) * 1.5).double().flatten(2).permute(2, 0, 1).numpy()
    distances = np.zeros(queries.shape[:2])
    for p in range(patches.shape[0]):
        mean = patches[p].mean(axis=0)
        covariance = np.cov(patches[p], rowvar=False) + 0.01 * np.eye(patches.shape[2])
        delta = queries[p] - mean
        distances[p] = np.sqrt(np.einsum("bc,cd,bd->b", delta, np.linalg.inv(covariance), delta))
    grid_height, grid_width = -(-height // 4), -(-width // 4)  # stage 1 of Lite0: stride 4
    assert small_model.embed(random_images).shape[-2:] == (grid_height, grid_width)
    reference = torch.from_numpy(distances.T.reshape(7, 1, grid_height, grid_width)).float()
    reference = F.interpolate(reference, size=(height, width), mode="bilinear", align_corners=False)
    reference = gaussian_blur(reference, [33, 33], [4.0, 4.0])
    output = small_model(random_images.flip(0) * 1.5)
    torch.testing.assert_close(output.anomaly_map, reference, rtol=tolerance, atol=1e-3)
    torch.testing.assert_close(output.pred_score, reference.amax(dim=(1, 2, 3)), rtol=tolerance, atol=1e-3)


def test_save_and_load_give_identical_maps(small_model, random_images, tmp_path):
    small_model.save_pretrained(tmp_path)
    loaded = PadimModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(random_images).anomaly_map, small_model(random_images).anomaly_map)
    assert loaded.backbone_weights == "checkpoint"
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, PadimModel)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, PadimImageProcessor) and processor.size["height"] == 64


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_low_precision_load_keeps_the_gaussian_in_its_stored_dtypes(small_model, tmp_path, storage):
    small_model.config.covariance_storage = storage
    small_model.save_pretrained(tmp_path)
    loaded = PadimModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(loaded.backbone.parameters()).dtype == torch.bfloat16
    assert loaded.gaussian.mean.dtype == torch.float32
    assert [block.dtype for block in loaded.gaussian.whitening().blocks] == [getattr(torch, storage)] * 4


def test_float16_storage_halves_the_factor_on_disk_and_scores_stay_close(small_model, random_images, tmp_path):
    small_model.config.covariance_storage = "float32"
    small_model.save_pretrained(tmp_path / "fp32")
    small_model.config.covariance_storage = "float16"
    small_model.save_pretrained(tmp_path / "fp16")
    sizes = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "fp16")}
    with safe_open(tmp_path / "fp16" / "model.safetensors", "pt") as checkpoint:
        factor = checkpoint.get_tensor("gaussian.whitening_packed")
    assert factor.dtype == torch.float16
    assert sizes["fp32"] - sizes["fp16"] == factor.numel() * 2
    loaded = PadimModel.from_pretrained(tmp_path / "fp16")
    torch.testing.assert_close(loaded(random_images).pred_score, small_model(random_images).pred_score, rtol=5e-3, atol=0)


# The code a saved model folder carries for `trust_remote_code=True`: what loading and running the model needs (config,
# model, Gaussian, image processor, pipeline), nothing of the package's Hub, export, file or CLI layers.
REMOTE_CODE_FILES = [
    "configuration_padim.py", "gaussian.py", "image_processing_padim.py", "modeling_padim.py", "pipeline_padim.py",
]


def test_remote_code_loads_without_the_package_installed(small_model, random_images, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    assert sorted(path.name for path in (tmp_path / "model").glob("*.py")) == REMOTE_CODE_FILES
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_padim.PadimModel"
    torch.save(random_images, tmp_path / "images.pt")
    script = f"""
import sys
sys.modules["padim_hf"] = None  # any import of the installed package now fails
import torch
from transformers import AutoModel, AutoImageProcessor
model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
assert "padim_hf" not in type(model).__module__, type(model).__module__
images = torch.load({str(tmp_path / 'images.pt')!r})
torch.save(model(images).anomaly_map, {str(tmp_path / 'maps.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "maps.pt"), small_model(random_images).anomaly_map)


def test_checkpoint_not_matching_its_config_names_the_tensors(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_features"], config["feature_indices"] = 10, config["feature_indices"][:10]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gaussian.mean has shape \(256, 24\) in the checkpoint, \(256, 10\)"):
        PadimModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.zeros(2, 3, 32, 32), r"shape \(batch, 3, 64, 64\)"),
        (torch.zeros(3, 64, 64), r"got \(3, 64, 64\)"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_bad_pixel_values_raise_clear_errors(small_model, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        small_model(pixel_values)


def test_unfitted_model_refuses_to_predict(random_images):
    with pytest.raises(RuntimeError, match="not fitted"):
        PadimModel(small_lite0_config())(random_images)


def test_corrupt_image_file_error_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)


@pytest.mark.slow
def test_hazelnut_detection_quality(hazelnut, lite0_weights):
    config = PadimConfig(backbone="tf_efficientnet_lite0", layers=(1, 2, 3), n_features=100, image_size=256)
    model = PadimModel(config).load_backbone_weights(lite0_weights)
    processor = PadimImageProcessor.from_padim_config(config)
    train = sorted((hazelnut / "train" / "good").glob("*.png"))
    model.fit(processor([load_image(p) for p in train[i : i + 10]], return_tensors="pt")["pixel_values"] for i in range(0, len(train), 10))
    tests = sorted((hazelnut / "test").glob("*/*.png"))
    output = model(processor([load_image(p) for p in tests], return_tensors="pt")["pixel_values"])
    labels = np.array([p.parent.name != "good" for p in tests])
    masks = []
    for path in tests:
        mask_path = hazelnut / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        mask = load_image(mask_path).convert("L").resize((256, 256)) if mask_path.exists() else None
        masks.append(np.asarray(mask) > 127 if mask is not None else np.zeros((256, 256), bool))
    scores = output.pred_score.numpy()
    assert roc_auc_score(np.stack(masks).ravel(), output.anomaly_map[:, 0].numpy().ravel()) >= 0.97
    assert roc_auc_score(labels, scores) >= 0.8
    assert scores[labels].mean() > scores[~labels].mean()


def test_gaussian_holds_one_float32_factor_and_the_checkpoint_keeps_the_packed_format(small_model, random_images):
    gaussian = small_model.gaussian
    positions, channels = gaussian.mean.shape
    buffers = dict(gaussian.named_buffers())
    assert sorted(buffers) == ["mean", "whitening_0", "whitening_1", "whitening_2", "whitening_3"]
    bounds = [channels * index // 4 for index in range(5)]
    assert [tuple(buffers[f"whitening_{i}"].shape) for i in range(4)] == [
        (positions, stop - start, stop) for start, stop in zip(bounds, bounds[1:])
    ]
    state = small_model.state_dict()
    assert not any(key.startswith("gaussian.whitening_") and key[-1].isdigit() for key in state)
    assert state["gaussian.whitening_packed"].shape == (positions, channels * (channels + 1) // 2)
    assert state["gaussian.whitening_packed"].dtype == torch.float16
    # torch's own load path (a load_state_dict pre-hook) unpacks it into the blocks of a fresh model.
    fresh = PadimModel(small_model.config)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(random_images).anomaly_map, small_model(random_images).anomaly_map)


def test_from_pretrained_streams_the_factor_in_chunks(small_model, random_images, tmp_path, monkeypatch):
    import padim_hf.modeling_padim as modeling

    small_model.save_pretrained(tmp_path)
    reads = []
    original = modeling.packed_factor_reader

    @contextlib.contextmanager
    def counting_reader(*args):
        with original(*args) as (read, shape):
            yield (lambda positions: reads.append(positions) or read(positions)), shape

    monkeypatch.setattr(modeling, "LOAD_CHUNK", 100)  # 256 positions: chunks of 100, 100, 56
    monkeypatch.setattr(modeling, "packed_factor_reader", counting_reader)
    loaded = PadimModel.from_pretrained(tmp_path)
    assert [(s.start, s.stop) for s in reads] == [(0, 100), (100, 200), (200, 256)]
    assert torch.equal(loaded(random_images).anomaly_map, small_model(random_images).anomaly_map)


def test_checkpoint_without_the_factor_is_refused(small_model, tmp_path):
    from safetensors.torch import load_file, save_file

    small_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["gaussian.whitening_packed"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensors.*gaussian.whitening_packed"):
        PadimModel.from_pretrained(tmp_path)
