"""A user's files are sacred: --overwrite, predict's outputs, crash-safety, what a push publishes, CLI messages."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch
from huggingface_hub import snapshot_download

from padim_hf import predict as predict_module
from padim_hf.cli import main as cli
from padim_hf.demo import make_demo_dataset
from padim_hf.files import atomic_model_directory, dataset_reference

from .test_hub import hub, hub_env  # noqa: F401  (the loopback Hub fixtures)

FAST_FIT = ["--config", "padim-lite0-offline", "--image-size", "64", "--n-features", "16", "--cpu", "--batch-size", "4"]



def run_cli(*args) -> None:
    cli([str(a) for a in args])


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=4, n_test_good=1, n_test_defect=1, size=64)


@pytest.fixture(scope="module")
def fitted_dir(demo_data, tmp_path_factory) -> Path:
    """A real model fitted by the CLI on a dataset given by its absolute path, then evaluated (metrics written)."""
    model = tmp_path_factory.mktemp("models") / "model"
    run_cli("fit", "--data", demo_data.resolve(), "--output-dir", model, *FAST_FIT)
    run_cli("evaluate", "--model", model, "--data", demo_data.resolve(), "--cpu", "--batch-size", "4")
    return model


def fake_model(directory: Path, marker: str) -> Path:
    """A directory that passes for a saved PaDiM model (config of model_type padim, a weights file)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "padim", "marker": marker}))
    (directory / "model.safetensors").write_bytes(marker.encode())
    return directory


def marker_of(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text())["marker"]


# --- 1. --overwrite replaces only a PaDiM model, crash-safely ----------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_padim_model(demo_data, tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit):
        run_cli("fit", "--data", demo_data, "--output-dir", folder, "--overwrite", *FAST_FIT)
    assert "not a PaDiM model directory" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "my notes"


def test_overwrite_refuses_a_model_directory_holding_other_files(tmp_path):
    target = fake_model(tmp_path / "model", "old")
    (target / "customer-list.xlsx").write_text("private")
    with pytest.raises(FileExistsError, match="customer-list.xlsx"):
        with atomic_model_directory(target, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
    assert (target / "customer-list.xlsx").read_text() == "private" and marker_of(target) == "old"


def test_overwrite_replaces_a_padim_model_and_an_empty_folder(tmp_path):
    for target in (fake_model(tmp_path / "model", "old"), tmp_path / "empty"):
        target.mkdir(exist_ok=True)
        with atomic_model_directory(target, overwrite=True) as staging:
            fake_model(staging / "x", "new")  # content is written inside the staging directory
            for path in (staging / "x").iterdir():
                path.rename(staging / path.name)
            (staging / "x").rmdir()
        assert marker_of(target) == "new"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left beside


CRASH = """
import os, pathlib, sys
from padim_hf.files import atomic_model_directory
target = pathlib.Path(sys.argv[1])
real_rename = pathlib.Path.rename
def rename(self, destination):
    if pathlib.Path(destination) == target and ".partial-" in self.name:
        os._exit(3)  # the process dies just before the new model is renamed into place
    return real_rename(self, destination)
pathlib.Path.rename = rename
with atomic_model_directory(target, overwrite=True) as staging:
    (staging / "config.json").write_text('{"model_type": "padim", "marker": "new"}')
    (staging / "model.safetensors").write_bytes(b"new")
"""


def test_a_crash_mid_overwrite_keeps_the_old_model_and_the_next_write_restores_it(tmp_path, caplog):
    target = fake_model(tmp_path / "model", "old")
    result = subprocess.run([sys.executable, "-c", CRASH, str(target)], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    # The old model survives complete, under a name that says what it is (never a blind delete).
    survivors = [p for p in [target, *tmp_path.glob(".model.previous-*")] if (p / "config.json").is_file()]
    assert [marker_of(p) for p in survivors] == ["old"]
    caplog.set_level(logging.WARNING)
    with pytest.raises(FileExistsError):  # the next write first puts the old model back, then refuses as usual
        with atomic_model_directory(target, overwrite=False):
            pass
    assert marker_of(target) == "old" and "restored" in caplog.text
    assert not list(tmp_path.glob(".model.previous-*"))


def test_an_aside_copy_left_after_the_swap_is_named_not_deleted(tmp_path, caplog):
    target = fake_model(tmp_path / "model", "new")
    aside = fake_model(tmp_path / ".model.previous-123-456", "old")  # a crash after the rename, before the delete
    caplog.set_level(logging.WARNING)
    with atomic_model_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text('{"model_type": "padim", "marker": "newer"}')
        (staging / "model.safetensors").write_bytes(b"newer")
    assert marker_of(target) == "newer" and marker_of(aside) == "old"
    assert aside.name in caplog.text


def test_save_fitted_refuses_a_folder_of_other_models(tmp_path, small_model):
    from padim_hf.fit import save_fitted

    models = tmp_path / "models"
    fake_model(models / "bottle", "bottle")
    with pytest.raises(FileExistsError, match="not a PaDiM model directory"):
        save_fitted(small_model, models, overwrite=True)
    assert marker_of(models / "bottle") == "bottle"


# --- predict never replaces a file --------------------------------------------------------------------------------


def test_predict_refuses_to_write_over_its_inputs(fitted_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    PIL.Image.new("RGB", (40, 30), "gray").save(photos / "part.png")
    before = (photos / "part.png").read_bytes()
    with pytest.raises(SystemExit):
        run_cli("predict", "--model", fitted_dir, photos, "--output-dir", photos, "--cpu")
    error = capsys.readouterr().err
    assert "refusing to overwrite" in error and "part.png" in error
    assert (photos / "part.png").read_bytes() == before
    assert sorted(p.name for p in photos.iterdir()) == ["part.png"]


def test_predict_refuses_to_replace_an_existing_result(fitted_dir, tmp_path, capsys):
    image = tmp_path / "part.png"
    PIL.Image.new("RGB", (40, 30), "gray").save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("someone else's table")
    with pytest.raises(SystemExit):
        run_cli("predict", "--model", fitted_dir, image, "--output-dir", out, "--cpu")
    assert "predictions.csv" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == "someone else's table"


def test_interrupted_predict_says_what_it_wrote(fitted_dir, tmp_path, monkeypatch, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for index in range(3):
        PIL.Image.new("RGB", (32, 32), (index * 40, 90, 90)).save(images / f"{index}.png")
    real_overlay, calls = predict_module.overlay_heatmap, []

    def overlay_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(predict_module, "overlay_heatmap", overlay_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("predict", "--model", fitted_dir, images, "--output-dir", tmp_path / "out", "--cpu", "--batch-size", "1")
    error = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert "nothing was written" not in error and "1 of 3 heatmaps were written" in error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png"]


# --- 5. CLI errors ------------------------------------------------------------------------------------------------


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(predict_module, "predict", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not swallowed into a one-line message
        run_cli("predict", "--model", tmp_path, tmp_path, "--output-dir", tmp_path / "out")


def test_input_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "part.png")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("predict", "--model", missing, tmp_path, "--output-dir", tmp_path / "out")
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in error and str(missing) in error
    assert len(error.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        run_cli("--debug", "predict", "--model", missing, tmp_path, "--output-dir", tmp_path / "out")


# --- 2. nothing private leaves the machine ------------------------------------------------------------------------


def test_dataset_references_are_hub_ids_or_folder_names(tmp_path):
    folder = tmp_path / "customer-acme" / "bottle"
    folder.mkdir(parents=True)
    assert dataset_reference(str(folder)) == "bottle"
    assert dataset_reference(str(folder) + "/") == "bottle"
    assert dataset_reference("org/mvtec-bottle") == "org/mvtec-bottle"
    assert dataset_reference(None) is None


def test_push_sends_the_allow_list_and_no_local_path(fitted_dir, hub_env, tmp_path_factory, tmp_path):
    from padim_hf import push_model

    private_root = str(tmp_path_factory.getbasetemp())  # every temporary path of this test session lies under it
    stored = json.loads((fitted_dir / "config.json").read_text())
    assert private_root not in json.dumps(stored)  # fit and evaluate store no local path
    model = tmp_path / "to-push"
    model.mkdir()
    for path in fitted_dir.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    # An older model whose config still carries absolute paths, and stray private files in the directory.
    stored["train_dataset"] = str(tmp_path / "customer-acme" / "bottle")
    (model / "config.json").write_text(json.dumps(stored))
    (model / "notes.txt").write_text(f"calibrated on {tmp_path}/line-3")
    (model / "data").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(model / "data" / "customer-part.png")
    (model / ".env").write_text("HF_TOKEN=secret")
    (model / "calibrate_line3.py").write_text(f"DATA = '{tmp_path}/line-3'")  # a user's script is not model code
    (model / "onnx").mkdir()  # an exported model is part of the model
    (model / "onnx" / "model.onnx").write_bytes(b"exported graph")
    push_model(model, "tester/private-check")
    local = Path(snapshot_download("tester/private-check", local_dir=tmp_path / "download"))
    pushed = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert "notes.txt" not in pushed and "data/customer-part.png" not in pushed and ".env" not in pushed
    assert "calibrate_line3.py" not in pushed
    assert "onnx/model.onnx" in pushed
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "gallery.png"} <= set(pushed)
    assert {"modeling_padim.py", "pipeline_padim.py"} <= set(pushed)
    for name in pushed:
        content = (local / name).read_bytes()
        assert private_root.encode() not in content, f"{name} leaks a local path"
        assert b"customer-acme" not in content, f"{name} leaks a local folder name above the dataset"
    assert json.loads((local / "config.json").read_text())["train_dataset"] == "bottle"
    assert (model / "notes.txt").is_file() and json.loads((model / "config.json").read_text()) == stored  # untouched


def test_evaluate_config_rewrite_is_atomic(fitted_dir, tmp_path, monkeypatch):
    from padim_hf import PadimModel
    from padim_hf import files
    from padim_hf.evaluate import update_config_file

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in fitted_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    before = (model_dir / "config.json").read_text()
    model = PadimModel.from_pretrained(model_dir)
    model.config.image_threshold = 42.0

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped after the new config was written, before the rename

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        update_config_file(model_dir, model)
    assert (model_dir / "config.json").read_text() == before
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(p.name for p in fitted_dir.iterdir())  # no temp left
    monkeypatch.undo()
    update_config_file(model_dir, model)
    assert json.loads((model_dir / "config.json").read_text())["image_threshold"] == 42.0
