"""One image decoder everywhere: processor, CLI (data.py), pipeline and Space give the same map for the same file."""

import importlib.util
import os
import socket
import struct
import threading
import time
import tomllib
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

import padim_hf
from padim_hf import PadimImageProcessor
from padim_hf.data import Collator, image_list
from padim_hf.image_processing_padim import to_rgb_uint8

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lite0_weights) -> Path:
    from padim_hf import PadimModel

    from .conftest import small_lite0_config

    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = PadimModel(small_lite0_config()).load_backbone_weights(lite0_weights).fit([images])
    directory = tmp_path_factory.mktemp("decoding") / "model"
    model.save_pretrained(directory)
    return directory


def rotated_jpeg(path: Path) -> np.ndarray:
    """A 48 x 32 (W x H) photo stored sideways with EXIF orientation 6, as phones write them; returns the upright
    pixels a viewer shows (32 x 48)."""
    rng = np.random.default_rng(0)
    upright = np.clip(rng.normal(128, 30, (48, 32, 3)), 0, 255).astype(np.uint8)
    upright[10:20, 5:12] = (250, 20, 20)  # an asymmetric mark, so a wrong rotation changes the map
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # rotated 90 degrees counter-clockwise on disk
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    PIL.Image.fromarray(stored).save(path, quality=95, exif=exif)
    return upright


def test_one_exif_rotated_jpeg_gives_identical_maps_through_all_four_entry_points(model_dir, tmp_path):
    from padim_hf import PadimModel

    path = tmp_path / "phone.jpg"
    rotated_jpeg(path)
    model = PadimModel.from_pretrained(model_dir)
    processor = PadimImageProcessor.from_pretrained(model_dir)

    # 1. the image processor given the file path
    with torch.no_grad():
        output = model(processor([str(path)], return_tensors="pt")["pixel_values"])
    upright_size = (48, 32)  # (H, W) as viewed
    by_processor = processor.post_process_anomaly_maps(output.anomaly_map, [upright_size])[0].numpy()
    # 2. the CLI's data path (padim-hf predict / evaluate)
    batch = Collator(processor, with_images=True)(list(image_list([path])))
    with torch.no_grad():
        output = model(batch["pixel_values"])
    by_cli = processor.post_process_anomaly_maps(output.anomaly_map, batch["sizes"])[0].numpy()
    # 3. the pipeline
    by_pipeline = pipeline("anomaly-detection", model=str(model_dir))(str(path))["anomaly_map"]
    # 4. the Space
    space = load_space(model_dir)
    by_space, _ = space.DETECTOR.predict(space.sys.modules["detector"].load_image(path, space.DETECTOR.processor.decode))

    assert by_processor.shape == (48, 32)
    for name, anomaly_map in {"CLI": by_cli, "pipeline": by_pipeline, "Space": by_space}.items():
        assert anomaly_map.shape == (48, 32), name
        np.testing.assert_allclose(anomaly_map, by_processor, rtol=1e-5, atol=1e-5, err_msg=name)


def load_space(model_dir: Path):
    previous = os.environ.get("PADIM_MODEL")
    os.environ["PADIM_MODEL"] = str(model_dir)
    try:
        spec = importlib.util.spec_from_file_location("padim_space_app_decoding", REPO_ROOT / "spaces" / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("PADIM_MODEL")
        else:
            os.environ["PADIM_MODEL"] = previous
    assert module.DETECTOR is not None, module.LOAD_MESSAGE
    return module


def saved(image: PIL.Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_every_mode_is_decoded_by_value(tmp_path):
    gray = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (6, 1))  # (6, 30)
    expected = np.repeat(gray[..., None], 3, axis=-1)
    palette = PIL.Image.fromarray(gray).convert("P")
    cases = {
        "int32 holding 8-bit values": gray.astype(np.int32),
        "int64 holding 16-bit values": gray.astype(np.int64) * 257,
        "uint16 array": gray.astype(np.uint16) * 257,
        "16-bit PNG": saved(PIL.Image.fromarray(gray.astype(np.uint16) * 257), tmp_path / "16.png"),
        "palette PNG": saved(palette, tmp_path / "p.png"),
        "LA PNG, opaque": saved(PIL.Image.fromarray(gray).convert("LA"), tmp_path / "la.png"),
        "CMYK TIFF": saved(PIL.Image.fromarray(expected).convert("CMYK"), tmp_path / "cmyk.tif"),
        "bool array": gray > 100,
    }
    for name, image in cases.items():
        want = np.repeat(((gray > 100) * 255).astype(np.uint8)[..., None], 3, -1) if name == "bool array" else expected
        np.testing.assert_allclose(to_rgb_uint8(image).astype(int), want.astype(int), atol=1, err_msg=name)


def test_transparent_palette_and_la_pixels_are_white(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)  # black, fully transparent
    la_png = saved(PIL.Image.fromarray(la, "LA"), tmp_path / "la.png")
    palette = PIL.Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette_png = saved(palette, tmp_path / "p.png", transparency=0)
    for path in (la_png, palette_png):
        assert (to_rgb_uint8(path) == 255).all(), path.name


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid grayscale PNG of width x height zeros: a few hundred kB on disk, width * height bytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_huge_images_are_refused_from_their_header(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png", 12_000, 12_000)  # 144 MP: under Pillow's own bomb limit
    assert bomb.stat().st_size < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"bomb.png is 12000x12000 pixels \(144 MP\).*refused before decoding"):
        to_rgb_uint8(bomb)
    assert time.perf_counter() - started < 1.0  # nothing was decoded


def test_pipeline_url_fetch_times_out(model_dir):
    import padim_hf.pipeline_padim as pipeline_module

    assert 0 < pipeline_module.URL_TIMEOUT <= 60  # a default exists and is finite
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts the connection, never answers
    url = f"http://127.0.0.1:{server.getsockname()[1]}/part.png"
    detector = pipeline("anomaly-detection", model=str(model_dir))
    outcome = {}

    def call():
        try:
            detector(url, timeout=0.5)
        except Exception as error:  # noqa: BLE001 - the outcome is inspected below
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(20)
    server.close()
    assert not thread.is_alive(), "the pipeline hung on a server that never answers"
    assert "timed out" in str(outcome.get("error")).lower()


def test_numpy_floor_matches_the_code():
    floor = next(d for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("numpy"))
    major = int(floor.split(">=")[1].split(".")[0])
    uses_numpy_2 = any("np.trapezoid" in path.read_text() for path in Path(padim_hf.__file__).parent.glob("*.py"))
    assert major >= 2 or not uses_numpy_2, f"pyproject allows {floor} but padim_hf calls np.trapezoid (NumPy 2)"
    space_floor = [line for line in (REPO_ROOT / "spaces" / "requirements.txt").read_text().splitlines() if line.startswith("numpy")]
    assert space_floor == [floor.split(",")[0]]
