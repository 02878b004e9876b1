import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from safetensors.torch import load_file

from padim_hf.cli import main as cli
from padim_hf.demo import make_demo_dataset
from padim_hf.files import atomic_model_directory

FAST_FIT = ["--config", "padim-lite0-offline", "--image-size", "64", "--n-features", "32", "--cpu", "--batch-size", "2"]



@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=5, n_test_good=2, n_test_defect=2, size=64)


def run_cli(*args: str) -> None:
    cli([str(a) for a in args])


def gaussian_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(model_dir / "model.safetensors").items() if k.startswith("gaussian.")}


def test_fit_evaluate_predict_on_demo_data(demo_data, tmp_path, capsys):
    model = tmp_path / "model"
    run_cli("fit", "--data", demo_data, "--output-dir", model, *FAST_FIT)
    capsys.readouterr()
    run_cli("evaluate", "--model", model, "--data", demo_data, "--json", "--cpu", "--calibration-fraction", "0.5")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) >= {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max"}
    assert report["pixel_auroc"] > 0.9
    config = json.loads((model / "config.json").read_text())
    assert config["image_threshold"] == pytest.approx(report["image_threshold"])
    assert config["metrics"]["dataset"]["split"] == "test"
    assert (model / "gallery.png").is_file()
    wide = tmp_path / "wide.png"
    PIL.Image.open(demo_data / "test" / "stain" / "000.png").resize((90, 40)).save(wide)
    run_cli("predict", "--model", model, wide, demo_data / "test" / "good", "--output-dir", tmp_path / "out", "--cpu")
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(rows) == 3 and all(row["label"] in ("normal", "anomalous") for row in rows)
    # The images the thresholds were set on are marked: their verdicts are not test results.
    calibrated = set(config["calibration"]["images"])  # relative to the dataset folder
    root = demo_data.resolve()
    expected = {row["path"]: Path(row["path"]).resolve().is_relative_to(root)
                and Path(row["path"]).resolve().relative_to(root).as_posix() in calibrated for row in rows}
    assert {row["path"]: row["calibration_image"] for row in rows} == expected
    assert any(expected.values()) and not expected[str(wide)]
    with open(tmp_path / "out" / "predictions.csv") as handle:
        assert "calibration_image" in handle.readline()
    capsys.readouterr()
    run_cli("predict", "--model", model, wide, "--output-dir", tmp_path / "one", "--cpu")
    assert capsys.readouterr().out.startswith(f"1 heatmap and predictions.json/.csv in {tmp_path / 'one'}\n1 of 1 image flagged")
    assert PIL.Image.open(tmp_path / "out" / "wide.png").size == (90, 40)
    assert 0.0 <= rows[0]["normalized_score"] <= 1.0


def as_saved_hub_dataset(folder: Path, target: Path) -> Path:
    """The demo folder as a Hub-layout dataset (image + mask + label columns) saved with `save_to_disk`."""
    features = Features({"image": Image(), "mask": Image(), "label": Value("int64")})
    splits = {}
    for split in ("train", "test"):
        images = sorted((folder / split).glob("*/*.png"))
        masks = [folder / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in images]
        splits[split] = Dataset.from_dict(
            {
                "image": [str(p) for p in images],
                "mask": [str(m) if m.exists() else None for m in masks],
                "label": [int(p.parent.name != "good") for p in images],
            },
            features=features,
        )
    from datasets import DatasetDict

    DatasetDict(splits).save_to_disk(target)
    return target


def test_hub_layout_dataset_gives_the_same_model_and_metrics_as_the_folder(demo_data, tmp_path, capsys):
    saved = as_saved_hub_dataset(demo_data, tmp_path / "saved")
    run_cli("fit", "--data", demo_data, "--output-dir", tmp_path / "from_folder", *FAST_FIT)
    run_cli("fit", "--data", saved, "--output-dir", tmp_path / "from_hub", *FAST_FIT)
    torch.testing.assert_close(gaussian_of(tmp_path / "from_hub"), gaussian_of(tmp_path / "from_folder"))
    capsys.readouterr()
    reports = []
    for source in (demo_data, saved):
        run_cli("evaluate", "--model", tmp_path / "from_folder", "--data", source, "--json", "--no-save", "--cpu")
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert reports[0] == pytest.approx(reports[1])


def test_streamed_hub_repository_layout_gives_the_same_model(demo_data, tmp_path):
    # A Hub dataset repository as it looks on disk: data/<split>-*.parquet with embedded image bytes.
    images = sorted((demo_data / "train" / "good").glob("*.png"))
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in images], "label": [0] * len(images)}
    features = Features({"image": Image(), "label": Value("int64")})
    (tmp_path / "repo" / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    # No holdout: a stream holds images out by a content hash and adds them last, which changes the order of the
    # float32 sums (tests/test_calibration.py checks that merge against a plain fit).
    no_holdout = ("--holdout-fraction", "0")
    run_cli("fit", "--data", demo_data, "--output-dir", tmp_path / "from_folder", *FAST_FIT, *no_holdout)
    run_cli("fit", "--data", tmp_path / "repo", "--streaming", "--output-dir", tmp_path / "streamed", *FAST_FIT, *no_holdout)
    torch.testing.assert_close(gaussian_of(tmp_path / "streamed"), gaussian_of(tmp_path / "from_folder"))


def test_missing_folder_and_missing_train_good_are_named(tmp_path, capsys):
    for data, message in [(tmp_path / "nowhere", "dataset folder not found"), (tmp_path, "no train/good")]:
        with pytest.raises(SystemExit):
            run_cli("fit", "--data", data, "--output-dir", tmp_path / "m", *FAST_FIT)
        error = capsys.readouterr().err
        assert message in error and str(data) in error
    assert not (tmp_path / "m").exists()


def test_missing_model_directory_is_named(demo_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("evaluate", "--model", tmp_path / "no_model", "--data", demo_data, "--cpu")
    assert f"model directory not found: {tmp_path / 'no_model'}" in capsys.readouterr().err


def test_corrupt_training_image_fails_naming_it_and_leaves_no_model(demo_data, tmp_path, capsys):
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    (data / "train" / "good" / "003.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        run_cli("fit", "--data", data, "--output-dir", tmp_path / "model", *FAST_FIT)
    assert "train/good/003.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no model, no partial directory
    run_cli("fit", "--data", data, "--output-dir", tmp_path / "model", "--skip-unreadable", *FAST_FIT)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["num_train_images"] == 4


def test_mask_of_the_wrong_size_is_named(demo_data, tmp_path, capsys):
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    PIL.Image.new("L", (32, 32)).save(data / "ground_truth" / "stain" / "001_mask.png")
    run_cli("fit", "--data", data, "--output-dir", tmp_path / "model", *FAST_FIT)
    with pytest.raises(SystemExit):
        run_cli("evaluate", "--model", tmp_path / "model", "--data", data, "--cpu")
    assert "mask of" in (error := capsys.readouterr().err) and "stain/001.png is 32x32" in error


def test_interrupted_write_leaves_neither_model_nor_partial_directory(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_model_directory(target, overwrite=False) as staging:
            (staging / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_offline_preset_on_hazelnut_reaches_paper_level_pixel_auroc(hazelnut, tmp_path, capsys):
    model = tmp_path / "model"
    run_cli("fit", "--data", hazelnut, "--output-dir", model, "--config", "padim-lite0-offline", "--cpu")
    capsys.readouterr()
    run_cli("evaluate", "--model", model, "--data", hazelnut, "--json", "--cpu", "--calibration-fraction", "0.5")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pixel_auroc"] >= 0.97
    assert report["image_threshold"] is not None
    assert json.loads((model / "config.json").read_text())["image_threshold"] == pytest.approx(report["image_threshold"])
    tests = sorted((hazelnut / "test" / "crack").glob("*.png"))
    run_cli("predict", "--model", model, *tests, "--output-dir", tmp_path / "out", "--cpu")
    for path in tests:
        assert PIL.Image.open(tmp_path / "out" / f"{path.stem}.png").size == PIL.Image.open(path).size


@pytest.mark.slow
def test_presets_ship_with_a_regular_non_editable_install(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(repo)],
        check=True,
        capture_output=True,
    )
    script = "import padim_hf.fit as fit; print(fit.__file__); print(fit.load_preset('padim-wr50-rd550')['n_features'])"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, check=True,
    )
    module_file, n_features = result.stdout.split()
    assert Path(module_file).is_relative_to(target)  # the installed copy, not this checkout
    assert n_features == "550"
