"""The Python fit API (padim_hf.fit): fit_padim on every kind of data, save_fitted, build_model."""

import json
from pathlib import Path

import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Image, Value

from padim_hf import PadimConfig, PadimModel
from padim_hf.demo import make_demo_dataset
from padim_hf.fit import build_model, fit_padim, make_accelerator, save_fitted, training_split
from padim_hf.image_processing_padim import PadimImageProcessor

SMALL = dict(image_size=64, n_features=16, covariance_storage="float32")
PROBE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))



@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=5, n_test_good=1, n_test_defect=1, size=64)


@pytest.fixture(scope="module")
def train_paths(demo_data) -> list[Path]:
    return sorted((demo_data / "train" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def reference(train_paths) -> PadimModel:
    """The model's own fit on batches the processor made by hand: what fit_padim must reproduce."""
    model = build_model("padim-lite0-offline", **SMALL)
    processor = PadimImageProcessor.from_padim_config(model.config)
    images = [PIL.Image.open(p) for p in train_paths]
    return model.fit([processor(images[:3], return_tensors="pt")["pixel_values"], processor(images[3:], return_tensors="pt")["pixel_values"]])


def assert_same_gaussian(model: PadimModel, reference: PadimModel) -> None:
    assert model.config.num_train_images == reference.config.num_train_images
    torch.testing.assert_close(model.gaussian.mean, reference.gaussian.mean, rtol=1e-5, atol=1e-5)
    maps, expected = model(PROBE).anomaly_map, reference(PROBE).anomaly_map
    assert ((maps - expected).abs().max() / expected.abs().max()) < 1e-4


def test_fit_padim_on_a_dataset_paths_and_pil_images_equals_the_model_fit(demo_data, train_paths, reference):
    accelerator = make_accelerator(cpu=True)
    sources = {
        "training split": training_split(str(demo_data)),
        "paths": train_paths,
        "path generator": (str(p) for p in train_paths),
        "PIL images": [PIL.Image.open(p) for p in train_paths],
    }
    for name, data in sources.items():
        model = build_model("padim-lite0-offline", **SMALL)
        fitted = fit_padim(model, data, batch_size=2, accelerator=accelerator, progress=False)
        assert fitted is model, name
        assert_same_gaussian(fitted, reference)


def test_fit_padim_reads_workers_without_duplicates(train_paths, reference):
    # Two DataLoader workers share a plain list: every image exactly once.
    model = fit_padim(build_model("padim-lite0-offline", **SMALL), train_paths, batch_size=2, num_workers=2,
                      accelerator=make_accelerator(cpu=True), progress=False)
    assert_same_gaussian(model, reference)


def test_anomalous_rows_and_missing_image_column_are_errors(train_paths):
    model = build_model("padim-lite0-offline", **SMALL)
    features = Features({"image": Image(decode=False), "label": Value("int64"), "path": Value("string")})
    rows = Dataset.from_dict(
        {"image": [{"path": str(p), "bytes": None} for p in train_paths[:2]], "label": [0, 1], "path": [str(p) for p in train_paths[:2]]},
        features=features,
    )
    with pytest.raises(ValueError, match=f"{train_paths[1].name} is labelled anomalous"):
        fit_padim(model, rows, accelerator=make_accelerator(cpu=True), progress=False)
    with pytest.raises(ValueError, match="no 'image' column"):
        fit_padim(model, Dataset.from_dict({"picture": [1]}), accelerator=make_accelerator(cpu=True), progress=False)
    with pytest.raises(TypeError, match="training_split"):
        fit_padim(model, str(train_paths[0].parent), accelerator=make_accelerator(cpu=True), progress=False)


def test_save_fitted_writes_atomically_only_on_the_main_process(reference, tmp_path):
    target = tmp_path / "model"
    assert save_fitted(reference, target, main_process=False) == target
    assert not target.exists()
    assert save_fitted(reference, target) == target
    loaded = PadimModel.from_pretrained(target)
    torch.testing.assert_close(loaded.gaussian.mean, reference.gaussian.mean)
    with pytest.raises(FileExistsError):
        save_fitted(reference, target)
    (target / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="marker"):  # overwrite never deletes a file that is not the model's
        save_fitted(reference, target, overwrite=True)
    (target / "marker").unlink()
    (target / "config.json").write_text(json.dumps({**json.loads((target / "config.json").read_text()), "seed": -1}))
    save_fitted(reference, target, overwrite=True)
    assert json.loads((target / "config.json").read_text())["seed"] == reference.config.seed  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left beside it
    with pytest.raises(ValueError, match="not fitted"):
        save_fitted(build_model("padim-lite0-offline", **SMALL), tmp_path / "unfitted")


def test_save_pretrained_on_a_non_main_process_writes_nothing(reference, tmp_path):
    reference.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()


def test_build_model_from_preset_dict_and_config_with_overrides(lite0_weights):
    from_preset = build_model("padim-lite0-offline", n_features=20, seed=3)
    assert (from_preset.config.n_features, from_preset.config.seed, len(from_preset.config.feature_indices)) == (20, 3, 20)
    assert from_preset.backbone_weights is not None
    config = PadimConfig(backbone="tf_efficientnet_lite0", n_features=12, image_size=64)
    from_config = build_model(config, backbone_weights=lite0_weights)
    assert from_config.config.feature_indices == config.feature_indices and from_config.backbone_weights == str(lite0_weights)
    random = build_model({"backbone": "resnet18", "n_features": 8, "image_size": 64}, allow_random_backbone=True)
    assert random.backbone_weights is None
    with pytest.raises(RuntimeError, match="randomly initialised"):
        fit_padim(random, [torch.zeros(3, 64, 64)], accelerator=make_accelerator(cpu=True), progress=False)
    with pytest.raises(ValueError, match="unknown config overrides"):
        build_model("padim-lite0-offline", n_feature=3)
    assert json.loads(random.config.to_json_string())["n_features"] == 8


def test_launched_processes_that_would_not_cooperate_stop_with_a_message(train_paths, monkeypatch):
    # torchrun's WORLD_SIZE says 2 processes, but this Accelerator connects only this one: each process would fit
    # every image and write the same directory, so fit_padim refuses.
    accelerator = make_accelerator(cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes were launched but this Accelerator connects 1"):
        fit_padim(build_model("padim-lite0-offline", **SMALL), train_paths, accelerator=accelerator, progress=False)


def test_accelerates_multi_cpu_device_is_read_as_the_plain_cpu():
    # accelerate's MULTI_CPU device is "cpu:0"; model.to("cpu:0") copies every tensor (1.2 GB more peak per WR50 process).
    from types import SimpleNamespace

    from padim_hf.fit import model_device

    assert model_device(SimpleNamespace(device=torch.device("cpu", 0))) == torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    before = model.weight.data_ptr()
    model.to(model_device(SimpleNamespace(device=torch.device("cpu", 0))))
    assert model.weight.data_ptr() == before


def test_dataset_shards_are_contiguous_cover_every_row_once_and_may_be_empty():
    from datasets import Dataset

    from padim_hf.data import dataset_shard

    rows = Dataset.from_dict({"index": list(range(5))})
    assert [dataset_shard(rows, rank, 3)["index"] for rank in range(3)] == [[0, 1], [2, 3], [4]]
    two = Dataset.from_dict({"index": [0, 1]})  # fit and evaluate of 2 images on 3 processes: the last gets none
    assert [list(dataset_shard(two, rank, 3)["index"]) for rank in range(3)] == [[0], [1], []]


def test_the_progress_bar_knows_its_total_for_a_list_of_images(train_paths, monkeypatch):
    """A list of images (what the Space passes) gives the progress bar a total, so it can show a bar; a generator
    cannot tell its length and gets none."""
    import padim_hf.fit as fit_module

    totals = []

    class RecordingBar(fit_module.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fit_module, "tqdm", RecordingBar)
    accelerator = make_accelerator(cpu=True)
    for data in ([PIL.Image.open(p) for p in train_paths], (str(p) for p in train_paths)):
        fit_padim(build_model("padim-lite0-offline", **SMALL), data, batch_size=2, accelerator=accelerator, holdout_fraction=0)
    assert totals == [len(train_paths), None]
