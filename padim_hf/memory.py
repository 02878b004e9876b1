"""How much memory a fit needs, computed from the config before anything runs, and the refusal of a fit that would
not fit in the machine's memory (instead of the operating system killing it halfway).

The grid has P = ceil(H / r) x ceil(W / r) positions (r: the first used stage's stride), so P grows with the image
area, and each position holds C x C sums: the Gaussian is P x C^2. Per position, with C channels, E the entries of
the 4 lower block rows the sums and factors are kept in (`LowerBlockRows`: 10/16 of C^2 for C divisible by 4) and s
the factor's storage bytes (2 for float16):

- fit statistics (`PatchStatistics`, the whole fit): shift 4C + shifted sum 8C + outer sums 4E bytes;
- finalising adds the float64 mean (8C) and, while the factor is converted to its storage dtype block by block, one
  block in storage (s x largest block); with good-only calibration (held-out images scored against the Gaussian of
  the others) a second, float32 factor (4E) exists while the statistics are kept;
- the fitted model's Gaussian: mean 4C + factor s x E bytes in memory, 4C + s x C(C+1)/2 in the checkpoint.

Nothing of this depends on the number of training images (the fit streams); only the held-out calibration images
(at most 500, kept as pixel values) and one batch's embedding (3 x P x B x C x 4 bytes) and backbone activations
(traced on the meta device, no memory used) come on top.
"""

import math
import os
import weakref
from dataclasses import dataclass

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .configuration_padim import PadimConfig, format_size
from .options import parse_memory  # noqa: F401  (padim_hf.memory.parse_memory, as before)
from .gaussian import FINALISE_CHUNK, LowerBlockRows

GIB = 2**30
# Measured fit peaks (RSS added by the fit, `padim-hf sweep` on bottle and cookie, Lite0, 256-592 px) came out 0.94x to
# 1.19x this estimate: decoding full-resolution images, the processor's temporaries and the allocator's fragmentation
# are not modelled. A fit is refused when the estimate times this margin exceeds the memory available.
ESTIMATE_MARGIN = 1.25


class InsufficientMemoryError(ValueError):
    """A fit refused before it starts: its estimated peak exceeds the memory available (a ValueError: the CLI reports
    it in one line, as a problem with the requested settings)."""


def lower_block_entries(channels: int) -> tuple[int, int]:
    """(entries of all lower block rows, entries of the largest block) of one C x C matrix (`LowerBlockRows`)."""
    bounds = LowerBlockRows.bounds(channels)
    sizes = [(stop - start) * stop for start, stop in zip(bounds, bounds[1:])]
    return sum(sizes), max(sizes)


def statistics_bytes_per_position(channels: int) -> int:
    """Bytes of the fit's streamed statistics per grid position: shift (float32), sum (float64), outer sums (float32)."""
    entries, _ = lower_block_entries(channels)
    return 4 * channels + 8 * channels + 4 * entries


def stored_bytes_per_position(channels: int, storage: str = "float16") -> int:
    """Bytes of the fitted Gaussian per grid position in memory: float32 mean and the factor's block rows in `storage`."""
    entries, _ = lower_block_entries(channels)
    return 4 * channels + torch.finfo(getattr(torch, storage)).bits // 8 * entries


def checkpoint_bytes_per_position(channels: int, storage: str = "float16") -> int:
    """Bytes of the Gaussian per grid position in the checkpoint: float32 mean and the packed lower triangle."""
    return 4 * channels + torch.finfo(getattr(torch, storage)).bits // 8 * channels * (channels + 1) // 2


def grid_positions(config: PadimConfig) -> int:
    """P for `config`, from the backbone's first used stage stride (built on the meta device: no weights)."""
    import timm

    with torch.device("meta"):
        backbone = timm.create_model(config.backbone, pretrained=False, features_only=True)
    reduction = backbone.feature_info.reduction()[config.layers[0]]
    height, width = config.input_size
    return math.ceil(height / reduction) * math.ceil(width / reduction)


class _LiveBytes(TorchDispatchMode):
    """Tracks the peak of the bytes held by tensors that operations create (freed when Python drops them)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or func in (torch.ops.aten.detach.default,):
            return out  # in-place ops and aliases allocate nothing new
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                size = tensor.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def backbone_activation_bytes(config: PadimConfig, batch_size: int) -> tuple[int, int]:
    """(weight bytes, peak activation bytes of one batch) of `config`'s truncated backbone in float32, from a forward
    pass on the meta device: no weights are loaded and no memory is used."""
    from .modeling_padim import create_backbone

    with torch.device("meta"):
        backbone = create_backbone(config)
        pixel_values = torch.empty(batch_size, 3, *config.input_size)
    weights = sum(t.numel() * t.element_size() for t in [*backbone.parameters(), *backbone.buffers()])
    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        features = backbone(pixel_values)
        del features
    return weights, tracker.peak


@dataclass(frozen=True)
class FitMemory:
    """The peak memory of a fit, in bytes, by part (see the module docstring)."""

    positions: int
    channels: int
    input_size: tuple[int, int]
    batch_size: int
    held_out_images: int
    statistics: int  # streamed sums, for the whole fit
    finalising: int  # float64 mean, storage conversion, the calibration Gaussian, one chunk being factorised
    batch: int  # one batch's embedding, its centred copy and the gather temporary
    backbone: int  # weights + peak activations of one batch
    held_out: int  # pixel values of the held-out calibration images
    per_position: int  # statistics + finalising bytes of one grid position (the part that grows with the area)

    @property
    def total(self) -> int:
        return self.statistics + self.finalising + self.batch + self.backbone + self.held_out

    def describe(self) -> str:
        height, width = self.input_size
        return (
            f"{self.total / GIB:.2f} GiB for {format_size(self.input_size)} input (height x width), a grid of "
            f"{self.positions} positions x {self.channels} channels: Gaussian statistics "
            f"{(self.statistics + self.finalising) / GIB:.2f} GiB ({self.per_position / 1024:.1f} KiB per position), "
            f"one batch of {self.batch_size} {(self.batch + self.backbone) / GIB:.2f} GiB, "
            f"{self.held_out_images} held-out images {self.held_out / GIB:.2f} GiB"
        )


def estimate_fit_memory(config: PadimConfig, batch_size: int = 16, held_out_images: int = 0, calibrate: bool | None = None) -> FitMemory:
    """The peak memory of fitting `config` (see the module docstring), computed without building the model.

    `held_out_images`: images kept as pixel values for good-only calibration (`calibrate` defaults to whether there
    are any: their Gaussian is a second factor next to the kept statistics).
    """
    positions, channels = grid_positions(config), config.n_features
    entries, largest_block = lower_block_entries(channels)
    storage = torch.finfo(getattr(torch, config.covariance_storage)).bits // 8
    calibrate = held_out_images > 0 if calibrate is None else calibrate
    finalising_per_position = 8 * channels + storage * largest_block + (4 * entries if calibrate else 0)
    # One chunk of positions factorised at a time: covariance (float64 at most), dense copy and factor.
    chunk = 3 * FINALISE_CHUNK * channels * channels * 8
    height, width = config.input_size
    weights, activations = backbone_activation_bytes(config, batch_size)
    return FitMemory(
        positions=positions,
        channels=channels,
        input_size=(height, width),
        batch_size=batch_size,
        held_out_images=held_out_images,
        statistics=positions * statistics_bytes_per_position(channels),
        finalising=positions * finalising_per_position + chunk,
        batch=3 * positions * batch_size * channels * 4,
        backbone=weights + activations,
        held_out=held_out_images * 3 * height * width * 4,
        per_position=statistics_bytes_per_position(channels) + finalising_per_position,
    )


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can be allocated now on `device`: the system's available RAM for the CPU (page cache counts as
    available), the free memory plus PyTorch's reusable cache on a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def check_fit_memory(
    config: PadimConfig,
    batch_size: int = 16,
    held_out_images: int = 0,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> FitMemory:
    """The fit's estimate; raises InsufficientMemoryError when it, times `ESTIMATE_MARGIN`, exceeds `limit` (default:
    `available_memory(device)`), with the figure and what to change. Call it before the fit: nothing has run or been written then."""
    device = torch.device(device)
    need = estimate_fit_memory(config, batch_size, held_out_images)
    allowed = limit is not None
    if limit is None:
        # Processes of one machine fit side by side, each with its own statistics: each may use its share.
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
        limit = available_memory(device) // max(sharing, 1)
    limit = int(limit)
    on_device = need.total - (need.held_out if device.type != "cpu" else 0)  # held-out images stay on the CPU
    if device.type != "cpu" and need.held_out > available_memory("cpu"):
        raise InsufficientMemoryError(
            f"{held_out_images} held-out calibration images need {need.held_out / GIB:.2f} GiB of RAM, more than is "
            "available: hold out fewer (--holdout-fraction) or use a smaller --image-size"
        )
    if on_device * ESTIMATE_MARGIN > limit:
        gaussian = need.statistics + need.finalising
        smaller = max(8, int(config.n_features * math.sqrt(limit / max(gaussian, 1) * 0.8)) // 4 * 4)
        raise InsufficientMemoryError(
            f"this fit needs about {need.describe()} (measured peaks run up to {ESTIMATE_MARGIN:.2f}x that: "
            f"{on_device * ESTIMATE_MARGIN / GIB:.2f} GiB); only {limit / GIB:.2f} GiB "
            f"{'is allowed' if allowed else 'is available'} on {device}. The Gaussian grows "
            f"with the grid area times n_features^2: use fewer features (e.g. --n-features {min(smaller, config.n_features)}), "
            f"a smaller --image-size (half the side: a quarter of the positions), a smaller --batch-size, or a "
            "machine with more memory"
        )
    return need


__all__ = [
    "FitMemory",
    "InsufficientMemoryError",
    "available_memory",
    "check_fit_memory",
    "checkpoint_bytes_per_position",
    "estimate_fit_memory",
    "statistics_bytes_per_position",
    "stored_bytes_per_position",
]
