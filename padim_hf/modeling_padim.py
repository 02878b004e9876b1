"""PaDiM: patch distribution modelling with a pretrained timm backbone (Defard et al. 2020)."""

import contextlib
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from huggingface_hub import constants
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_padim import PadimConfig, format_size
from .gaussian import (
    LowerBlockRows,
    PatchStatistics,
    mahalanobis_distances,
    pack_lower,
    unpack_lower,
    whitening_factors,
)

logger = logging.getLogger(__name__)
# `save_pretrained(push_to_hub=True, ...)` options passed on to transformers' `push_to_hub`.
PUSH_OPTIONS = ("commit_message", "commit_description", "create_pr", "token", "private", "revision", "tags")
# Positions unpacked per step when loading a packed factor: bounds the packed bytes in memory (WR50-Rd550 float16:
# 256 x 151525 x 2 B = 78 MB).
LOAD_CHUNK = 256


def explain_load_error(name_or_path, error: OSError) -> OSError:
    """A clearer error for loading an uncached repo id under HF_HUB_OFFLINE=1 (transformers only reports that it
    "couldn't connect"); other errors are returned as they are."""
    name = str(name_or_path)
    if not constants.is_offline_mode() or Path(name).exists():
        return error
    return OSError(
        f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
        f"downloading it: load it once while online (or `hf download {name}`), or unset HF_HUB_OFFLINE"
    )


class NotFittedError(RuntimeError):
    """Scoring with a model whose Gaussian was never fitted (a user's mistake, reported in one line by the CLI)."""


@dataclass
class PadimOutput(ModelOutput):
    """
    Args:
        anomaly_map (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`):
            Mahalanobis distance of each pixel's patch, upsampled to the input size and blurred with `blur_sigma`.
        pred_score (`torch.FloatTensor` of shape `(batch_size,)`):
            Image anomaly score: the maximum of `anomaly_map`.
        pred_label (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            `pred_score >= config.image_threshold`, when the model has a threshold (set by the fit from held-out good
            images, by `padim_hf.calibration.calibrate`, or by a labelled evaluation).
    """

    anomaly_map: torch.FloatTensor | None = None
    pred_score: torch.FloatTensor | None = None
    pred_label: torch.BoolTensor | None = None


TIMM_BUILDER_LOGGER = "timm.models._builder"  # where timm reports how pretrained weights loaded


class TimmLoadReport(logging.Filter):
    """What timm reports while loading pretrained weights into a features-only backbone.

    The ImageNet checkpoints hold a classifier head (and, for EfficientNets, the layers after the last stage) that a
    `features_only` model does not have, so timm warns "Unexpected keys (bn2..., classifier...) found" on every load:
    expected by design, so precisely that message is dropped. Missing keys are kept for the caller to refuse.
    """

    def __init__(self, shown_level: int):
        super().__init__()
        self.shown_level = shown_level  # the logger's level before: records below it are read, not shown
        self.missing: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Missing keys ("):
            keys = message[len("Missing keys (") :].split(")")[0].split(", ")
            self.missing = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        if message.startswith("Unexpected keys ("):
            return False
        return record.levelno >= self.shown_level

    @classmethod
    @contextlib.contextmanager
    def reading(cls, logger_name: str):
        """Yields the report of what `logger_name` logs meanwhile: the logger is opened to INFO (timm reports missing
        keys at INFO) with this filter, which lets through only what would have been shown anyway."""
        logger = logging.getLogger(logger_name)
        level = logger.level
        report = cls(logger.getEffectiveLevel())
        logger.addFilter(report)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        try:
            yield report
        finally:
            logger.setLevel(level)
            logger.removeFilter(report)


def create_backbone(config: PadimConfig, weights_file: str | None = None, pretrained: bool = False) -> nn.Module:
    """A timm `features_only` backbone returning `config.layers`, with no module after the last used stage.

    `pretrained` loads timm's weights: from `weights_file` (a local timm-format safetensors file) when given,
    else from the Hub.
    """
    overlay = dict(file=str(weights_file)) if weights_file is not None else None
    with TimmLoadReport.reading(TIMM_BUILDER_LOGGER) as report:
        backbone = timm.create_model(
            config.backbone,
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay,
            features_only=True,
            out_indices=tuple(config.layers),
        )
    if report.missing:  # timm only logs this (at INFO) and keeps random weights: a file for another architecture
        raise ValueError(
            f"the backbone weights{f' in {weights_file}' if weights_file else ''} do not fit {config.backbone!r}: "
            f"missing {report.missing}"
        )
    last_module = backbone.feature_info.module_name()[-1]
    # timm truncates FeatureListNet itself; EfficientNet-style extractors keep every block, so drop the unused ones.
    if last_module.startswith("blocks.") and hasattr(backbone, "blocks"):
        backbone.blocks = backbone.blocks[: int(last_module.split(".")[1]) + 1]
    return backbone.eval().requires_grad_(False)


def nearest_source_indices(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """(out_size,) source index of each output row under `F.interpolate(mode="nearest")`: floor(i * in / out).

    The scale is a float32 quotient, as in PyTorch's kernels, so the embedding equals the interpolated one exactly.
    """
    scale = torch.tensor(in_size, dtype=torch.float32, device=device) / out_size
    positions = torch.arange(out_size, dtype=torch.float32, device=device)
    return (positions * scale).floor().long().clamp_(max=in_size - 1)


def grid_shape(config: PadimConfig, reduction: int) -> tuple[int, int]:
    """(h, w) grid of the first used stage for `config.input_size`: each side divided by the stage's stride, rounded
    up (timm's convolutions pad, so a side of 65 at stride 4 gives 17 rows)."""
    height, width = config.input_size
    return math.ceil(height / reduction), math.ceil(width / reduction)


def keep_dtype(fn):
    """`fn` (a `Module._apply` conversion) limited to moving tensors: what device it would give is read from an
    empty tensor, so nothing is ever cast, not even temporarily."""

    def move(tensor: Tensor) -> Tensor:
        target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
        return tensor if target.device == tensor.device else tensor.to(target.device)

    return move


def upsample_blur_matrix(source: int, target: int, sigma: float, device: torch.device | None = None) -> Tensor:
    """(target, source) float32 matrix M: `M @ v` is the signal `v` (source,) upsampled linearly to `target` samples
    (`F.interpolate`'s `align_corners=False`) and then blurred by a normalised Gaussian of `sigma` with reflect
    padding (torchvision's `gaussian_blur`; no blur when `sigma` is 0).

    Both steps are linear and treat rows and columns alike, so a (h, w) distance map becomes the (H, W) anomaly map
    `rows @ map @ cols.T` with `rows = upsample_blur_matrix(h, H, sigma)` and `cols = upsample_blur_matrix(w, W,
    sigma)`: two GEMMs, built here by running the 1-D operations on the identity. GEMMs rather than a resize, a
    reflect pad and two convolutions because every runtime keeps a GEMM in the precision it is given: OpenVINO's CPU
    plugin rewrites a resize and a pad into new nodes that drop the IR's float32 marks and run in bfloat16 (see
    `export.export_openvino`). At 256 px from a 64 x 64 grid the two GEMMs take ~5M multiply-adds, as the blur did.
    """
    basis = torch.eye(source, dtype=torch.float32, device=device).unsqueeze(1)  # (source, 1, source)
    signals = F.interpolate(basis, size=target, mode="linear", align_corners=False)  # (source, 1, target)
    if sigma > 0:
        half = int(4.0 * sigma + 0.5)
        x = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
        weights = torch.softmax(-(x / sigma).pow(2) / 2, dim=0)  # exp(-x^2 / 2 sigma^2), normalised
        signals = F.conv1d(F.pad(signals, [half, half], mode="reflect"), weights.view(1, 1, -1))
    return signals.squeeze(1).T.contiguous()


class PadimGaussian(nn.Module):
    """Per-position Gaussians in the one form scoring uses: `mean` (P, C) float32 and the lower-triangular whitening
    factor W (W^T W = covariance^-1) as block rows `whitening_0..3` (see `LowerBlockRows`: 10/16 of the full
    matrices, each block a plain batched-GEMM operand) in `storage_dtype`. `forward` is pure tensor operations.

    The blocks stay in `storage_dtype` (float16 by default: half the memory of float32, 1.2 GB instead of 2.4 GB for
    WR50-Rd550) and scoring upcasts them a few positions at a time; as float16 is also what the checkpoint stores,
    a model scores the same before and after `save_pretrained`/`from_pretrained`. On disk the factor is
    `gaussian.whitening_packed` (P, C(C+1)/2), the packed lower triangle: a state-dict hook packs the blocks on save
    and a load pre-hook unpacks a packed factor straight into them; `PadimModel.from_pretrained` streams it from
    the checkpoint in chunks of positions.
    """

    PACKED = "whitening_packed"

    def __init__(self, num_positions: int, num_features: int, storage_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_features = num_features
        self.storage_dtype = storage_dtype
        self.register_buffer("mean", torch.zeros(num_positions, num_features, dtype=torch.float32))
        # Non-persistent: the state dict carries the packed factor instead (see the hooks below).
        for index, block in enumerate(LowerBlockRows.zeros(num_positions, num_features, dtype=storage_dtype).blocks):
            self.register_buffer(f"whitening_{index}", block, persistent=False)
        self.hide_packed = False  # set while transformers loads a checkpoint: the factor is streamed separately
        self._register_state_dict_hook(_add_packed_factor)
        self.register_load_state_dict_pre_hook(_load_packed_factor)

    @property
    def num_blocks(self) -> int:
        return len(LowerBlockRows.bounds(self.num_features)) - 1

    def whitening(self) -> LowerBlockRows:
        """The (P, C, C) whitening factors as the block-row buffers themselves (no copy, `storage_dtype`)."""
        return LowerBlockRows([getattr(self, f"whitening_{index}") for index in range(self.num_blocks)])

    def _set_blocks(self, whitening: LowerBlockRows) -> None:
        for index, block in enumerate(whitening.blocks):
            setattr(self, f"whitening_{index}", block)

    @torch.no_grad()
    def set_(self, mean: Tensor, whitening: LowerBlockRows) -> None:
        """Takes mean (P, C) and lower-triangular W (P, C, C) as the runtime Gaussian, W in `storage_dtype`.

        `whitening` is consumed: each block is taken out of it as it is converted (a block already in
        `storage_dtype` on the buffers' device is used as it is), so converting never holds more than one
        converted block next to the caller's factor.
        """
        device = self.mean.device
        self.release_()  # the old factor or placeholder goes before the new one is made
        self.mean = mean.float().to(device)
        converted = []
        while whitening.blocks:
            converted.append(whitening.blocks.pop(0).to(device=device, dtype=self.storage_dtype))
        self._set_blocks(LowerBlockRows(converted))

    def float32(self) -> "PadimGaussian":
        """This Gaussian with a float32 factor: itself when stored in float32, else a converted copy (what exported
        graphs hold: ONNX Runtime's and OpenVINO's GEMMs take float32 operands)."""
        if all(block.dtype == torch.float32 for block in self.whitening().blocks):
            return self
        copy = PadimGaussian(0, self.num_features, torch.float32).to(self.mean.device)
        copy.set_(self.mean, self.whitening())
        return copy

    def packed(self) -> Tensor:
        """(P, C(C+1)/2) packed lower triangle of W in `storage_dtype`: what the checkpoint stores."""
        return pack_lower(self.whitening(), dtype=self.storage_dtype)

    @torch.no_grad()
    def load_packed_(self, packed: Tensor | Callable[[slice], Tensor], num_positions: int | None = None) -> None:
        """Fills the blocks from a packed factor (P, C(C+1)/2), or from `packed(positions)` read chunk by chunk
        (a checkpoint slice), so at most one chunk of the packed factor is ever in memory next to the blocks."""
        read = packed if callable(packed) else packed.__getitem__
        positions = self.mean.shape[0] if num_positions is None else num_positions
        self.release_()
        whitening = LowerBlockRows.zeros(positions, self.num_features, dtype=self.storage_dtype, device=self.mean.device)
        for start in range(0, positions, LOAD_CHUNK):
            chunk = slice(start, min(start + LOAD_CHUNK, positions))
            values = read(chunk).to(self.mean.device)
            expected = (chunk.stop - chunk.start, self.num_features * (self.num_features + 1) // 2)
            if tuple(values.shape) != expected:
                raise ValueError(f"packed whitening factor has shape {tuple(values.shape)} at positions {chunk}, expected {expected}")
            unpack_lower(values, self.num_features, out=whitening.map(lambda block: block[chunk]))
        self._set_blocks(whitening)

    def release_(self) -> None:
        """Frees the factor buffers (an unfitted model's placeholder: 1.2 GB for WR50-Rd550 in float16)."""
        positions = self.mean.shape[0]
        self._set_blocks(self.whitening().map(lambda block: block.new_empty(positions, 0, 0)))

    def forward(self, embedding: Tensor) -> Tensor:
        """(B, h, w) Mahalanobis distances of an embedding (B, C, h, w)."""
        batch, channels, height, width = embedding.shape
        patches = embedding.float().flatten(2).permute(2, 0, 1)  # (P, B, C)
        distances = mahalanobis_distances(patches, self.mean.float(), self.whitening())  # upcasts W as it goes
        return distances.transpose(0, 1).reshape(batch, height, width)


def _add_packed_factor(module: PadimGaussian, state_dict: dict, prefix: str, local_metadata) -> None:
    if not module.hide_packed:
        state_dict[prefix + PadimGaussian.PACKED] = module.packed()


def _load_packed_factor(module: PadimGaussian, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    packed = state_dict.pop(prefix + PadimGaussian.PACKED, None)
    if packed is None:
        missing_keys.append(prefix + PadimGaussian.PACKED)
        return
    try:
        module.load_packed_(packed)
    except ValueError as error:
        error_msgs.append(str(error))


PACKED_KEY = f"gaussian.{PadimGaussian.PACKED}"


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@contextlib.contextmanager
def packed_factor_reader(state_dict: dict | None, checkpoint_files: list[str] | None):
    """Yields (read, shape) for the checkpoint's packed factor: `read(positions)` returns those rows as a new tensor.

    Rows are read from the .safetensors file with plain reads: a memory-mapped slice (safetensors' loader) would keep
    every page it touched in this process's resident memory until the file is closed (measured: +0.9 GB peak for
    WR50-Rd550), and safetensors 0.8's "pread" backend reads the whole tensor for each slice.
    """
    if state_dict is not None:
        packed = state_dict[PACKED_KEY]
        yield packed.__getitem__, tuple(packed.shape)
        return
    for file in checkpoint_files or ():
        if not str(file).endswith(".safetensors"):
            raise ValueError(f"{file}: PaDiM checkpoints are read from .safetensors files only")
        with open(file, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            entry = json.loads(handle.read(header_size)).get(PACKED_KEY)
            if entry is None:
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: {PACKED_KEY} has unsupported dtype {entry['dtype']}")
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
            offset = 8 + header_size + entry["data_offsets"][0]
            row_bytes = math.prod(shape[1:]) * dtype.itemsize

            def read(positions: slice) -> Tensor:
                first, stop, _ = positions.indices(shape[0])
                rows = torch.empty((stop - first, *shape[1:]), dtype=dtype)
                handle.seek(offset + first * row_bytes)
                if handle.readinto(memoryview(rows.view(torch.uint8).numpy()).cast("B")) != rows.numel() * dtype.itemsize:
                    raise ValueError(f"{file} is truncated: {PACKED_KEY} ends early")
                return rows

            yield read, shape
            return
    raise ValueError(f"no {PACKED_KEY} in {checkpoint_files}")


class PadimPreTrainedModel(PreTrainedModel):
    config_class = PadimConfig
    base_model_prefix = "padim"
    main_input_name = "pixel_values"
    # The Gaussian must never be cast to half precision by `dtype=`: distances of nearby points would cancel.
    _keep_in_fp32_modules_strict = ["gaussian"]
    # `device_map="auto"` must keep the model whole: the Gaussian is one block (PadimModel adds its backbone's class).
    _no_split_modules = ["PadimGaussian"]

    def _init_weights(self, module: nn.Module) -> None:
        # timm initialises the backbone and checkpoints carry every weight: transformers' re-initialisation in
        # post_init() would otherwise wipe pretrained backbone weights loaded in __init__.
        pass


class PadimModel(PadimPreTrainedModel):
    def __init__(self, config: PadimConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        self.grid_shape = grid_shape(config, self.backbone.feature_info.reduction()[0])
        self.gaussian = PadimGaussian(self.num_positions, config.n_features, getattr(torch, config.covariance_storage))
        self.register_buffer("feature_indices", torch.tensor(config.feature_indices), persistent=False)
        # The factor is saved in the dtype the config names at save time (it may be edited after a fit).
        self.register_state_dict_pre_hook(
            lambda module, prefix, keep_vars: setattr(module.gaussian, "storage_dtype", getattr(torch, module.config.covariance_storage))
        )
        # Where the backbone weights came from: None means timm's random initialisation.
        self.backbone_weights: str | None = None
        # Read by post_init: neither the backbone nor the Gaussian may be split across devices by device_map.
        self._no_split_modules = ["PadimGaussian", type(self.backbone).__name__]
        self.post_init()

    @property
    def num_positions(self) -> int:
        """P, the number of per-position Gaussians: grid height x grid width."""
        return self.grid_shape[0] * self.grid_shape[1]

    def _apply(self, fn, recurse: bool = True):
        """`.half()`, `.to(dtype)`, `.bfloat16()`... cast the backbone only: the Gaussian keeps its dtypes (float32
        mean, the configured storage for the factor) and only follows the device. Casting it would make distances
        of nearby points cancel; `from_pretrained(dtype=...)` is covered by `_keep_in_fp32_modules_strict`."""
        if not recurse:
            return super()._apply(fn, recurse=False)
        for module in self.children():
            module._apply(keep_dtype(fn) if module is self.gaussian else fn)
        return super()._apply(fn, recurse=False)

    def _init_weights(self, module: nn.Module) -> None:
        # Non-persistent buffers come back uninitialised from meta-device loading; refill them from the config.
        if module is self:
            self.feature_indices = torch.tensor(self.config.feature_indices, device=self.feature_indices.device)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "PadimModel":
        """transformers' loader, made strict: a checkpoint whose tensors do not match its config is an error.

        (transformers would re-initialise missing or mismatched tensors, i.e. silently randomise a backbone.)
        """
        from safetensors import SafetensorError

        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # report mismatches ourselves, with names and shapes
        name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:
            if "config" not in kwargs:  # transformers only warns when config.json names another model type
                options = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download")
                config_dict, _ = PadimConfig.get_config_dict(name, **{k: kwargs[k] for k in options if k in kwargs})
                if config_dict.get("model_type") != PadimConfig.model_type:
                    raise ValueError(f"{name} holds a {config_dict.get('model_type')!r} model, not a PaDiM model (model_type 'padim')")
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise ValueError(f"cannot read the weights of {name} (corrupt or truncated safetensors file): {error}") from error
        except OSError as error:  # e.g. an uncached repo id under HF_HUB_OFFLINE=1
            clearer = explain_load_error(name, error)
            if clearer is error:
                raise
            raise clearer from error
        problems = []
        missing = set(info.get("missing_keys") or ())
        source = model.__dict__.pop("_packed_factor_source", None)
        if source is None:
            missing.add(PACKED_KEY)
        if missing:
            problems.append(f"missing tensors {sorted(missing)}")
        unexpected = sorted(set(info.get("unexpected_keys") or ()) - {PACKED_KEY})
        if unexpected:  # a checkpoint of another layout: loading it would silently ignore parts of it
            problems.append(f"unexpected tensors {unexpected}")
        for key, *shapes in info.get("mismatched_keys") or []:
            problems.append(f"{key} has shape {tuple(shapes[0])} in the checkpoint, {tuple(shapes[1])} from the config")
        if source is not None:
            try:
                with packed_factor_reader(*source) as (read, shape):
                    expected = (model.gaussian.mean.shape[0], model.gaussian.num_features * (model.gaussian.num_features + 1) // 2)
                    if tuple(shape) != expected:
                        problems.append(f"{PACKED_KEY} has shape {tuple(shape)} in the checkpoint, {expected} from the config")
                    else:
                        model.gaussian.load_packed_(read)
            except SafetensorError as error:
                raise ValueError(f"cannot read the weights of {name} (corrupt or truncated safetensors file): {error}") from error
        if not problems:
            for key, tensor in model.gaussian.named_buffers(prefix="gaussian"):
                # float64 sums per chunk of positions: NaN and infinity propagate, finite values cannot overflow, no
                # tensor-sized mask; one whole-tensor sum(dtype=float64) would copy the tensor to float64 first
                # (measured: +1.8 GiB peak for WR50-Rd550's largest factor block).
                finite = all(torch.isfinite(chunk.sum(dtype=torch.float64)) for chunk in tensor.split(LOAD_CHUNK))
                if tensor.is_floating_point() and tensor.numel() and not finite:
                    problems.append(f"non-finite values in {key} (NaN or infinity)")
        if problems:
            raise ValueError(
                f"checkpoint does not match its config (backbone {model.config.backbone}, "
                f"n_features {model.config.n_features}, input size {format_size(model.config.input_size)}): " + "; ".join(problems)
            )
        model._init_weights(model)
        model.backbone_weights = "checkpoint"
        return (model, info) if output_loading_info else model

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # transformers would materialise the whole packed factor (0.95 GB for WR50-Rd550 in float16) next to the
        # unpacked blocks: hide it from its loader, which then reports it as unexpected, and stream it afterwards
        # (from_pretrained above), one chunk of positions at a time.
        model.gaussian.hide_packed = True
        try:
            info, offload = PreTrainedModel._load_pretrained_model(
                model, state_dict, checkpoint_files, load_config, *args, **kwargs
            )
        finally:
            model.gaussian.hide_packed = False
        if PACKED_KEY in info.unexpected_keys:
            info.unexpected_keys.discard(PACKED_KEY)
            model._packed_factor_source = (state_dict, checkpoint_files)
        return info, offload

    def save_pretrained(self, save_directory: str | Path, *args, push_to_hub: bool = False, **kwargs) -> None:
        """Saves config, weights and Gaussian (safetensors), the matching image processor, and the
        "anomaly-detection" pipeline code (config.json names it in `custom_pipelines` for `trust_remote_code` users).

        `push_to_hub=True` then uploads the same files with transformers' `push_to_hub` (its generic model card);
        `padim_hf.push` adds a card with the evaluation metrics and exported models.
        """
        from transformers.dynamic_module_utils import custom_object_save

        from .image_processing_padim import PadimImageProcessor
        from .pipeline_padim import AnomalyDetectionPipeline

        if not kwargs.get("is_main_process", True):
            return  # other processes of a distributed run write nothing (transformers would still create the folder)
        # transformers' own push would upload before the image processor and pipeline are written: push afterwards.
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_options = {key: kwargs.pop(key) for key in PUSH_OPTIONS if key in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        PadimImageProcessor.from_padim_config(self.config).save_pretrained(save_directory)
        custom_object_save(AnomalyDetectionPipeline, save_directory)
        if push_to_hub:
            self.push_to_hub(repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_options)

    def load_backbone_weights(self, source: str | Path | None = None) -> "PadimModel":
        """Loads ImageNet backbone weights: timm's from the Hub (`source=None`) or a local timm-format
        `.safetensors` file (air-gapped machines; see `padim_hf.weights`)."""
        if source is not None:
            source = Path(source)
            if not source.is_file():
                raise FileNotFoundError(f"backbone weights file not found: {source}")
            if source.suffix != ".safetensors":
                raise ValueError(f"backbone weights must be a .safetensors file (no pickle is loaded), got {source}")
        pretrained = create_backbone(self.config, weights_file=source, pretrained=True)
        device = next(self.backbone.parameters()).device
        self.backbone.load_state_dict(pretrained.state_dict())
        self.backbone.to(device)
        self.backbone_weights = str(source) if source is not None else f"timm:{self.config.backbone}"
        return self

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, C, h, w) float32 embedding: the selected channels of all layers on the first layer's grid.

        The tensor is stored position-major ((h, w, B, C) contiguous, returned as a permuted view), so the
        per-position statistics and distances read (P, B, C) patches without a transposing copy.
        """
        self._check_pixel_values(pixel_values)
        dtype = next(self.backbone.parameters()).dtype
        features = self.backbone(pixel_values.to(dtype))
        batch = pixel_values.shape[0]
        height, width = features[0].shape[-2:]
        if (height, width) != self.grid_shape:  # a backbone that rounds its strides otherwise than ceil
            raise RuntimeError(f"{self.config.backbone} gives a {height} x {width} grid for input {tuple(pixel_values.shape[-2:])}, "
                               f"expected {self.grid_shape[0]} x {self.grid_shape[1]}")
        embedding = features[0].new_empty(height, width, batch, self.config.n_features, dtype=torch.float32)
        start = channel = 0
        for feature in features:
            stop = start + feature.shape[1]
            in_layer = self.feature_indices[(self.feature_indices >= start) & (self.feature_indices < stop)] - start
            # Channels are selected before upsampling so unused channels are never upsampled.
            selected = feature[:, in_layer].permute(2, 3, 0, 1)  # (h_l, w_l, B, c_l)
            rows = nearest_source_indices(feature.shape[-2], height, feature.device)
            cols = nearest_source_indices(feature.shape[-1], width, feature.device)
            embedding[..., channel : channel + in_layer.numel()] = selected[rows[:, None], cols[None, :]]
            start, channel = stop, channel + in_layer.numel()
        return embedding.permute(2, 3, 0, 1)

    @torch.no_grad()
    def collect_statistics(
        self,
        batches: Iterable[Tensor | Mapping[str, Tensor]],
        statistics: PatchStatistics | None = None,
        allow_random_backbone: bool = False,
        statistics_device: torch.device | str | None = None,
    ) -> PatchStatistics | None:
        """Accumulates the patch statistics of every batch; memory does not grow with the number of images.

        Returns None when `batches` is empty (a process of a distributed fit may receive nothing).
        `statistics_device` (default: the model's) holds the statistics, e.g. the CPU when the model runs on a
        device without float64 (MPS): the sums and the factorisation need it.
        """
        if self.backbone_weights is None:
            if not allow_random_backbone:
                raise RuntimeError(
                    "refusing to fit on a randomly initialised backbone: call load_backbone_weights() first, "
                    "or pass allow_random_backbone=True to do it on purpose"
                )
            logger.warning("fitting PaDiM on a randomly initialised %s backbone", self.config.backbone)
        self.eval()
        device = self.gaussian.mean.device
        statistics_device = device if statistics_device is None else torch.device(statistics_device)
        if self.config.num_train_images == 0:  # nothing to keep: free the placeholder buffer before accumulating
            self.gaussian.release_()
        for batch in batches:
            pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
            patches = self.embed(pixel_values.to(device)).flatten(2).permute(2, 0, 1).to(statistics_device)
            # The statistics stay float32 even under a caller's autocast (mixed precision is for the backbone).
            with torch.autocast(patches.device.type, enabled=False):
                if statistics is None:
                    statistics = PatchStatistics.from_first_batch(patches)
                else:
                    statistics.update(patches)
        return statistics

    @torch.no_grad()
    def set_gaussian(self, statistics: PatchStatistics | None, release_statistics: bool = False) -> "PadimModel":
        """Finalises the Gaussians from accumulated statistics (all positions factorised in batches).

        `release_statistics=True` finalises in place: the (P, C, C) sums become the whitening factors, which halves
        peak memory, and `statistics` can no longer be used (its `shifted_outer` is set to None).
        """
        if statistics is None or statistics.count == 0:
            raise ValueError("no training images were accumulated: the training set is empty")
        mean = statistics.mean()
        # Finalised where the statistics are (the CPU for a model on MPS); set_ moves the result to the model.
        storage = getattr(torch, self.config.covariance_storage)
        # Kept statistics (a calibrating fit scores held-out images, then adds them): the factor goes straight into
        # its storage dtype, so finalising needs one float16 factor more, not a float32 one.
        positions, channels = statistics.shift.shape
        out = statistics.shifted_outer if release_statistics else LowerBlockRows.zeros(
            positions, channels, dtype=storage, device=mean.device
        )
        # float16 storage rounds W far more than a float32 factorisation does: only float32 storage needs float64.
        precision = torch.float64 if storage == torch.float32 else torch.float32
        with torch.autocast(mean.device.type, enabled=False):  # a caller's autocast must not touch the factorisation
            whitening = whitening_factors(statistics, self.config.epsilon, out=out, dtype=precision)
        if release_statistics:
            statistics.shifted_outer = None
        self.gaussian.storage_dtype = storage
        self.gaussian.set_(mean, whitening)
        self.config.num_train_images = statistics.count
        return self

    def fit(self, batches: Iterable[Tensor | Mapping[str, Tensor]], allow_random_backbone: bool = False) -> "PadimModel":
        """Fits the per-position Gaussians on defect-free images, streamed as batches of `pixel_values`."""
        statistics = self.collect_statistics(batches, allow_random_backbone=allow_random_backbone)
        return self.set_gaussian(statistics, release_statistics=True)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor, return_dict: bool | None = None, **kwargs) -> PadimOutput | tuple:
        if self.config.num_train_images == 0:
            raise NotFittedError("this PaDiM model is not fitted: call fit() or load a fitted checkpoint")
        embedding = self.embed(pixel_values)
        with torch.autocast(embedding.device.type, enabled=False):  # only the backbone runs in mixed precision
            distances = self.gaussian(embedding)  # (B, h, w)
            height, width = pixel_values.shape[-2:]
            sigma = self.config.blur_sigma
            rows = upsample_blur_matrix(distances.shape[-2], height, sigma, distances.device)  # (H, h)
            cols = upsample_blur_matrix(distances.shape[-1], width, sigma, distances.device)  # (W, w)
            anomaly_map = (rows @ distances @ cols.T).unsqueeze(1)
            pred_score = anomaly_map.amax(dim=(1, 2, 3))
        pred_label = None if self.config.image_threshold is None else pred_score >= self.config.image_threshold
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:  # always three entries, pred_label None when uncalibrated, so unpacking never shifts
            return anomaly_map, pred_score, pred_label
        return PadimOutput(anomaly_map=anomaly_map, pred_score=pred_score, pred_label=pred_label)

    def _check_pixel_values(self, pixel_values: Tensor) -> None:
        height, width = self.config.input_size
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (height, width):
            raise ValueError(
                f"pixel_values must have shape (batch, 3, {height}, {width}) (height, width) for this model, got "
                f"{tuple(pixel_values.shape)} (use the model's image processor)"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")


__all__ = ["PadimModel", "PadimPreTrainedModel", "PadimOutput"]
