"""Fitting a detector in the browser: checking the uploads, fitting and calibrating with padim_hf, the model as a
zip, pushing it with the signed-in user's token, and keeping each browser session's files apart.

The library does the work (`padim_hf.fit.build_model` / `fit_padim` / `save_fitted`, its good-only calibration,
`padim_hf.hub.push_model`); this module only checks what users upload and where their files go.
"""

import hashlib
import io
import os
import re
import shutil
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import PIL.Image

from detector import Detector, downscale, open_image

PRESET = "padim-lite0-offline"  # ImageNet EfficientNet-Lite0 from a PyPI package: fits with no Hub download
# Input sizes offered (the preset's 256 px is the default). The Gaussian grows with the square of the size: at 256 px
# the fitted model is ~95 MB and a fit peaks well under 1 GB, so two fits at once stay safe on a 16 GB CPU Space.
FIT_SIZES = (128, 192, 256)
DEFAULT_FIT_SIZE = 256
MIN_FIT_IMAGES = 10  # one in ten is held out to calibrate the verdict: fewer would leave no held-out image
MAX_FIT_IMAGES = 100
MAX_IMAGE_BYTES = 20 * 2**20  # one image file (or zip member)
MAX_FIT_BYTES = 300 * 2**20  # all images of one fit together, counted uncompressed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Zips made on macOS or Windows carry these; they are not images the user meant to send.
IGNORED_ZIP_MEMBERS = re.compile(r"(^|/)(__MACOSX/|\.[^/]*$|Thumbs\.db$|desktop\.ini$)")
MODEL_FOLDER = "model"
ZIP_NAME = "padim-model.zip"
FALSE_ALARM_RATE = 0.01  # the verdict flags about 1 good part in 100 (padim_hf's good-only calibration)
HOLDOUT_FRACTION = 0.1


class UploadError(ValueError):
    """A refused upload; the message says why, for the user."""


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (a container's `cpu.max` says 2 on a
    2-vCPU Space even where `os.cpu_count()` reports the host's cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


# --- the uploads ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One image to read: a file, or a member of an uploaded zip."""

    name: str  # what the user knows it as: "part_01.png" or "parts.zip: good/part_01.png"
    size: int  # bytes (uncompressed for a zip member)
    open: Callable[[], IO[bytes]]


def list_uploads(paths: Iterable[str | Path]) -> list[Upload]:
    """The images in the uploaded files: image files as they are, zips opened (their folders flattened).

    Refuses, naming the file, anything that is neither an image (by its suffix) nor a zip, an image or zip member
    over MAX_IMAGE_BYTES, and a broken zip. Sizes come from the file system and the zip directory: nothing is
    decompressed here.
    """
    uploads = []
    for path in map(Path, paths):
        name = original_name(path)
        if name.lower().endswith(".zip"):
            uploads.extend(zip_members(path, name))
        elif name.lower().endswith(IMAGE_SUFFIXES):
            uploads.append(Upload(name, path.stat().st_size, lambda path=path: open(path, "rb")))
        else:
            raise UploadError(f"{name} is not an image (PNG, JPEG, BMP, TIFF, WebP) or a .zip of images")
    for upload in uploads:
        if upload.size > MAX_IMAGE_BYTES:
            raise UploadError(
                f"{upload.name} is {upload.size / 2**20:.1f} MB; images up to {MAX_IMAGE_BYTES // 2**20} MB are accepted"
            )
    return uploads


def original_name(path: Path) -> str:
    # Gradio keeps the uploaded file's own name as the last path component.
    return path.name


def zip_members(path: Path, name: str) -> list[Upload]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UploadError(f"{name} is not a zip file that can be opened ({error})") from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir() and not IGNORED_ZIP_MEMBERS.search(info.filename)]
    uploads = []
    for info in members:
        member = f"{name}: {info.filename}"
        if not info.filename.lower().endswith(IMAGE_SUFFIXES):
            raise UploadError(f"{member} is not an image (PNG, JPEG, BMP, TIFF, WebP): zip only the good images")
        uploads.append(Upload(member, info.file_size, lambda path=path, info=info, member=member: read_member(path, info, member)))
    if not uploads:
        raise UploadError(f"{name} holds no images")
    return uploads


def read_member(path: Path, info: zipfile.ZipInfo, name: str) -> IO[bytes]:
    """A zip member's bytes. zipfile inflates no further than the size the zip's directory declares (checked against
    MAX_IMAGE_BYTES before), so a zip bomb that under-states it stops there and fails its checksum."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(info) as member:
            return io.BytesIO(member.read())
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise UploadError(f"{name} is damaged ({error})") from error


def check_counts(uploads: list[Upload]) -> None:
    if len(uploads) < MIN_FIT_IMAGES:
        raise UploadError(
            f"{len(uploads)} image{'s' if len(uploads) != 1 else ''} uploaded; a fit needs at least {MIN_FIT_IMAGES} "
            f"good images (one in ten is held out to calibrate the verdict)"
        )
    if len(uploads) > MAX_FIT_IMAGES:
        raise UploadError(f"{len(uploads)} images uploaded; up to {MAX_FIT_IMAGES} images per fit are accepted")
    total = sum(upload.size for upload in uploads)
    if total > MAX_FIT_BYTES:
        raise UploadError(
            f"the images add up to {total / 2**20:.0f} MB; up to {MAX_FIT_BYTES // 2**20} MB per fit are accepted"
        )


def read_good_images(paths: Iterable[str | Path], decode: Callable) -> list[PIL.Image.Image]:
    """The uploaded good images, decoded to RGB and at most MAX_SIDE large, after every check of this module.

    `decode` is the image processor's decoder (`processor.decode`: EXIF orientation, alpha, 16-bit, ...), the one
    fitting and analysis use. Raises UploadError with a message for the user.
    """
    uploads = list_uploads(paths)
    check_counts(uploads)
    images = [read_image(upload, decode) for upload in uploads]
    check_aspect_ratios(images, [upload.name for upload in uploads])
    return images


def read_image(upload: Upload, decode: Callable) -> PIL.Image.Image:
    try:
        with upload.open() as stream:
            image = open_image(stream, upload.name)
            return downscale(decode(downscale(image), name=upload.name))
    except ValueError as error:
        raise UploadError(str(error)) from error


def image_sizes(images: list[PIL.Image.Image], names: list[str]) -> dict[tuple[int, int], list[str]]:
    """{(width, height): [names]}, the shape padim_hf.resolution reads sizes in."""
    sizes: dict[tuple[int, int], list[str]] = {}
    for image, name in zip(images, names):
        sizes.setdefault(image.size, []).append(name)
    return sizes


def check_aspect_ratios(images: list[PIL.Image.Image], names: list[str]) -> None:
    """Refuses images of several aspect ratios (padim_hf.resolution's test and tolerance), naming sizes and files."""
    from padim_hf.resolution import common_aspect, describe_sizes

    sizes = image_sizes(images, names)
    if common_aspect(sizes) is None:
        raise UploadError(
            f"mixed aspect ratios: {describe_sizes(sizes)} (width x height). Upload images of one shape (one camera "
            "setting), or crop them alike"
        )


# --- fitting --------------------------------------------------------------------------------------------------------


def fit_detector(images: list[PIL.Image.Image], size: int, source: str = "fitted in this session") -> Detector:
    """A detector fitted on `images` with the Lite0 preset, its verdict threshold calibrated by padim_hf on held-out
    good images (about FALSE_ALARM_RATE of good parts flagged). `images` share one aspect ratio (read_good_images
    checks it).

    The model's input keeps the images' aspect ratio at about `size` x `size` pixels (padim_hf's `--image-size
    auto:SIDE`): a 4:3 photo is not squashed into a square. Images of several aspect ratios are refused.
    """
    from padim_hf.fit import build_model, fit_padim, load_preset, make_accelerator
    from padim_hf.resolution import resolve_image_size

    if size not in FIT_SIZES:
        raise UploadError(f"input size {size} px is not offered; choose one of {', '.join(map(str, FIT_SIZES))}")
    preset = load_preset(PRESET)
    sizes = image_sizes(images, [f"image {index + 1}" for index in range(len(images))])
    image_size = resolve_image_size(f"auto:{size}", sizes, size, preset["backbone"], preset["layers"])
    model = build_model(PRESET, image_size=image_size)
    model = fit_padim(
        model,
        images,
        accelerator=make_accelerator(),
        holdout_fraction=HOLDOUT_FRACTION,
        false_alarm_rate=FALSE_ALARM_RATE,
    )
    return Detector.from_model(model, source)


def calibration_summary(detector: Detector) -> str:
    """The library's own description of the held-out calibration ("flags about 1 in 100 good parts; ...")."""
    from padim_hf.calibration import describe_calibration

    return describe_calibration(detector.config)


def save_model(detector: Detector, folder: Path) -> Path:
    """Writes the session's model to `folder/model` (padim_hf's atomic save) and `folder/padim-model.zip`; returns
    the zip. The zip is written under a temporary name and renamed, so a download never gets half a file."""
    from padim_hf.fit import save_fitted

    model_dir = save_fitted(detector.model, folder / MODEL_FOLDER, overwrite=True)
    staging = folder / f".{ZIP_NAME}.partial"
    with zipfile.ZipFile(staging, "w") as archive:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                # safetensors hardly compress: store them, deflate the JSON and code files.
                method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                archive.write(path, f"{MODEL_FOLDER}/{path.relative_to(model_dir)}", compress_type=method)
    return staging.replace(folder / ZIP_NAME)


def push_to_hub(model_dir: Path, repo: str, username: str, token: str, private: bool) -> str:
    """Pushes the session's model to `repo` (a name in the user's namespace, or "namespace/name") with the user's
    own token; returns the commit URL. padim_hf's push is one atomic commit."""
    from padim_hf.hub import push_model

    if not token:  # push_model would fall back to HF_TOKEN, the Space owner's token: never here
        raise UploadError("sign in with Hugging Face first: the model is pushed to your own account")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = repo.strip()
    repo_id = repo if "/" in repo else f"{username}/{repo}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UploadError(f"{repo!r} is not a repository name: {error}") from error
    return push_model(model_dir, repo_id, private=private, token=token, commit_message="Upload PaDiM model fitted in the Space")


# --- each browser session's files -----------------------------------------------------------------------------------


@dataclass
class Session:
    folder: Path
    detector: Detector | None = None
    model_zip: Path | None = None
    uploads: set[Path] = field(default_factory=set)


class Sessions:
    """Each browser session's folder (its model, zip and analysis images), its fitted detector and the paths of its
    uploads, keyed by Gradio's session hash. `end` (on the session's unload event) deletes them all."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def get(self, session_hash: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_hash)
            if session is None:
                # The hash comes from the browser: hashed again, it can name no other folder.
                folder = self.root / hashlib.sha256(session_hash.encode()).hexdigest()[:32]
                folder.mkdir(parents=True, exist_ok=True)
                session = self._sessions[session_hash] = Session(folder)
            return session

    def detector(self, session_hash: str | None) -> Detector | None:
        with self._lock:
            session = self._sessions.get(session_hash or "")
            return session.detector if session else None

    def add_uploads(self, session_hash: str, paths: Iterable[str | Path]) -> None:
        session = self.get(session_hash)
        with self._lock:
            session.uploads.update(Path(path) for path in paths)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def snapshot(self) -> dict[str, Session]:
        """The live sessions by session hash (a copy: for monitoring and tests)."""
        with self._lock:
            return dict(self._sessions)

    def end(self, session_hash: str) -> None:
        """Deletes the session's folder and its uploads (an upload another live session also holds, the same bytes
        under the same name, stays until that one ends too)."""
        with self._lock:
            session = self._sessions.pop(session_hash, None)
            if session is None:
                return
            held = set().union(*(other.uploads for other in self._sessions.values()))
        shutil.rmtree(session.folder, ignore_errors=True)
        for path in session.uploads - held:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # Gradio keeps each upload in a folder of its own
            except OSError:
                pass


def elapsed(started: float) -> str:
    seconds = time.perf_counter() - started
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds // 60:.0f} min {seconds % 60:.0f} s"

