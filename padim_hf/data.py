"""Datasets for fitting, evaluating and predicting: MVTec-style folders, Hub datasets, plain image lists.

Every source becomes a `datasets.Dataset` (or `IterableDataset` when streaming) with the columns
image, mask (None for good images), label (0 good / 1 anomalous), defect_type and path. Images stay
undecoded (`Image(decode=False)`) until a batch is collated, where `decode_image` names any unreadable file.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value, load_dataset, load_from_disk

from .image_processing_padim import PadimImageProcessor, load_image
from .image_processing_padim import decode_image as rgb_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
FEATURES = Features(
    {
        "image": Image(decode=False),
        "mask": Image(decode=False),
        "label": Value("int64"),
        "defect_type": Value("string"),
        "path": Value("string"),
    }
)


def image_files(folder: Path) -> list[Path]:
    """Sorted image files directly inside `folder`."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _records_to_dataset(records: list[dict]) -> Dataset:
    columns = {name: [record[name] for record in records] for name in FEATURES}
    return Dataset.from_dict(columns, features=FEATURES)


def mvtec_split(root: str | Path, split: str) -> Dataset:
    """One split (`train` or `test`) of an MVTec AD category folder.

    Layout: `train/good/*.png`, `test/<defect>/*.png`, `ground_truth/<defect>/<id>_mask.png`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    split_dir = root / split
    if split == "train" and not (split_dir / "good").is_dir():
        raise FileNotFoundError(f"{root} has no train/good folder of defect-free training images")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{root} has no {split}/ folder")
    records = []
    for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        for path in image_files(defect_dir):
            mask = None
            if defect != "good":
                mask = root / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"no ground-truth mask {mask} for anomalous image {path}")
                mask = str(mask)
            records.append(dict(image=str(path), mask=mask, label=int(defect != "good"), defect_type=defect, path=str(path)))
    if not records:
        raise ValueError(f"{split_dir} contains no images")
    return _records_to_dataset(records)


def image_list(inputs: Sequence[str | Path]) -> Dataset:
    """Images to predict on: files, and the image files of folders (recursively), unlabelled."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not paths:
        raise ValueError(f"no image files in {[str(i) for i in inputs]}")
    return _records_to_dataset(
        [dict(image=str(p), mask=None, label=-1, defect_type="", path=str(p)) for p in paths]
    )


def hub_split(
    name: str,
    split: str,
    config: str | None = None,
    image_column: str = "image",
    mask_column: str | None = "mask",
    label_column: str | None = "label",
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """A split of a Hub dataset (or a local `save_to_disk` folder) renamed to the common columns.

    Labels: a missing label column means "all good" (a training split); a ClassLabel with a "good" name is
    mapped to 0 for good and 1 otherwise (datasets sorts class names, so "good" is not necessarily 0).
    """
    if is_saved_dataset(Path(name)):
        if streaming:
            raise ValueError(f"{name} is a save_to_disk folder, which cannot be streamed; drop `streaming=True`")
        dataset = load_from_disk(name)
        dataset = dataset[split] if hasattr(dataset, "keys") else dataset
    else:
        dataset = load_dataset(name, config, split=split, streaming=streaming)
    columns = dataset.column_names or list(dataset.features)
    if image_column not in columns:
        raise ValueError(f"dataset {name} split {split} has no image column {image_column!r}; columns: {columns}")
    good_index = None
    if label_column and label_column in columns:
        feature = dataset.features[label_column]
        if isinstance(feature, ClassLabel):
            good_index = feature.names.index("good") if "good" in feature.names else None

    def to_common(row: dict, index: int) -> dict:
        label = row.get(label_column) if label_column else None
        if label is None:
            label = 0
        elif good_index is not None:
            label = int(label != good_index)
        return dict(
            image=row[image_column],
            mask=row.get(mask_column) if mask_column else None,
            label=int(label),
            defect_type=str(row.get("defect_type") or ("good" if label == 0 else "anomalous")),
            path=str(row.get("path") or f"{name}[{split}][{index}]"),
        )

    dataset = dataset.cast_column(image_column, Image(decode=False))
    if mask_column and mask_column in columns:
        dataset = dataset.cast_column(mask_column, Image(decode=False))
    return dataset.map(to_common, with_indices=True, remove_columns=columns, features=FEATURES)


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a `datasets` `save_to_disk` folder (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def is_mvtec_folder(path: Path) -> bool:
    """Whether `path` looks like an MVTec AD category: image folders under train/ or test/."""
    return any((path / split).is_dir() and any(d.is_dir() for d in (path / split).iterdir()) for split in ("train", "test"))


def load_split(source: str, split: str, **hub_options) -> Dataset | IterableDataset:
    """A split from an MVTec-style folder, a saved `datasets` folder, a local copy of a Hub dataset repository,
    or a Hub dataset id, with the columns image, mask, label (0 good, 1 anomalous) and path.

    Example:

    ```python
    from padim_hf import load_split
    test = load_split("path/to/bottle", "test")          # test/<defect>/*.png + ground_truth/<defect>/*_mask.png
    test = load_split("my-org/parts", "test", image_column="photo", label_column="defective")
    ```
    """
    path = Path(source)
    if path.is_dir() and not is_saved_dataset(path) and (is_mvtec_folder(path) or not any(path.iterdir())):
        return mvtec_split(path, split)
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {source}")
    return hub_split(source, split, **hub_options)


def contiguous_shard(length: int, rank: int, world: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s contiguous part of `length` items; the first `length % world` get one more."""
    size, extra = divmod(length, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def dataset_shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Process `rank`'s contiguous part of `dataset`, possibly empty.

    Not `split_dataset_by_node`: its contiguous shard (and `select(range(n, n))`) raises IndexError for a process
    that gets no row (2 rows on 3 processes).
    """
    start, stop = contiguous_shard(len(dataset), rank, world)
    return dataset.select(range(start, stop) if stop > start else [])


def decode_image(value: dict | PIL.Image.Image | None, path: str) -> PIL.Image.Image:
    """Decodes an undecoded `datasets` image ({bytes, path}) with the processor's decoder (size checked before
    decoding, EXIF orientation applied); errors name the image's path."""
    if isinstance(value, PIL.Image.Image):
        return value
    if value is None:
        raise ValueError(f"image {path} is missing")
    if value.get("bytes"):
        return load_image(value["bytes"], name=path)
    if not value.get("path"):
        raise ValueError(f"image {path} has neither bytes nor a path")
    return load_image(value["path"], name=path)


def drop_unreadable(dataset: Dataset) -> tuple[Dataset, list[str]]:
    """The dataset without rows whose image cannot be decoded, and one error message per dropped row."""
    keep, problems = [], []
    for index, row in enumerate(dataset):
        try:
            decode_image(row["image"], row["path"])
            keep.append(index)
        except ValueError as error:
            problems.append(str(error))
    return dataset.select(keep), problems


def mask_array(value: dict | None, path: str, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) ground truth for an image of `size` (W, H); all False for a good image."""
    if value is None:
        return np.zeros(size[::-1], dtype=bool)
    mask = decode_image(value, f"mask of {path}")
    if mask.size != size:
        raise ValueError(f"mask of {path} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}")
    return np.asarray(mask.convert("L")) > 127


class Collator:
    """Turns dataset rows into model inputs; keeps original sizes and masks for evaluation and prediction."""

    def __init__(self, processor: PadimImageProcessor, with_masks: bool = False, with_images: bool = False):
        self.processor = processor
        self.with_masks = with_masks
        self.with_images = with_images  # the decoded originals, for overlays (decoding twice is the slow part)

    def __call__(self, rows: list[dict]) -> dict:
        # RGB as the model sees it (the processor's decoder), so overlays and map sizes match the pixel values.
        images = [rgb_image(decode_image(row["image"], row["path"]), row["path"]) for row in rows]
        batch = {
            "pixel_values": self.processor(images, return_tensors="pt")["pixel_values"],
            "labels": torch.tensor([row["label"] for row in rows]),
            "paths": [row["path"] for row in rows],
            "sizes": [image.size[::-1] for image in images],  # (H, W)
        }
        if self.with_images:
            batch["images"] = images
        if self.with_masks:
            batch["masks"] = [mask_array(row["mask"], row["path"], image.size) for row, image in zip(rows, images)]
        return batch
