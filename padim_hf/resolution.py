"""Choosing the model's input size: sizes written on the command line, and the training images' own aspect ratio.

`image_size` is one side (a square) or [height, width]. On the command line: `256`, `256x192` (HEIGHTxWIDTH, as
in the config) or `auto` / `auto:384`: the training images' aspect ratio at the pixel count of the preset's size (or
of 384 x 384), each side a multiple of the grid's stride (4 for the presets' backbones). All training images of one product should
share one aspect ratio; `auto` refuses a set that does not, naming the sizes and files.
"""

import io
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import PIL.Image
import timm
import torch

from .configuration_padim import format_size, height_width
from .options import AUTO, parse_image_size, parse_size

logger = logging.getLogger(__name__)

# Two image sizes "share" an aspect ratio when their width/height ratios differ by less than this (rounding of a
# camera's crop, e.g. 1130 x 460 and 1128 x 459).
ASPECT_TOLERANCE = 0.01
# A model whose input aspect ratio differs from the training images' by more than this squashes them: warned.
SQUASH_WARNING = 0.10
ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate by 90 degrees (width and height swap)


def is_auto(size) -> bool:
    return isinstance(size, str) and (size == AUTO or size.startswith(AUTO + ":"))


def grid_stride(backbone: str, layers: Iterable[int]) -> int:
    """The stride (reduction) of the first used stage of `backbone`, whose grid the Gaussians sit on: input sides that
    are multiples of it map exactly onto the grid. Built on the meta device (no weights)."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, features_only=True)
    return model.feature_info.reduction()[min(layers)]


def image_size_on_disk(image, name: str) -> tuple[int, int]:
    """(width, height) of an image as it is viewed (EXIF rotation applied), read from its header only."""
    if isinstance(image, Mapping):  # a `datasets` image left undecoded: {"path", "bytes"}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    if isinstance(image, PIL.Image.Image):
        opened, close = image, False
    else:
        try:
            opened, close = PIL.Image.open(image), True
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image {name}: {error}") from error
    try:
        width, height = opened.size
        if opened.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        return width, height
    finally:
        if close:
            opened.close()


def training_image_sizes(dataset) -> dict[tuple[int, int], list[str]]:
    """{(width, height): [names]} of a `datasets.Dataset` with an "image" column (and optionally "path"), read from
    the file headers without decoding."""
    sizes: dict[tuple[int, int], list[str]] = {}
    paths = dataset["path"] if "path" in (dataset.column_names or []) else None
    for index, image in enumerate(dataset["image"]):
        name = paths[index] if paths else f"row {index}"
        sizes.setdefault(image_size_on_disk(image, name), []).append(name)
    return sizes


def describe_sizes(sizes: Mapping[tuple[int, int], list[str]], examples: int = 3) -> str:
    """"900 x 900 (58 images, e.g. a.png, b.png); 1024 x 768 (2 images: c.png, d.png)" (width x height)."""
    parts = []
    for (width, height), names in sorted(sizes.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(Path(name).name for name in names[:examples])
        more = f", e.g. {shown}" if len(names) > examples else f": {shown}"
        parts.append(f"{width} x {height} ({len(names)} image{'s' * (len(names) != 1)}{more})")
    return "; ".join(parts)


def common_aspect(sizes: Mapping[tuple[int, int], list[str]]) -> float | None:
    """The width/height ratio all `sizes` share (within `ASPECT_TOLERANCE`), or None when they do not."""
    ratios = [width / height for width, height in sizes]
    if not ratios:
        raise ValueError("no training images to read the aspect ratio from")
    low, high = min(ratios), max(ratios)
    if high / low - 1 > ASPECT_TOLERANCE:
        return None
    # The ratio of the largest group stands for all (the others differ by rounding only).
    (width, height), _ = max(sizes.items(), key=lambda item: len(item[1]))
    return width / height


def native_image_size(aspect: float, pixels: int, multiple: int) -> list[int]:
    """[height, width] with width/height ~ `aspect` and ~`pixels` pixels, each side a multiple of `multiple`."""
    height = math.sqrt(pixels / aspect)
    width = height * aspect
    return [max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple)]


def resolve_image_size(spec: str, sizes: Mapping[tuple[int, int], list[str]], base_size, backbone: str, layers) -> list[int]:
    """The [height, width] `auto` / `auto:SIDE` stands for: the training images' aspect ratio at the pixel count of
    `base_size` (the preset's image_size) or SIDE x SIDE, sides multiples of the grid's stride (`grid_stride`).

    Raises ValueError, naming sizes and files, when the training images do not share one aspect ratio.
    """
    aspect = common_aspect(sizes)
    if aspect is None:
        raise ValueError(
            f"--image-size {spec} needs training images of one aspect ratio, but they come in several sizes: "
            f"{describe_sizes(sizes)} (width x height). Fit one model per camera setting, or give --image-size "
            "HEIGHTxWIDTH explicitly"
        )
    if spec == AUTO:
        height, width = height_width(base_size)
    else:
        height = width = int(spec.split(":", 1)[1])
    size = native_image_size(aspect, height * width, grid_stride(backbone, layers))
    logger.info(
        "--image-size %s: training images are %s (width x height); the model resizes to %s (height x width)",
        spec, describe_sizes(sizes), format_size(size),
    )
    return size


def warn_if_squashed(image_size, sizes: Mapping[tuple[int, int], list[str]]) -> str | None:
    """Logs (and returns) a warning when the training images' aspect ratio differs from the model's input by more
    than `SQUASH_WARNING`, or when the images come in several aspect ratios; None when all is well."""
    aspect = common_aspect(sizes)
    height, width = height_width(image_size)
    if aspect is None:
        message = (
            f"training images have several aspect ratios: {describe_sizes(sizes)} (width x height); each is resized to "
            f"{format_size(image_size)} (height x width), so they are distorted differently"
        )
    elif abs(math.log(aspect / (width / height))) > math.log1p(SQUASH_WARNING):
        (image_width, image_height), _ = max(sizes.items(), key=lambda item: len(item[1]))
        message = (
            f"training images are {image_width} x {image_height} (width x height) but the model resizes them to "
            f"{format_size(image_size)} (height x width): they are stretched {max(aspect * height / width, width / height / aspect):.2f}x "
            "along one axis. --image-size auto keeps their aspect ratio (sizes are HEIGHTxWIDTH)"
        )
    else:
        return None
    logger.warning(message)
    return message


__all__ = [
    "parse_image_size",
    "parse_size",
    "resolve_image_size",
    "training_image_sizes",
    "warn_if_squashed",
]
