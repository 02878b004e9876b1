"""Memory of large grids (issue 18): the per-position figures padim_hf states are the bytes its tensors hold, the fit's
memory does not grow with the number of images, and a fit that would not fit is refused before any work."""

import math

import psutil
import pytest
import torch
from safetensors import safe_open

import padim_hf.fit
from padim_hf import PadimModel
from padim_hf.cli import main as cli_main
from padim_hf.demo import make_demo_dataset
from padim_hf.fit import fit_padim, make_accelerator
from padim_hf.memory import (
    ESTIMATE_MARGIN,
    InsufficientMemoryError,
    checkpoint_bytes_per_position,
    estimate_fit_memory,
    parse_memory,
    statistics_bytes_per_position,
    stored_bytes_per_position,
)
from tests.conftest import small_lite0_config


def nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def test_stated_bytes_per_position_are_what_the_tensors_hold_and_do_not_grow_with_the_images(lite0_weights, tmp_path):
    config = small_lite0_config(image_size=[48, 80], n_features=26)  # 26: uneven block rows
    model = PadimModel(config).load_backbone_weights(lite0_weights)
    positions = model.num_positions
    assert estimate_fit_memory(config).positions == positions == 12 * 20
    images = torch.randn(12, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    statistics = model.collect_statistics([images[:3]])
    held = nbytes([statistics.shift, statistics.shifted_sum, *statistics.shifted_outer.blocks])
    assert held == positions * statistics_bytes_per_position(26)
    statistics = model.collect_statistics([images[3:7], images[7:]], statistics=statistics)
    assert statistics.count == 12
    assert nbytes([statistics.shift, statistics.shifted_sum, *statistics.shifted_outer.blocks]) == held  # flat in N
    model.set_gaussian(statistics, release_statistics=True)
    assert nbytes(model.gaussian.buffers()) == positions * stored_bytes_per_position(26, "float16")
    model.save_pretrained(tmp_path / "model")
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as checkpoint:
        gaussian = [checkpoint.get_tensor(key) for key in checkpoint.keys() if key.startswith("gaussian.")]
    assert nbytes(gaussian) == positions * checkpoint_bytes_per_position(26, "float16")


def test_memory_sizes_parse():
    assert parse_memory("8GB") == 8 * 10**9 and parse_memory("6 GiB") == 6 * 2**30 and parse_memory("2e9") == 2 * 10**9
    for bad in ("", "lots", "-1GB", "8XB"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_fit_over_the_memory_limit_is_refused_before_the_backbone_runs(lite0_weights, monkeypatch):
    model = PadimModel(small_lite0_config(image_size=[48, 80])).load_backbone_weights(lite0_weights)
    need = estimate_fit_memory(model.config, batch_size=4)
    monkeypatch.setattr(model, "embed", lambda *args: pytest.fail("the backbone ran"))
    images = torch.rand(4, 3, 60, 100, generator=torch.Generator().manual_seed(0))  # images in [0, 1], any size
    accelerator = make_accelerator(cpu=True)
    needed = math.ceil(need.total * ESTIMATE_MARGIN)  # the estimate with the margin measured peaks need
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .*use fewer features \(e.g. --n-features \d+\)"):
        fit_padim(model, list(images), batch_size=4, accelerator=accelerator, memory_limit=needed - 1, holdout_fraction=0)
    monkeypatch.undo()
    fitted = fit_padim(model, list(images), batch_size=4, accelerator=accelerator, memory_limit=needed, holdout_fraction=0)
    assert fitted.config.num_train_images == 4  # at the limit it runs


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("memory") / "part", n_train=12, n_test_good=1, n_test_defect=1, size=48)


@pytest.mark.parametrize(
    "flags, condition",
    [
        (["--memory-limit", "1MB"], "an injected limit"),
        # 4096 x 4096 at 176 channels: 1024 x 1024 positions x ~80 KB of sums, beyond this machine's RAM
        (["--image-size", "4096", "--n-features", "176"], "the machine's available memory"),
    ],
)
def test_cli_refuses_a_fit_that_would_not_fit_before_any_work(small_folder, tmp_path, monkeypatch, capsys, flags, condition):
    if condition == "the machine's available memory":
        big = padim_hf.fit.build_config("padim-lite0-offline", image_size=4096, n_features=176)[0]
        assert estimate_fit_memory(big).total > psutil.virtual_memory().available  # the condition this case tests
    monkeypatch.setattr(padim_hf.fit, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(padim_hf.fit, "fit_padim", lambda *a, **k: pytest.fail("the fit started"))
    output = tmp_path / "model"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--data", str(small_folder), "--output-dir", str(output), "--cpu", *flags])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "padim-hf fit: error: this fit needs about" in message and "--n-features" in message and "--image-size" in message
    assert not output.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a staging folder
