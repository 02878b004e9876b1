"""The Gaussian keeps its precision under .half()/.to(dtype)/autocast; device_map keeps the model whole; outputs."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.integrations.accelerate import compute_module_sizes, infer_auto_device_map

from padim_hf import PadimImageProcessor, PadimModel

from .conftest import small_lite0_config

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces"


def gaussian_dtypes(model: PadimModel) -> dict[str, torch.dtype]:
    return {name: buffer.dtype for name, buffer in model.gaussian.named_buffers()}


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to(dtype=torch.float16), lambda m: m.bfloat16()])
def test_casting_the_model_casts_the_backbone_only(small_model, cast):
    before = gaussian_dtypes(small_model)
    mean = small_model.gaussian.mean.clone()
    cast_model = cast(copy.deepcopy(small_model))
    assert next(cast_model.backbone.parameters()).dtype in (torch.float16, torch.bfloat16)
    assert gaussian_dtypes(cast_model) == before and before["mean"] == torch.float32
    assert torch.equal(cast_model.gaussian.mean, mean)  # bit-identical: never cast, not even and back


@pytest.fixture(scope="module")
def fabric_model(lite0_weights):
    """Lite0 fitted on 40 synthetic fabric images (more images than features, as in real use) and 6 test images."""
    spec = importlib.util.spec_from_file_location("padim_space_synthetic_precision", SPACE_DIR / "synthetic.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    config = small_lite0_config()
    processor = PadimImageProcessor.from_padim_config(config)
    train = processor([synthetic.fabric(seed, noise=0.02) for seed in range(40)], return_tensors="pt")["pixel_values"]
    good = [synthetic.fabric(seed) for seed in range(600, 603)]
    bad = [synthetic.add_defect(synthetic.fabric(700 + i), kind, seed=800 + i)[0] for i, kind in enumerate(synthetic.DEFECT_KINDS)]
    test = processor(good + bad, return_tensors="pt")["pixel_values"]
    return PadimModel(config).load_backbone_weights(lite0_weights).fit([train]), test


@pytest.mark.slow
def test_float16_backbone_scores_within_one_percent_of_float32(fabric_model):
    model, test = fabric_model
    reference = model(test).pred_score
    half = copy.deepcopy(model).half()
    scores = half(test).pred_score
    assert scores.dtype == torch.float32
    assert ((scores - reference).abs() / reference).max() < 0.01
    # bfloat16 keeps 8 mantissa bits: measured 11 % here (README states it), so only the separation is asserted.
    bf16 = copy.deepcopy(model).to(torch.bfloat16)(test).pred_score
    assert bf16.dtype == torch.float32 and bf16[3:].min() > bf16[:3].max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_scores = model(test).pred_score
    assert autocast_scores.dtype == torch.float32 and ((autocast_scores - reference).abs() / reference).max() < 0.1


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.7, 0.9, 1.5])
def test_device_map_auto_keeps_the_model_on_one_device(fraction):
    model = PadimModel(small_lite0_config())
    total = compute_module_sizes(model)[0][""]
    device_map = infer_auto_device_map(
        model, max_memory={0: int(total * fraction), "cpu": 10 * total}, no_split_module_classes=model._no_split_modules
    )
    assert len(set(device_map.values())) == 1, device_map


def test_return_dict_false_gives_three_entries_and_config_return_dict_is_honoured(small_model, random_images):
    uncalibrated = small_model(random_images, return_dict=False)
    assert len(uncalibrated) == 3 and uncalibrated[2] is None
    calibrated = copy.deepcopy(small_model)
    calibrated.config.image_threshold = 1.0
    anomaly_map, score, label = calibrated(random_images, return_dict=False)
    assert torch.equal(label, score >= 1.0)
    calibrated.config.return_dict = False
    assert isinstance(calibrated(random_images), tuple) and len(calibrated(random_images)) == 3
    assert calibrated(random_images, return_dict=True).pred_score is not None
