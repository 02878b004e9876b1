"""The project's own synthetic "woven fabric" images, with and without defects (numpy + Pillow only).

Used for the Space's example images (`python synthetic.py` rewrites `examples/`) and, by the tests, for a
training set and for defects whose exact location is known. No MVTec image is redistributed.
"""

from pathlib import Path

import numpy as np
import PIL.Image

IMAGE_SIZE = 128
# Thread colours of the weave (RGB in [0, 1]): warp and weft.
WARP = np.array([0.62, 0.45, 0.30])
WEFT = np.array([0.80, 0.70, 0.52])
DEFECT_KINDS = ("stain", "scratch", "hole")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def fabric(seed: int, size: int = IMAGE_SIZE, noise: float = 0.0) -> np.ndarray:
    """(size, size, 3) uint8 image of a plain weave; `seed` shifts the weave and its shading.

    The weave is periodic with a short period, so the PNG stays a few KB; `noise` (std, in [0, 1] units) adds
    per-pixel noise for training sets, where file size does not matter.
    """
    rng = np.random.default_rng(seed)
    period = 8
    shift_y, shift_x = rng.integers(0, period, size=2)
    y, x = np.mgrid[0:size, 0:size]
    phase_y = 2 * np.pi * (y + shift_y) / period
    phase_x = 2 * np.pi * (x + shift_x) / period
    # Warp threads run vertically, weft threads horizontally; they alternate over/under in a checkerboard.
    over = np.sin(phase_x) * np.sin(phase_y) > 0
    # Each thread is brightest along its middle, so the weave has visible relief.
    thread_profile = 0.75 + 0.25 * np.abs(np.where(over, np.cos(phase_x / 2), np.cos(phase_y / 2)))
    image = np.where(over[..., None], WARP, WEFT) * thread_profile[..., None] * rng.uniform(0.95, 1.05)
    if noise > 0:
        image = image + rng.normal(0.0, noise, image.shape)
    return to_uint8(image)


def to_uint8(image: np.ndarray) -> np.ndarray:
    # Quantise to 32 levels per channel: invisible, and it keeps the committed PNGs small.
    levels = np.rint(np.clip(image, 0.0, 1.0) * 31) / 31
    return np.rint(levels * 255).astype(np.uint8)


def add_defect(image: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` with one defect of `kind` and its (H, W) bool ground-truth mask.

    The defect lies away from the border and covers a few percent of the image, the size of MVTec's defects.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"kind must be one of {DEFECT_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    centre_y, centre_x = rng.uniform(0.35, 0.65, size=2) * (height, width)
    y, x = np.mgrid[0:height, 0:width]
    result = image.astype(np.float64) / 255.0
    if kind == "stain":
        radius = 0.12 * min(height, width)
        mask = (y - centre_y) ** 2 + ((x - centre_x) / 1.4) ** 2 < radius**2
        result[mask] = 0.55 * result[mask] + 0.45 * np.array([0.15, 0.22, 0.10])  # dark green oil-like stain
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length, half_width = 0.45 * min(height, width), 2.0
        along = (x - centre_x) * np.cos(angle) + (y - centre_y) * np.sin(angle)
        across = -(x - centre_x) * np.sin(angle) + (y - centre_y) * np.cos(angle)
        mask = (np.abs(along) < length / 2) & (np.abs(across) < half_width)
        result[mask] = np.array([0.97, 0.96, 0.93])  # a bright, torn thread
    else:  # hole: the dark backing shows through
        radius = 0.08 * min(height, width)
        mask = (y - centre_y) ** 2 + (x - centre_x) ** 2 < radius**2
        result[mask] = np.array([0.05, 0.04, 0.04])
    return to_uint8(result), mask


def write_examples(directory: Path = EXAMPLES_DIR) -> list[Path]:
    """Writes the Space's example images: two good ones and one of each defect kind."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, seed in enumerate((101, 102), start=1):
        paths.append(directory / f"good_{index}.png")
        PIL.Image.fromarray(fabric(seed)).save(paths[-1], optimize=True)
    for offset, kind in enumerate(DEFECT_KINDS):
        image, _ = add_defect(fabric(200 + offset), kind, seed=300 + offset)
        paths.append(directory / f"{kind}.png")
        PIL.Image.fromarray(image).save(paths[-1], optimize=True)
    return paths


if __name__ == "__main__":
    for path in write_examples():
        print(f"{path} ({path.stat().st_size} bytes)")
