"""Turning raw anomaly scores and maps into what people look at: normalised scores, labels, heatmap overlays."""

import matplotlib
import numpy as np
import PIL.Image

from .configuration_padim import PadimConfig


def normalized_score(score: float | np.ndarray, config: PadimConfig) -> float | np.ndarray | None:
    """Score in [0, 1] with the calibrated image threshold at 0.5 (anomalib's min-max convention), or None
    when the model has no threshold and score range."""
    if None in (config.image_threshold, config.score_min, config.score_max):
        return None
    spread = max(config.score_max - config.score_min, 1e-12)
    return np.clip((np.asarray(score) - config.image_threshold) / spread + 0.5, 0.0, 1.0)


def overlay_heatmap(
    image: PIL.Image.Image, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5, cmap: str = "jet"
) -> PIL.Image.Image:
    """`image` blended with a colour-mapped `anomaly_map` (H, W at the image's size), scaled from vmin to vmax."""
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"map {anomaly_map.shape} does not match image {image.height}x{image.width}")
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    return PIL.Image.blend(image.convert("RGB"), PIL.Image.fromarray(colours), alpha)
