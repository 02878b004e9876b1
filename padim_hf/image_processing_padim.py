"""Image processor for PaDiM: any image -> RGB -> resize -> (centre crop) -> normalise; maps back to image size."""

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling

from .configuration_padim import PadimConfig


def load_image(path: str | Path) -> PIL.Image.Image:
    """Opens and decodes an image file; an unreadable or corrupt file raises an error naming it."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def to_rgb_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 array from a file path, PIL image, numpy array or tensor of any common layout and bit depth.

    Grayscale is replicated, alpha is composited on white, 16-bit images are scaled to 8 bits, float images are
    taken to lie in [0, 1]. Channel-first arrays and tensors (C, H, W) with C in {1, 3, 4} are accepted.
    """
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.array(image)
        else:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            if has_alpha:
                rgba = image.convert("RGBA")
                image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return np.array(image.convert("RGB"))
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    original_shape = image.shape
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W[, 1|3|4]) or (1|3|4, H, W), got {original_shape}")
    if image.dtype == np.uint8:
        pixels = image.astype(np.float32) / 255.0
    elif image.dtype in (np.uint16, np.int32, np.int64) or (image.dtype.kind in "iu" and image.max() > 255):
        pixels = image.astype(np.float32) / 65535.0
    elif image.dtype.kind == "f":
        pixels = image.astype(np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("float images must hold finite values in [0, 1]")
    elif image.dtype == np.bool_ or image.dtype.kind in "iu":
        pixels = image.astype(np.float32) / (1.0 if image.dtype == np.bool_ else 255.0)
    else:
        raise ValueError(f"unsupported image dtype {image.dtype}")
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3] * pixels[..., 3:] + (1.0 - pixels[..., 3:])
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


class PadimImageProcessor(TorchvisionBackend):
    """Resize to a square, optionally centre-crop, normalise. `post_process_anomaly_maps` undoes the geometry.

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
        crop = config.crop_size or config.image_size
        return cls(
            size={"height": config.image_size, "width": config.image_size},
            do_center_crop=config.crop_size is not None,
            crop_size={"height": crop, "width": crop},
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )

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


__all__ = ["PadimImageProcessor"]
