"""Image processor for PaDiM: any image -> RGB -> resize -> (centre crop) -> normalise; maps back to image size."""

import io
import struct
from pathlib import Path
from typing import IO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling

from .configuration_padim import PadimConfig


# Larger images are refused from their header, before any pixel is decoded: a 100 MP RGB image already needs 300 MB
# decoded, and a small compressed file can claim billions of pixels (a decompression bomb).
MAX_IMAGE_PIXELS = 100_000_000
ORIENTATION = 0x0112  # EXIF tag
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def check_image_size(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image {name} is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image {name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP): images over "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP are refused before decoding"
        )


def load_image(source: str | Path | bytes | IO[bytes], name: str | None = None) -> PIL.Image.Image:
    """Opens and decodes an image file (a path, its bytes or a file object) with its EXIF orientation applied.

    The size is checked from the header first (`MAX_IMAGE_PIXELS`); an unreadable, corrupt, truncated or oversized
    file raises ValueError naming it (`name`, else the path).
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "(bytes)")
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with PIL.Image.open(opened) as image:
            check_image_size(image.width, image.height, name)
            image.load()
            return apply_orientation(image)
    except PIL.Image.DecompressionBombError as error:  # Pillow's own limit, raised while reading the header
        raise ValueError(f"image {name} is refused before decoding: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        if isinstance(error, ValueError) and str(error).startswith("image "):
            raise
        raise ValueError(f"cannot read image {name}: {error or type(error).__name__}") from error


def apply_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as it is meant to be viewed: phone cameras store pixels sideways and an EXIF rotation tag."""
    if image.getexif().get(ORIENTATION, 1) == 1:
        return image
    return PIL.ImageOps.exif_transpose(image)


def pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """A PIL image of any mode as an (H, W[, C]) array: palette, CMYK, YCbCr... converted by Pillow, alpha kept
    for compositing, 16/32-bit and float modes kept as they are (scaled by `to_rgb_uint8`)."""
    image = apply_orientation(image)
    if image.mode in SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # declared 16-bit: scaled by 65535 whatever the values
    if image.mode in ("I", "F"):
        return np.asarray(image)
    if "A" in image.getbands() or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def to_rgb_uint8(image, name: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8 array from a file path, file bytes, PIL image, numpy array or tensor. The one image decoder of
    padim_hf: the processor, the CLI, the pipeline and the Space all go through it, so an image gives the same map
    whichever way it comes in.

    - EXIF orientation is applied; palette, CMYK and other modes are converted by Pillow.
    - Grayscale is replicated; alpha (LA, RGBA, palette transparency) is composited on white.
    - uint8 is taken as it is; declared 16-bit images (PIL `I;16`, numpy uint16) are scaled by 65535; other integer
      arrays by their value range: values up to 255 are 8-bit, up to 65535 16-bit, anything else is an error.
    - Floats must be finite and lie in [0, 1]. Channel-first arrays and tensors (C, H, W), C in {1, 3, 4}, are accepted.
    """
    if isinstance(image, (str, Path, bytes)):
        image = load_image(image, name)
    if isinstance(image, PIL.Image.Image):
        check_image_size(image.width, image.height, name or "(PIL image)")
        image = pil_to_array(image)
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    try:
        return array_to_rgb_uint8(image, name)
    except ValueError as error:
        if name is None or str(error).startswith("image "):
            raise
        raise ValueError(f"image {name}: {error}") from error  # e.g. a float TIFF out of range, named


def array_to_rgb_uint8(image: np.ndarray, name: str | None = None) -> np.ndarray:
    original_shape = image.shape
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] > 4:  # (C, H, W)
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W[, 1|3|4]) or (1|3|4, H, W), got {original_shape}")
    check_image_size(image.shape[1], image.shape[0], name or "(array)")
    pixels = unit_range(image)
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3] * pixels[..., 3:] + (1.0 - pixels[..., 3:])
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def unit_range(image: np.ndarray) -> np.ndarray:
    """float32 pixels in [0, 1] from an array of any supported dtype (see `to_rgb_uint8`)."""
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype.kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 65535:
            raise ValueError(f"integer image values must lie in 0..255 (8-bit) or 0..65535 (16-bit), got {low}..{high}")
        return image.astype(np.float32) / (255.0 if high <= 255 else 65535.0)
    if image.dtype.kind == "f":
        pixels = image.astype(np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("float image contains NaN or infinite values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"float images must lie in [0, 1], got {pixels.min():g}..{pixels.max():g}")
        return pixels
    raise ValueError(f"unsupported image dtype {image.dtype}")


def decode_image(image, name: str | None = None) -> PIL.Image.Image:
    """The RGB PIL image `to_rgb_uint8` makes of any input: what the model sees, at the size its map comes back."""
    return PIL.Image.fromarray(to_rgb_uint8(image, name))


class PadimImageProcessor(TorchvisionBackend):
    """Resize to `size` (height x width, square or not), optionally centre-crop, normalise. `post_process_anomaly_maps`
    undoes the geometry.

    Any input becomes 8-bit RGB first (see `to_rgb_uint8`), so grayscale, RGBA and 16-bit images work.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 256, "width": 256}
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def from_padim_config(cls, config: PadimConfig) -> "PadimImageProcessor":
        (height, width), (crop_height, crop_width) = config.resize_size, config.input_size
        return cls(
            size={"height": height, "width": width},
            do_center_crop=config.crop_size is not None,
            crop_size={"height": crop_height, "width": crop_width},
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )

    def decode(self, image, name: str | None = None) -> PIL.Image.Image:
        """Any input (path, bytes, PIL image, array, tensor) as the RGB image the model sees (`to_rgb_uint8`): EXIF
        orientation applied, so its size is the one `post_process_anomaly_maps` should restore."""
        return decode_image(image, name)

    def process_image(self, image, *args, **kwargs) -> Tensor:
        kwargs["input_data_format"] = "channels_last"
        return super().process_image(to_rgb_uint8(image), *args, **kwargs)

    def post_process_anomaly_maps(self, anomaly_maps: Tensor, target_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Anomaly maps (B, 1, h, w) of processed images -> list of (H, W) maps at each original image size.

        The centre crop is undone by extending the border values (the cropped-away margin was never seen), the
        resize by bilinear interpolation, so non-square images get non-square maps.
        """
        if len(target_sizes) != len(anomaly_maps):
            raise ValueError(f"got {len(anomaly_maps)} maps but {len(target_sizes)} target sizes")
        maps = anomaly_maps
        if self.do_center_crop:
            full_h, full_w = self.size["height"], self.size["width"]
            crop_h, crop_w = maps.shape[-2:]
            top, left = (full_h - crop_h) // 2, (full_w - crop_w) // 2
            maps = F.pad(maps, (left, full_w - crop_w - left, top, full_h - crop_h - top), mode="replicate")
        return [
            F.interpolate(single[None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
            for single, size in zip(maps, target_sizes)
        ]


__all__ = ["MAX_IMAGE_PIXELS", "PadimImageProcessor", "decode_image", "load_image", "to_rgb_uint8"]
