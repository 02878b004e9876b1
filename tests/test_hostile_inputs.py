"""Hostile inputs: each gets a clear error naming the problem, or a correct result. `CASES` counts them."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from padim_hf import PadimImageProcessor, PadimModel
from padim_hf.cli import main as cli
from padim_hf.data import Collator, image_list, mvtec_split
from padim_hf.image_processing_padim import to_rgb_uint8

from .conftest import small_lite0_config


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, lite0_weights) -> Path:
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights).fit([images])
    directory = tmp_path_factory.mktemp("hostile") / "model"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_and_processor(saved_model):
    return PadimModel.from_pretrained(saved_model), PadimImageProcessor.from_pretrained(saved_model)


def png_bytes(image: PIL.Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and has no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


PHOTO = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))

# name -> (file name, file bytes, expected): a regex the error must match (and it must name the file), or the
# (height, width) of the correct anomaly map.
FILE_CASES = {
    "zero-byte file": ("empty.png", b"", "cannot read image .*empty.png"),
    "truncated PNG": ("cut.png", png_bytes(PHOTO)[:300], "cannot read image .*cut.png"),
    "truncated JPEG": ("cut.jpg", png_bytes(PHOTO, "JPEG")[:400], "cannot read image .*cut.jpg"),
    "text file named .jpg": ("notes.jpg", b"quality report, line 3\n" * 10, "cannot read image .*notes.jpg"),
    "JPEG named .png (wrong extension)": ("photo.png", png_bytes(PHOTO, "JPEG"), (40, 60)),
    "PNG named .bmp (wrong extension)": ("photo.bmp", png_bytes(PHOTO), (40, 60)),
    "1x1 image": ("dot.png", png_bytes(PIL.Image.new("RGB", (1, 1), "red")), (1, 1)),
    "20000x20 image": ("strip.png", png_bytes(PIL.Image.new("L", (20_000, 20), 128)), (20, 20_000)),
    "20x20000 image": ("column.png", png_bytes(PIL.Image.new("L", (20, 20_000), 128)), (20_000, 20)),
    "decompression bomb header (400 MP)": ("bomb.png", png_header_only(20_000, 20_000), "bomb.png .*20000x20000|bomb.png is refused"),
    "oversized header (144 MP)": ("large.png", png_header_only(12_000, 12_000), r"large.png is 12000x12000 pixels"),
    "16-bit grayscale PNG": ("deep.png", png_bytes(PIL.Image.fromarray(np.full((30, 20), 40000, np.uint16))), (30, 20)),
    "CMYK JPEG": ("print.jpg", png_bytes(PHOTO.convert("CMYK"), "JPEG"), (40, 60)),
    "palette PNG with transparency": ("logo.png", png_bytes(PHOTO.convert("P")), (40, 60)),
    "LA PNG": ("la.png", png_bytes(PHOTO.convert("LA")), (40, 60)),
    "animated GIF (first frame)": ("anim.gif", png_bytes(PHOTO.convert("P"), "GIF"), (40, 60)),
    "float TIFF outside [0, 1]": ("float.tif", png_bytes(PIL.Image.fromarray(np.full((8, 8), 200.0, np.float32)), "TIFF"), r"image .*float.tif: float images must lie in \[0, 1\]"),
    "32-bit TIFF beyond 16 bits": ("wide.tif", png_bytes(PIL.Image.fromarray(np.full((8, 8), 1 << 20, np.int32)), "TIFF"), r"image .*wide.tif: .*got 1048576..1048576"),
}

ARRAY_CASES = {
    "NaN float image": (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
    "inf float image": (np.full((8, 8), np.inf, np.float32), "NaN or infinite"),
    "float image outside [0, 1]": (np.full((8, 8, 3), 3.0, np.float32), r"must lie in \[0, 1\], got 3..3"),
    "negative integer image": (np.full((8, 8), -5, np.int32), r"0..255 \(8-bit\) or 0..65535 \(16-bit\), got -5..-5"),
    "integer image beyond 16 bits": (np.full((8, 8), 70000, np.int64), "got 70000..70000"),
    "2-channel array": (np.zeros((8, 8, 2), np.uint8), r"got \(8, 8, 2\)"),
    "5-channel array": (np.zeros((8, 8, 5), np.uint8), r"got \(8, 8, 5\)"),
    "4-D array": (np.zeros((1, 8, 8, 3), np.uint8), r"got \(1, 8, 8, 3\)"),
    "empty array": (np.zeros((0, 8, 3), np.uint8), r"got \(0, 8, 3\)"),
    "complex array": (np.zeros((8, 8), np.complex64), "unsupported image dtype complex64"),
}

TENSOR_CASES = {
    "NaN pixel values": (torch.full((1, 3, 64, 64), float("nan")), "NaN or infinite"),
    "inf pixel values": (torch.full((1, 3, 64, 64), float("inf")), "NaN or infinite"),
    "1-channel pixel values": (torch.zeros(1, 1, 64, 64), r"got \(1, 1, 64, 64\)"),
    "4-channel pixel values": (torch.zeros(1, 4, 64, 64), r"got \(1, 4, 64, 64\)"),
    "wrong-size pixel values": (torch.zeros(1, 3, 32, 32), r"shape \(batch, 3, 64, 64\)"),
    "3-D pixel values": (torch.zeros(3, 64, 64), r"got \(3, 64, 64\)"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_hostile_file_through_the_cli_data_path(case, model_and_processor, tmp_path):
    name, content, expected = FILE_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    model, processor = model_and_processor
    collate = Collator(processor, with_images=True)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            collate(list(image_list([path])))
        return
    batch = collate(list(image_list([path])))
    with torch.no_grad():
        output = model(batch["pixel_values"])
    (anomaly_map,) = processor.post_process_anomaly_maps(output.anomaly_map, batch["sizes"])
    assert tuple(anomaly_map.shape) == expected
    assert torch.isfinite(anomaly_map).all() and anomaly_map.min() >= 0


@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_hostile_array_is_refused_naming_the_problem(case):
    array, message = ARRAY_CASES[case]
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(array)


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_hostile_pixel_values_are_refused_naming_the_problem(case, model_and_processor):
    pixel_values, message = TENSOR_CASES[case]
    with pytest.raises(ValueError, match=message):
        model_and_processor[0](pixel_values)


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def tamper_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def tamper_weights(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


CHECKPOINT_CASES = {
    "config with a tampered image size": (lambda d: tamper_config(d, image_size=96), r"gaussian.mean has shape \(256, 24\) in the checkpoint, \(576, 24\)"),
    "config with tampered n_features": (
        lambda d: tamper_config(d, n_features=10, feature_indices=list(range(10))), r"gaussian.mean has shape \(256, 24\) in the checkpoint, \(256, 10\)"
    ),
    "config with feature_indices out of range": (lambda d: tamper_config(d, feature_indices=list(range(170, 194))), "feature_indices must lie in 0..175"),
    "config that is not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json|JSON|json"),
    "config of another model type": (lambda d: tamper_config(d, model_type="bert"), "padim|bert|model type"),
    "checkpoint missing a tensor": (lambda d: tamper_weights(d, lambda t: t.pop("gaussian.mean")), r"missing tensors \['gaussian.mean'\]"),
    "checkpoint with an extra tensor": (
        lambda d: tamper_weights(d, lambda t: t.__setitem__("gaussian.inverse_covariance", torch.zeros(3))), "unexpected tensors.*gaussian.inverse_covariance"
    ),
    "checkpoint with a NaN Gaussian": (
        lambda d: tamper_weights(d, lambda t: t["gaussian.mean"].fill_(float("nan"))), "non-finite values in gaussian.mean"
    ),
    "weights file truncated": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "safetensors|model.safetensors|Error|error"
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_tampered_model_directory_is_refused_naming_the_problem(case, saved_model, tmp_path):
    tamper, message = CHECKPOINT_CASES[case]
    directory = copy_model(saved_model, tmp_path / "model")
    tamper(directory)
    with pytest.raises((ValueError, OSError, KeyError)) as error:
        PadimModel.from_pretrained(directory)
    assert pytest.importorskip("re").search(message, str(error.value)), str(error.value)


def without_file_permission_override() -> list[str]:
    """A command prefix under which chmod 000 really denies reads.

    Root reads anything (CAP_DAC_OVERRIDE), and CI runs as root: there the command runs with those capabilities
    dropped (util-linux `setpriv`), so the permission-denied path is exercised, not assumed.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root without util-linux's setpriv: cannot drop CAP_DAC_OVERRIDE to test denied reads")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def run_denied(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*without_file_permission_override(), sys.executable, *arguments],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_unreadable_training_folder_is_a_one_line_error_and_no_model(tmp_path, lite0_weights):
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    PIL.Image.new("RGB", (16, 16)).save(good / "000.png")
    good.chmod(0)
    try:
        result = run_denied(
            ["-m", "padim_hf.cli", "fit", "--data", "data", "--output-dir", "model", "--cpu",
             "--backbone-weights", str(lite0_weights), "--n-features", "8", "--image-size", "32"],
            cwd=tmp_path,
        )
    finally:
        good.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Permission denied" in result.stderr and "good" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


def test_unreadable_image_file_is_an_error_naming_it(model_and_processor, saved_model, tmp_path):
    path = tmp_path / "locked.png"
    PIL.Image.new("RGB", (16, 16)).save(path)
    path.chmod(0)
    script = (
        "import sys\n"
        "from padim_hf import PadimImageProcessor\n"
        "from padim_hf.data import Collator, image_list\n"
        f"collate = Collator(PadimImageProcessor.from_pretrained({str(saved_model)!r}))\n"
        "try:\n"
        "    collate(list(image_list(['locked.png'])))\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    try:
        result = run_denied(["-c", script], cwd=tmp_path)
    finally:
        path.chmod(0o644)
    assert result.returncode == 3, result.stderr
    assert "cannot read image locked.png" in result.stdout and "Permission denied" in result.stdout, result.stdout
    # Readable again, the same file decodes: the error was the permission, not the image.
    assert Collator(model_and_processor[1])(list(image_list([path])))["pixel_values"].shape == (1, 3, 64, 64)


def test_unfitted_model_directory_is_one_line_from_the_cli(tmp_path, capsys):
    PadimModel(small_lite0_config()).save_pretrained(tmp_path / "unfitted")
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "part.png")
    with pytest.raises(SystemExit):
        cli(["predict", "--model", str(tmp_path / "unfitted"), str(tmp_path / "part.png"), "--output-dir", str(tmp_path / "out"), "--cpu"])
    error = capsys.readouterr().err
    assert "not fitted" in error and "Traceback" not in error


CASES = len(FILE_CASES) + len(ARRAY_CASES) + len(TENSOR_CASES) + len(CHECKPOINT_CASES) + 3


def test_the_suite_tries_at_least_forty_hostile_inputs():
    assert CASES >= 40, CASES
