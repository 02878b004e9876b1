"""Export a fitted PaDiM model to ONNX or OpenVINO, for runtimes without PyTorch (see `padim_hf.runtime`).

An export folder holds the graph (`model.onnx` [+ `model.onnx.data`] or `model.xml` + `model.bin`) and
`padim_export.json`: the image processor's settings and the calibrated thresholds, so the runtime side needs nothing
from padim_hf. The graph takes `pixel_values` (batch, 3, H, W), the model's fixed input height and width (square or
not), batch dynamic, and returns `anomaly_map` (batch, 1, H, W) and `pred_score` (batch,), plus `pred_label` (batch,)
when the model has an image threshold and `normalized_score` (batch,) when calibration recorded a score range.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .configuration_padim import PadimConfig
from .extras import require
from .gaussian import LowerBlockRows
from .modeling_padim import PadimModel, nearest_source_indices, upsample_blur_matrix
from .options import FORMATS
from .runtime import PRECISE_MARK

logger = logging.getLogger(__name__)

EXPORT_CONFIG = "padim_export.json"
# The torch-free runtime (padim_hf/runtime.py) travels with every export under this name; the image processor's
# settings too, in transformers' format, for padim_hf's own tools (predict --engine).
RUNTIME_FILE, PROCESSOR_FILE = "padim_runtime.py", "preprocessor_config.json"
SIDE_FILES = (EXPORT_CONFIG, RUNTIME_FILE, PROCESSOR_FILE)
ONNX_FILE, ONNX_DATA = "model.onnx", "model.onnx.data"
OPENVINO_FILES = ("model.xml", "model.bin")
# ONNX protobufs cannot exceed 2 GiB: larger models keep their weights in `model.onnx.data`.
PROTOBUF_LIMIT = 2**31
OPSET = 17


class ExportablePadim(nn.Module):
    """`PadimModel.forward` as plain tensor operations for tracing: no input checks, no Python-side state.

    Channels are picked and upsampled with `index_select` (nearest upsampling is a gather of source rows/columns),
    which reproduces `PadimModel.embed` exactly; the Gaussian is the model's own `PadimGaussian` module (with its
    factor in float32); the map is upsampled and blurred by the model's own matrices (`upsample_blur_matrix`), fixed
    for the model's input size.
    """

    def __init__(self, model: PadimModel):
        super().__init__()
        # The graph holds the factor in float32 (the runtimes' GEMMs take float32 operands); the model may keep float16.
        self.backbone, self.gaussian, self.config = model.backbone, model.gaussian.float32(), model.config
        height, width = model.config.input_size
        with torch.no_grad():  # the grid of every stage, from one probe image
            shapes = [feature.shape[-2:] for feature in model.backbone(torch.zeros(1, 3, height, width, device=model.device))]
        indices = torch.tensor(model.config.feature_indices)
        start = 0
        self.stages = []
        for stage, (channels, shape) in enumerate(zip(model.config.stage_channels, shapes)):
            in_stage = indices[(indices >= start) & (indices < start + channels)] - start
            self.register_buffer(f"channels_{stage}", in_stage.to(model.device), persistent=False)
            self.register_buffer(f"rows_{stage}", nearest_source_indices(shape[0], shapes[0][0], model.device), persistent=False)
            self.register_buffer(f"cols_{stage}", nearest_source_indices(shape[1], shapes[0][1], model.device), persistent=False)
            self.stages.append(stage)
            start += channels
        (grid_height, grid_width), sigma = shapes[0], model.config.blur_sigma
        self.register_buffer("rows", upsample_blur_matrix(grid_height, height, sigma, model.device), persistent=False)
        self.register_buffer("cols", upsample_blur_matrix(grid_width, width, sigma, model.device), persistent=False)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, C, h, w) embedding, equal to `PadimModel.embed`'s."""
        parts = []
        for stage, feature in zip(self.stages, self.backbone(pixel_values)):
            selected = feature.float().index_select(1, getattr(self, f"channels_{stage}"))
            selected = selected.index_select(2, getattr(self, f"rows_{stage}")).index_select(3, getattr(self, f"cols_{stage}"))
            parts.append(selected)
        return torch.cat(parts, dim=1)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        config = self.config
        anomaly_map = (self.rows @ self.gaussian(self.embed(pixel_values)) @ self.cols.T).unsqueeze(1)
        pred_score = anomaly_map.amax(dim=(1, 2, 3))
        outputs = [anomaly_map, pred_score]
        if config.image_threshold is not None:
            outputs.append(pred_score >= config.image_threshold)
            if config.score_min is not None and config.score_max is not None:
                spread = max(config.score_max - config.score_min, 1e-12)
                outputs.append(((pred_score - config.image_threshold) / spread + 0.5).clamp(0.0, 1.0))
        return tuple(outputs)


def output_names(config: PadimConfig) -> list[str]:
    names = ["anomaly_map", "pred_score"]
    if config.image_threshold is not None:
        names.append("pred_label")
        if config.score_min is not None and config.score_max is not None:
            names.append("normalized_score")
    return names


def export_config(config: PadimConfig, engine_files: list[str]) -> dict:
    """What a runtime needs besides the graph: pre-processing, thresholds, output names (padim_export.json)."""
    return {
        "format_version": 1,
        "files": engine_files,
        "inputs": {"pixel_values": ["batch", 3, *config.input_size]},  # (height, width), fixed
        "outputs": output_names(config),
        "preprocessing": {
            "resize": list(config.resize_size),  # (height, width)
            "resample": "bicubic",
            "center_crop": None if config.crop_size is None else list(config.input_size),
            "rescale_factor": 1 / 255,
            "image_mean": list(config.image_mean),
            "image_std": list(config.image_std),
            "channels": "RGB",
        },
        "image_threshold": config.image_threshold,
        "pixel_threshold": config.pixel_threshold,
        "score_min": config.score_min,
        "score_max": config.score_max,
        "openvino_config": {"INFERENCE_PRECISION_HINT": "f32"},
        "model": {
            "backbone": config.backbone,
            "layers": list(config.layers),
            "n_features": config.n_features,
            "num_train_images": config.num_train_images,
            "train_dataset": config.train_dataset,
        },
    }


def _staged_export(output_dir: str | Path, names: list[str]):
    """A hidden staging folder inside `output_dir` (created if missing), checked first so that no existing file is
    overwritten; `commit` renames the staged files into place, `cleanup` removes only what we created."""
    output_dir = Path(output_dir)
    existing = [name for name in names if (output_dir / name).exists()]
    if existing:
        raise FileExistsError(
            f"{output_dir} already holds {', '.join(existing)}: export writes only new files (choose another `output_dir=...`)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".padim-export-", dir=output_dir))


def _write_side_files(staging: Path, config: PadimConfig, engine_files: list[str]) -> None:
    from . import runtime
    from .image_processing_padim import PadimImageProcessor

    (staging / EXPORT_CONFIG).write_text(json.dumps(export_config(config, engine_files), indent=2))
    shutil.copyfile(runtime.__file__, staging / RUNTIME_FILE)
    PadimImageProcessor.from_padim_config(config).to_json_file(staging / PROCESSOR_FILE)  # no code files


def _commit(staging: Path, output_dir: Path) -> list[Path]:
    written = []
    for path in sorted(staging.iterdir()):
        target = output_dir / path.name
        if target.exists():  # appeared while exporting
            raise FileExistsError(f"{target} appeared during the export; nothing of it was replaced")
        os.replace(path, target)
        written.append(target)
    return written


def _trace_onnx(model: PadimModel, path: Path) -> None:
    """Writes the ONNX graph to `path`, weights beside it as external data when they exceed the protobuf limit."""
    onnx = require("onnx")

    wrapper = ExportablePadim(model).eval()
    example = torch.zeros(2, 3, *model.config.input_size, device=model.device)
    names = output_names(model.config)
    # TorchScript tracing (dynamo=False): the dynamo exporter needs onnxscript rewrites that are slower and, on
    # torch 2.14, mis-handle the nearest-index gathers; the traced graph is plain ONNX opset 17.
    options = dict(
        dynamo=False, opset_version=OPSET, output_names=names, do_constant_folding=True,
        dynamic_axes={"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in names}},
    )
    weight_bytes = sum(t.numel() * t.element_size() for t in [*wrapper.parameters(), *wrapper.buffers()])
    hidden, wrapper.gaussian.hide_packed = wrapper.gaussian.hide_packed, True  # the exporter reads the state dict:
    try:  # without this, packing the factor for it would copy the whole factor (for nothing: it is not a weight)
        with torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            traced = Path(scratch) / ONNX_FILE
            if weight_bytes + 2**24 < PROTOBUF_LIMIT:
                torch.onnx.export(wrapper, (example,), str(traced), input_names=["pixel_values"], **options)
                graph = onnx.load(str(traced))
                graph.producer_name = "padim_hf"
                onnx.save_model(graph, str(path))
            else:
                _trace_with_external_factor(wrapper, example, traced, path, options)
    finally:
        wrapper.gaussian.hide_packed = hidden


class _FactorAsInputs(nn.Module):
    """`ExportablePadim` with the whitening blocks as graph inputs (given transposed, the layout the graph's
    products read) instead of traced constants: the exporter then holds no copy of the factor beyond the one its
    tracer makes of the inputs, and the blocks are written to the external data file straight from the model."""

    def __init__(self, wrapper: ExportablePadim):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, pixel_values: Tensor, *transposed_blocks: Tensor) -> tuple[Tensor, ...]:
        gaussian = self.wrapper.gaussian
        stored = gaussian.whitening()
        # Transposed back here; the graph's own transpose for the product cancels it (an identity the exporter drops).
        gaussian._set_blocks(LowerBlockRows([block.transpose(1, 2) for block in transposed_blocks]))
        try:
            return self.wrapper(pixel_values)
        finally:
            gaussian._set_blocks(stored)


def _trace_with_external_factor(wrapper: ExportablePadim, example: Tensor, traced: Path, path: Path, options: dict) -> None:
    """Exports a model whose weights exceed the protobuf limit with peak memory of about one extra factor (the
    tracer's copy of its inputs): the factor blocks are traced as inputs, then become initializers whose bytes are
    streamed, a few positions at a time, into `model.onnx.data`; every other weight above 1 KiB goes there too."""
    onnx = require("onnx")

    blocks = [block.transpose(1, 2) for block in wrapper.gaussian.whitening().blocks]
    factor_names = [f"gaussian.whitening_{index}_transposed" for index in range(len(blocks))]
    torch.onnx.export(_FactorAsInputs(wrapper), (example, *blocks), str(traced), input_names=["pixel_values", *factor_names], **options)
    graph = onnx.load(str(traced))  # the rest of the weights: a few MB, inside the protobuf
    graph.producer_name = "padim_hf"
    inputs = {value.name: value for value in graph.graph.input}
    with open(path.parent / ONNX_DATA, "wb") as data:
        for name, block in zip(factor_names, blocks):
            if name not in inputs:
                raise RuntimeError(f"the traced graph does not read the whitening factor {name}")
            graph.graph.input.remove(inputs[name])
            tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(block.shape))
            offset = data.tell()
            for start in range(0, block.shape[0], 64):  # 64 positions: a few MB at a time, never the whole block
                data.write(block[start : start + 64].float().contiguous().numpy().tobytes())
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in {"location": ONNX_DATA, "offset": offset, "length": data.tell() - offset}.items():
                tensor.external_data.add(key=key, value=str(value))
            graph.graph.initializer.append(tensor)
    # Appends the remaining weights to the same file (onnx writes only tensors that still hold their bytes).
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=ONNX_DATA,
                    size_threshold=1024, convert_attribute=True)


def export_onnx(model: PadimModel, output_dir: str | Path) -> list[Path]:
    """Exports a fitted model to `output_dir/model.onnx` (+ `model.onnx.data` above 2 GiB) and `padim_export.json`.

    Refuses to overwrite existing files; returns the files written.
    """
    _require_fitted(model)
    output_dir = Path(output_dir)
    staging = _staged_export(output_dir, [ONNX_FILE, ONNX_DATA, *SIDE_FILES])
    try:
        _trace_onnx(model, staging / ONNX_FILE)
        _write_side_files(staging, model.config, sorted(path.name for path in staging.iterdir()))
        return _commit(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_openvino(model: PadimModel, output_dir: str | Path) -> list[Path]:
    """Exports a fitted model to OpenVINO IR (`model.xml` + `model.bin`, float32 weights) and `padim_export.json`.

    Converted from the ONNX graph (the same graph `export_onnx` writes), its shape arithmetic folded and every
    operation marked to keep float32 (`keep_float32`), so that a plain `compile_model("model.xml")` runs it in float32
    even where the CPU plugin would default to bfloat16. `PadimRuntime(precision="bfloat16")` removes the marks to ask
    for bfloat16. Refuses to overwrite existing files.
    """
    ov = require("openvino")
    from openvino._offline_transformations import apply_moc_transformations  # what optimum-intel uses too

    _require_fitted(model)
    output_dir = Path(output_dir)
    staging = _staged_export(output_dir, [*OPENVINO_FILES, *SIDE_FILES])
    try:
        onnx_dir = staging / "onnx"
        onnx_dir.mkdir()
        _trace_onnx(model, onnx_dir / ONNX_FILE)
        # compress_to_fp16=False: OpenVINO would otherwise store the Gaussian in float16 (distances off by ~1e-3).
        graph = ov.convert_model(str(onnx_dir / ONNX_FILE))
        # Constant folding turns timm's "same" padding (computed from the input's shape) into fixed convolution pads;
        # left to the CPU plugin, that fusion makes new convolutions, which drop the marks and run in bfloat16.
        apply_moc_transformations(graph, cf=True)
        keep_float32(graph)
        ov.save_model(graph, str(staging / OPENVINO_FILES[0]), compress_to_fp16=False)
        shutil.rmtree(onnx_dir)
        _write_side_files(staging, model.config, list(OPENVINO_FILES))
        return _commit(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def keep_float32(graph) -> None:
    """Marks every operation of an OpenVINO graph precise (OpenVINO's `precise_0` runtime attribute, saved in the IR
    as `DisablePrecisionConversion`), which the CPU plugin honours under its bfloat16 default. An
    `INFERENCE_PRECISION_HINT` stored in the IR's `rt_info` is not (openvino 2026.4)."""
    for operation in graph.get_ops():
        operation.get_rt_info()[PRECISE_MARK] = ""


ENGINE_FOLDERS = {"onnxruntime": ("onnx", ONNX_FILE), "openvino": ("openvino", OPENVINO_FILES[0])}


def resolve_export_folder(model: str | Path, engine: str) -> Path:
    """The folder holding `engine`'s export: `model` itself (an export folder), its `onnx/` or `openvino/` subfolder
    (a model directory), or that subfolder downloaded from a Hub repo (`push --export` puts it there)."""
    subfolder, marker = ENGINE_FOLDERS[engine]
    path = Path(model)
    if path.is_dir():
        for folder in (path, path / subfolder):
            if (folder / marker).is_file() and (folder / EXPORT_CONFIG).is_file():
                return folder
        raise FileNotFoundError(
            f"{path} holds no {subfolder} export ({marker} + {EXPORT_CONFIG}): export it first, with "
            f"`export_model('{path}', '{path / subfolder}', '{subfolder}')` or `padim-hf export --model {path} "
            f"--format {subfolder} --output-dir {path / subfolder}`"
        )
    if str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {model}")
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(str(model), allow_patterns=[f"{subfolder}/*"])) / subfolder
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"Hub repo {model} has no {subfolder}/{marker}: push it with `push(..., export=['{subfolder}'])` or `padim-hf push --export {subfolder}`")
    return folder


EXPORTERS = {"onnx": export_onnx, "openvino": export_openvino}
EXPORT_MODULES = {"onnx": ("onnx",), "openvino": ("onnx", "openvino")}  # the OpenVINO IR is converted from ONNX


def export(model: PadimModel | str | Path, output_dir: str | Path, format: str = "onnx") -> list[Path]:
    """Exports a fitted model (a `PadimModel`, a saved model directory or a Hub repo id) to `format` in `output_dir`;
    returns the files written. Needs the export extra (`pip install "padim-hf[export]"`).

    Example:

    ```python
    from padim_hf import export_model
    export_model("models/bottle", "models/bottle/onnx", "onnx")
    export_model("models/bottle", "models/bottle/openvino", "openvino")
    ```
    """
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    for module in EXPORT_MODULES[format]:  # before loading the model: a missing extra is known at once
        require(module)
    if not isinstance(model, PadimModel):
        model = PadimModel.from_pretrained(str(model))
    return EXPORTERS[format](model.eval(), output_dir)


def _require_fitted(model: PadimModel) -> None:
    if model.config.num_train_images == 0:
        raise RuntimeError("this PaDiM model is not fitted: fit it (or load a fitted checkpoint) before exporting")


def main(args: argparse.Namespace) -> None:
    """`padim-hf export` once its options are parsed (padim_hf.commands): `export`, then the files written printed."""
    written = export(args.model, args.output_dir, args.format)
    print(f"exported {args.model} to {args.format}: " + ", ".join(str(path) for path in written))


__all__ = ["ExportablePadim", "export", "export_onnx", "export_openvino", "keep_float32", "resolve_export_folder"]
