"""Values the library and the command line share, importable without PyTorch: the command line builds every
command's options (their defaults, choices and help) from them before it imports anything heavy, so
`padim-hf COMMAND --help` answers at once. The library modules import them from here: one source of truth.

Only the standard library may be imported here (tests/test_front_door.py checks that `--help` imports no torch).
"""

import argparse

DEFAULT_PRESET = "padim-lite0-offline"

# PadimConfig fields a preset's value can be overridden for (`build_config(..., n_features=32)`, `--n-features 32`).
CONFIG_FIELDS = ("backbone", "layers", "n_features", "seed", "image_size", "crop_size", "epsilon", "blur_sigma", "covariance_storage")
# Help text of the command-line flag overriding each field (see PadimConfig for the details).
CONFIG_FIELD_HELP = {
    "backbone": "timm backbone name, e.g. resnet18, wide_resnet50_2",
    "layers": "backbone feature stages whose maps form the embedding, e.g. 1 2 3",
    "n_features": "embedding channels kept, chosen at random (the paper's Rd)",
    "seed": "seed of that random choice of channels",
    "image_size": "images are resized to this size (pixels)",
    "crop_size": "centre crop after the resize (the paper: 256 then 224)",
    "epsilon": "added to every covariance diagonal (regularisation)",
    "blur_sigma": "sigma of the Gaussian blur of anomaly maps (0: none)",
    "covariance_storage": "float16 (half the size on disk and in memory) or float32",
}

# Good-only calibration at fit time (padim_hf.calibration).
DEFAULT_FALSE_ALARM_RATE = 0.01
DEFAULT_HOLDOUT_FRACTION = 0.1

# Pixel-metric protocols of evaluate_padim (padim_hf.evaluate), export formats, and predict's engines.
PROTOCOLS = ("model", "original")
FORMATS = ("onnx", "openvino")
ENGINES = ("torch", "onnxruntime", "openvino")

AUTO = "auto"  # --image-size auto / auto:SIDE: the training images' aspect ratio (padim_hf.resolution)


def parse_size(text: str) -> int | list[int]:
    """`"256"` -> 256 (a square), `"256x192"` -> [256, 192] (HEIGHTxWIDTH). argparse type for --crop-size."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 256 or 256x192 (HEIGHTxWIDTH), got {text!r}")
    return sides[0] if len(sides) == 1 else sides


def parse_image_size(text: str) -> int | list[int] | str:
    """argparse type for --image-size: a size (`parse_size`), `auto` or `auto:SIDE` (kept as text, resolved from the
    training images by `padim_hf.resolution.resolve_image_size`)."""
    lowered = str(text).lower()
    if lowered == AUTO:
        return AUTO
    if lowered.startswith(AUTO + ":"):
        side = parse_size(lowered.split(":", 1)[1])
        if not isinstance(side, int):
            raise argparse.ArgumentTypeError(f"auto:SIDE takes one side (the pixel count of SIDE x SIDE), got {text!r}")
        return f"{AUTO}:{side}"
    return parse_size(text)


def parse_memory(text: str) -> int:
    """'8GB', '8 GiB', '512MB', '2e9' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    cleaned = str(text).strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ValueError(f"expected a memory size such as 8GB, 512MiB or 2e9 (bytes), got {text!r}")
    return int(value * units[unit])
