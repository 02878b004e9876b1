"""Evaluation: paper protocol, streamed metrics against exact ones, calibration, several processes, presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch

from padim_hf import PadimImageProcessor, PadimModel
from padim_hf.data import mvtec_split
from padim_hf.demo import make_demo_dataset
from padim_hf.evaluate import evaluate_padim, masks_at_model_resolution, record_evaluation
from padim_hf.fit import load_preset
from padim_hf.metrics import StreamingPixelMetrics, aupro, auroc, f1_max
from padim_hf.modelcard import build_model_card

from .conftest import small_lite0_config


def random_maps(seed: int, count: int = 12) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks with 0-3 rectangular regions and gamma-distributed maps, images of different sizes."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(count):
        height, width = rng.integers(40, 90, size=2)
        mask = np.zeros((height, width), bool)
        for _ in range(rng.integers(0, 4)):
            top, left = rng.integers(0, height - 12), rng.integers(0, width - 12)
            mask[top : top + rng.integers(2, 12), left : left + rng.integers(2, 12)] = True
        anomaly_map = rng.gamma(2.0, 1.0, size=(height, width)) + 3.0 * mask * rng.uniform(0, 1.5, size=(height, width))
        masks.append(mask)
        maps.append(anomaly_map.astype(np.float32))
    return masks, maps


def exact_pixel_metrics(masks, maps) -> dict[str, float]:
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    return {
        "pixel_auroc": auroc(flat_masks, flat_maps),
        "pixel_aupro": aupro(masks, maps),
        "pixel_f1_max": f1_max(flat_masks, flat_maps)[0],
    }


def assert_metrics_close(streamed: dict, exact: dict, tolerance: float = 1e-4) -> None:
    for name, value in exact.items():
        assert abs(streamed[name] - value) < tolerance, (name, streamed[name], value)


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_pixel_metrics_equal_exact_ones_on_random_maps_of_mixed_sizes(seed):
    masks, maps = random_maps(seed)
    streamed = StreamingPixelMetrics()
    for start in range(0, len(maps), 5):  # in batches, as evaluate feeds it
        streamed.update(maps[start : start + 5], masks[start : start + 5])
    assert_metrics_close(streamed.compute(), exact_pixel_metrics(masks, maps))


def test_streamed_state_does_not_depend_on_order_or_sharding():
    masks, maps = random_maps(2)
    maps = [m * 2.0 ** (i % 5) for i, m in enumerate(maps)]  # maxima spanning several powers of two
    whole = StreamingPixelMetrics()
    whole.update(maps, masks)  # one update: the range is set once, no bins are merged
    # Images one by one in increasing order of their top score: the range grows (bins merge) again and again; and
    # two shards whose ranges differ must be rebinned to the wider one when merged.
    order = np.argsort([m.max() for m in maps])
    first, second = StreamingPixelMetrics(), StreamingPixelMetrics()
    for index in order[:-3]:
        first.update([maps[index]], [masks[index]])
    for index in order[-3:]:
        second.update([maps[index]], [masks[index]])
    assert first.exponent < second.exponent
    merged = first.merge_(second)
    assert merged.exponent == whole.exponent
    np.testing.assert_array_equal(merged.normal, whole.normal)
    np.testing.assert_array_equal(merged.anomalous, whole.anomalous)
    np.testing.assert_allclose(merged.region_weight, whole.region_weight, rtol=1e-12)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-12)
    assert_metrics_close(merged.compute(), exact_pixel_metrics(masks, maps))


def test_aupro_is_one_curve_over_all_regions_of_all_images_not_a_mean_of_images():
    # Image 0: one region found at low FPR; image 1 (another size): two regions, one buried in normal scores.
    mask0 = np.zeros((20, 20), bool)
    mask0[5:9, 5:9] = True
    mask1 = np.zeros((30, 10), bool)
    mask1[2:5, 2:5] = True
    mask1[20:25, 3:8] = True
    rng = np.random.default_rng(0)
    map0 = rng.uniform(0, 1, mask0.shape) + 2 * mask0
    map1 = rng.uniform(0, 1, mask1.shape)
    map1[2:5, 2:5] += 2
    # Straightforward: PRO = mean over the 3 regions, FPR over the normal pixels of both images.
    thresholds = np.unique(np.concatenate([map0.ravel(), map1.ravel()]))[::-1]
    regions = [map0[mask0], map1[2:5, 2:5].ravel(), map1[20:25, 3:8].ravel()]
    normal = np.concatenate([map0[~mask0], map1[~mask1]])
    fpr = np.array([(normal >= t).mean() for t in thresholds])
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in thresholds])
    inside = fpr <= 0.3
    f, p = np.concatenate([[0], fpr[inside], [0.3]]), np.concatenate([[0], pro[inside], [np.interp(0.3, fpr, pro)]])
    expected = np.trapezoid(p, f) / 0.3
    assert aupro([mask0, mask1], [map0, map1]) == pytest.approx(expected, abs=1e-9)
    streamed = StreamingPixelMetrics()
    streamed.update([map0, map1], [mask0, mask1])
    assert streamed.compute()["pixel_aupro"] == pytest.approx(expected, abs=1e-4)
    per_image_mean = np.mean([aupro([mask0], [map0]), aupro([mask1], [map1])])
    assert abs(per_image_mean - expected) > 0.01  # the old fallback for mixed sizes was another metric


def test_masks_are_resized_with_pixel_centre_nearest_and_centre_cropped_like_images():
    processor = PadimImageProcessor.from_padim_config(small_lite0_config(image_size=80, crop_size=64))
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(97, 131)) > 0.7
    (transformed,) = masks_at_model_resolution([mask], processor)
    # The paper's code: PIL NEAREST resize to 80 x 80, then the 64 x 64 centre.
    reference = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize((80, 80), PIL.Image.NEAREST)) > 0
    np.testing.assert_array_equal(transformed, reference[8:72, 8:72])


@pytest.fixture(scope="module")
def hazelnut_model(hazelnut, lite0_weights) -> tuple[PadimModel, PadimImageProcessor]:
    """Lite0 at 80 px with a centre crop to 64, fitted on 10 hazelnut images (float32 storage)."""
    config = small_lite0_config(image_size=80, crop_size=64, covariance_storage="float32", n_features=32)
    model = PadimModel(config).load_backbone_weights(lite0_weights)
    processor = PadimImageProcessor.from_padim_config(config)
    train = [PIL.Image.open(p) for p in sorted((hazelnut / "train" / "good").glob("*.png"))[:10]]
    model.fit([processor(train, return_tensors="pt")["pixel_values"]])
    return model, processor


def plain_reference(model, processor, dataset, protocol: str) -> dict[str, float]:
    """Every test image through processor and model one by one, masks transformed with PIL, exact metrics."""
    crop = processor.crop_size["height"]
    margin = (processor.size["height"] - crop) // 2
    maps, masks, scores, labels = [], [], [], []
    for row in dataset:
        image = PIL.Image.open(row["path"])
        mask = np.zeros(image.size[::-1], bool) if row["mask"] is None else np.asarray(PIL.Image.open(row["mask"]["path"]).convert("L")) > 127
        output = model(processor([image], return_tensors="pt")["pixel_values"])
        if protocol == "model":
            size = (processor.size["width"], processor.size["height"])
            resized = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8)).resize(size, PIL.Image.NEAREST)) > 0
            masks.append(resized[margin : margin + crop, margin : margin + crop])
            maps.append(output.anomaly_map[0, 0].numpy())
        else:
            masks.append(mask)
            maps.append(processor.post_process_anomaly_maps(output.anomaly_map, [mask.shape])[0].numpy())
        scores.append(float(output.pred_score[0]))
        labels.append(row["label"])
    return {"image_auroc": auroc(labels, scores), "image_f1_max": f1_max(labels, scores)[0]} | exact_pixel_metrics(masks, maps)


@pytest.mark.parametrize("protocol", ["model", "original"])
def test_protocol_metrics_equal_a_plain_reference_on_hazelnut(hazelnut, hazelnut_model, protocol):
    model, processor = hazelnut_model
    dataset = mvtec_split(hazelnut, "test")
    result = evaluate_padim(model, dataset, processor=processor, protocol=protocol, batch_size=3, progress=False)
    reference = plain_reference(model, processor, dataset, protocol)
    assert_metrics_close(result.metrics(), reference)
    assert result.num_images == len(dataset) and result.protocol == protocol
    assert result.image_threshold is None  # no calibration images: no threshold is chosen on the test images


def test_model_protocol_is_the_default_and_differs_from_original_resolution_with_a_crop(hazelnut, hazelnut_model):
    model, processor = hazelnut_model
    dataset = mvtec_split(hazelnut, "test")
    default = evaluate_padim(model, dataset, processor=processor, progress=False)
    original = evaluate_padim(model, dataset, processor=processor, protocol="original", progress=False)
    assert default.protocol == "model"
    assert abs(default.pixel_auroc - original.pixel_auroc) > 1e-4  # the crop margin is scored in one, not the other


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_test_good=4, n_test_defect=3, size=64)


@pytest.fixture(scope="module")
def demo_model(demo_data, lite0_weights) -> PadimModel:
    config = small_lite0_config(covariance_storage="float32", train_dataset=str(demo_data))
    model = PadimModel(config).load_backbone_weights(lite0_weights)
    processor = PadimImageProcessor.from_padim_config(config)
    train = [PIL.Image.open(p) for p in sorted((demo_data / "train" / "good").glob("*.png"))]
    return model.fit([processor(train, return_tensors="pt")["pixel_values"]])


def test_calibration_fraction_is_seeded_stratified_and_left_out_of_the_metrics(demo_data, demo_model):
    dataset = mvtec_split(demo_data, "test")  # 4 good, 6 anomalous
    result = evaluate_padim(demo_model, dataset, calibration=0.5, calibration_seed=3, progress=False)
    calibration_paths = result.calibration["images"]
    assert len(calibration_paths) == result.num_calibration_images == 5
    assert not set(calibration_paths) & set(result.paths)
    assert sorted(calibration_paths + result.paths) == sorted(dataset["path"])
    labels = dict(zip(dataset["path"], dataset["label"]))
    assert sorted(labels[p] for p in calibration_paths) == [0, 0, 1, 1, 1]  # stratified: 2 of 4 good, 3 of 6 defects
    again = evaluate_padim(demo_model, dataset, calibration=0.5, calibration_seed=3, progress=False)
    assert again.calibration["images"] == calibration_paths
    # Metrics from the evaluated images only; thresholds and score range from the calibration images only.
    keep = [i for i, p in enumerate(dataset["path"]) if p not in calibration_paths]
    alone = evaluate_padim(demo_model, dataset.select(keep), progress=False)
    assert result.metrics() == pytest.approx(alone.metrics())
    calibration = dataset.select([i for i, p in enumerate(dataset["path"]) if p in calibration_paths])
    scored = evaluate_padim(demo_model, calibration, progress=False)
    calibration_labels = [labels[p] for p in scored.paths]
    assert result.image_threshold == pytest.approx(f1_max(calibration_labels, scored.scores)[1])
    assert (result.score_min, result.score_max) == pytest.approx((min(scored.scores), max(scored.scores)))

    record_evaluation(demo_model, result, {"name": str(demo_data), "config": None, "split": "test"})
    recorded = demo_model.config.calibration
    assert recorded["fraction"] == 0.5 and recorded["seed"] == 3
    assert sorted(recorded["images"]) == sorted(str(Path(p).relative_to(demo_data)) for p in calibration_paths)
    assert demo_model.config.metrics["num_images"] == 5 and demo_model.config.metrics["calibration_images_excluded"] == 5
    card = build_model_card(demo_model.config).content
    assert "5 calibration images" in card and "left out of the metrics" in card


def test_a_separate_calibration_split_gives_the_thresholds(demo_data, demo_model):
    dataset = mvtec_split(demo_data, "test")
    evaluation, calibration = dataset.select(range(0, 10, 2)), dataset.select(range(1, 10, 2))
    result = evaluate_padim(demo_model, evaluation, calibration=calibration, progress=False)
    scored = evaluate_padim(demo_model, calibration, progress=False)
    assert result.num_images == 5 and result.num_calibration_images == 5
    assert result.image_threshold == pytest.approx(f1_max(calibration["label"], scored.scores)[1])


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(demo_data, demo_model, tmp_path):
    model_dir = tmp_path / "model"
    demo_model.save_pretrained(model_dir)
    # Batches of one image: the backbone's convolutions round differently with the batch's size (~1e-5 of the map,
    # measured) and one process cuts the images into other batches than two do; what must be exact is the merging.
    command = ["-m", "padim_hf.evaluate", "--model", str(model_dir), "--data", str(demo_data), "--cpu", "--json",
               "--no-save", "--batch-size", "1", "--calibration-fraction", "0.4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = []
    for launcher in ([], ["-m", "torch.distributed.run", "--nproc_per_node", "2"]):
        process = subprocess.run([sys.executable, *launcher, *command], capture_output=True, text=True, env=env, timeout=300)
        assert process.returncode == 0, process.stderr[-3000:]
        lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # printed by the main process only
        reports.append(json.loads(lines[0]))
    one, two = reports
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max", "image_threshold",
                "pixel_threshold", "num_images", "num_calibration_images"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key


def test_paper_presets_pin_the_torchvision_weights_by_timm_tag():
    for preset, tag in [("padim-r18-rd100", "resnet18.tv_in1k"), ("padim-wr50-rd550", "wide_resnet50_2.tv_in1k")]:
        values = load_preset(preset)
        assert values["backbone"] == tag
        assert timm.get_pretrained_cfg(tag).hf_hub_id == f"timm/{tag}"
    config = small_lite0_config(backbone="resnet18.tv_in1k", n_features=100, image_size=256, crop_size=224)
    model = PadimModel(config)
    assert model.embed(torch.zeros(1, 3, 224, 224)).shape == (1, 100, 56, 56)
    assert config.stage_channels == [64, 128, 256] and list(config.image_mean) == [0.485, 0.456, 0.406]


def test_pixel_metrics_need_a_mask_for_every_anomalous_image(demo_data, demo_model):
    dataset = mvtec_split(demo_data, "test")
    partly = dataset.map(lambda row: {"mask": None if row["defect_type"] == "stain" else row["mask"]}, features=dataset.features)
    with pytest.raises(ValueError, match="anomalous images have no ground-truth mask .*stain/000.png"):
        evaluate_padim(demo_model, partly, progress=False)
    labels_only = dataset.map(lambda row: {"mask": None}, features=dataset.features)
    result = evaluate_padim(demo_model, labels_only, progress=False)
    assert result.metrics()["pixel_auroc"] is None and result.metrics()["pixel_aupro"] is None
    assert result.image_auroc == pytest.approx(evaluate_padim(demo_model, dataset, progress=False).image_auroc)
