"""Writes that never lose or overwrite a user's files.

- A model directory is written into a hidden staging folder beside its target and renamed into place only when
  complete. `--overwrite` replaces only a directory that holds a PaDiM model (or is empty), and the swap is
  crash-safe: the old model is renamed aside, the new one renamed in, then the old one deleted, so at every
  instant one complete model exists under a known name. A crash mid-swap leaves `.<name>.previous-<id>` beside the
  target; the next write restores it (when the target is missing) or names it, never deletes it.
- Files are written only under names that did not exist (`check_new_files`), so outputs never replace inputs.
- Dataset references stored in a model are Hub ids or folder names, never absolute local paths.
"""

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from .configuration_padim import dataset_reference, without_local_paths  # what config.json may record

logger = logging.getLogger(__name__)

# What a PaDiM model directory may hold: what save_pretrained, evaluate and export write. The Hub push sends exactly
# these files (an allow-list: stray files never leave the machine), and `--overwrite` replaces only a directory
# holding nothing else.
MODEL_FILE_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "README.md",
    "gallery.png",
    "onnx/*",
    "openvino/*",
)
# Code files for trust_remote_code: save_pretrained copies modules of this package; a user's own script is not one.
CODE_FILES = frozenset(path.name for path in Path(__file__).parent.glob("*.py") if path.name != "__init__.py")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


def is_model_file(relative: str) -> bool:
    """Whether a path inside a model directory ("onnx/model.onnx") is one a PaDiM model consists of."""
    parts = relative.split("/")
    if any(part.startswith(".") or part == "__pycache__" for part in parts):
        return False
    if len(parts) == 1:
        return relative in CODE_FILES or any(fnmatch(relative, p) for p in MODEL_FILE_PATTERNS if "/" not in p)
    return parts[0] in ("onnx", "openvino")


def model_files(directory: Path) -> tuple[list[str], list[str]]:
    """(model files, other files) of a directory, as sorted POSIX paths relative to it; hidden files are neither."""
    ours, others = [], []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in relative.split("/")):
            continue
        (ours if is_model_file(relative) else others).append(relative)
    return ours, others


def is_padim_model_directory(directory: Path) -> bool:
    """A directory with config.json of model_type "padim" and a weights file."""
    config = directory / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    has_weights = any(fnmatch(path.name, pattern) for path in directory.iterdir() for pattern in WEIGHT_PATTERNS)
    return model_type == "padim" and has_weights


def check_replaceable(target: Path) -> None:
    """Raises FileExistsError unless `target` is an empty directory or a PaDiM model directory holding only model
    files: `--overwrite` must never delete a folder of other things ("." or a home folder) or a user's own files."""
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: `overwrite=True` replaces only a model directory")
    if not any(target.iterdir()):
        return
    if not is_padim_model_directory(target):
        raise FileExistsError(
            f"{target} is not a PaDiM model directory (no config.json with model_type 'padim' and weights): "
            "`overwrite=True` replaces only a PaDiM model or an empty folder; choose another `output_dir=...`"
        )
    _, others = model_files(target)
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(
            f"{target} holds files that are not part of a PaDiM model ({listed}): `overwrite=True` would delete "
            "them; move them out or choose another `output_dir=...`"
        )


def aside_copies(target: Path) -> list[Path]:
    """Earlier models of `target` left beside it by an interrupted replacement, oldest first."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.previous-*"), key=lambda path: path.stat().st_mtime)


def recover_interrupted_replace(target: Path) -> None:
    """Restores the model an interrupted replacement moved aside when `target` is missing; otherwise names it.

    Never deletes: an aside copy is a complete earlier model that only the user may throw away.
    """
    leftovers = aside_copies(target)
    if not leftovers:
        return
    if not target.exists():
        latest = leftovers.pop()
        latest.rename(target)
        logger.warning("restored %s from %s, left by an interrupted replacement", target, latest.name)
    for leftover in leftovers:
        logger.warning(
            "%s holds an earlier model of %s left by an interrupted replacement; delete it when no longer needed",
            leftover, target.name,
        )


def replace_directory(new: Path, target: Path) -> None:
    """Renames the complete directory `new` to `target`; an existing `target` is renamed aside first and deleted
    only once `new` is in place (both renames are atomic on one filesystem)."""
    if not target.exists():
        new.rename(target)
        return
    aside = target.parent / f".{target.name}.previous-{os.getpid()}-{time.time_ns()}"
    target.rename(aside)
    try:
        new.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    shutil.rmtree(aside)


@contextmanager
def atomic_model_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a hidden staging directory beside `target` that becomes `target` only if the block completes.

    Raises FileExistsError before anything is written when `target` exists and `overwrite` is False, or when it
    is not replaceable (see `check_replaceable`). A failed or interrupted block leaves `target` untouched.
    """
    target = Path(target)
    recover_interrupted_replace(target)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass `overwrite=True` to replace it")
        check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():  # checked again: the block may have run for an hour
            check_replaceable(target)
        replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replaces `path` with `text` atomically: a crash leaves the old file or the new one, never a truncated one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # the bytes reach the disk before the rename makes them the file
    try:
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_new_files(paths: Iterable[Path], what: str = "output") -> None:
    """Raises FileExistsError naming the paths that already exist: writing them would replace a user's file (an
    input image, an earlier result)."""
    existing = [str(path) for path in paths if os.path.lexists(path)]
    if existing:
        listed = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(
            f"refusing to overwrite {listed}: {what} files are written only under new names; "
            "choose an empty or new `output_dir=...`"
        )


class InterruptedAfterWriting(KeyboardInterrupt):
    """An interruption (Ctrl-C) after some output files were written; its message says which, so nobody is told
    that nothing was written."""


__all__ = [
    "MODEL_FILE_PATTERNS",
    "InterruptedAfterWriting",
    "atomic_model_directory",
    "atomic_write_text",
    "check_new_files",
    "check_replaceable",
    "dataset_reference",
    "is_model_file",
    "is_padim_model_directory",
    "model_files",
    "replace_directory",
    "without_local_paths",
]
