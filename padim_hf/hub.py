"""Share fitted PaDiM models on the Hugging Face Hub: a model directory (or a model) in one commit, with a model card
from its metrics and, on request, its ONNX / OpenVINO exports.

This layer sits above the model: modeling_padim.py knows nothing of it (its `push_to_hub` is transformers' own), so
the code files a model folder carries for `trust_remote_code` never include this one.
"""

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .files import model_files, without_local_paths
from .modelcard import model_card_for_directory

if TYPE_CHECKING:
    from .modeling_padim import PadimModel

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
REQUIRED_FILES = ("config.json", "preprocessor_config.json")
CARD_FILE = "README.md"


class HubPushError(RuntimeError):
    """A push failed; the Hub commit is atomic, so the repository is as it was before."""


def is_network_error(error: Exception) -> bool:
    """HTTP errors of the Hub and transport errors of its HTTP client (httpx2 in huggingface_hub 2.x, httpx in
    1.x), matched by module so that this file depends on neither."""
    if isinstance(error, (HfHubHTTPError, OSError)):
        return True
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2")


def check_model_directory(model_dir: Path) -> None:
    """Fails clearly unless `model_dir` holds a saved PaDiM model (config, weights, image processor)."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if not any(path.name.endswith(WEIGHT_SUFFIXES) for path in model_dir.iterdir()):
        missing.append("model.safetensors (or a sharded index)")
    if missing:
        raise FileNotFoundError(
            f"{model_dir} is not a saved PaDiM model: missing {', '.join(missing)} (write it with model.save_pretrained)"
        )
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type != "padim":
        raise ValueError(f"{model_dir}/config.json has model_type {model_type!r}, expected 'padim'")


def local_files(model_dir: Path) -> list[str]:
    """Repository paths of the files to upload: the allow-list of model files (config, weights, image processor,
    code, card, gallery, exported models under onnx/ and openvino/). Anything else in the directory (notes, data,
    credentials) stays on this machine; the push logs what it left out."""
    files, others = model_files(model_dir)
    if others:
        logger.warning("not pushed (not part of a PaDiM model): %s", ", ".join(others))
    return files


def public_config(model_dir: Path) -> bytes | None:
    """config.json with dataset references reduced to Hub ids or folder names and any other absolute local path to
    its last component (`files.without_local_paths`), or None when it needs no change (models written by older
    versions may record absolute paths)."""
    config = json.loads((model_dir / "config.json").read_text())
    public = without_local_paths(config)
    return None if public == config else (json.dumps(public, indent=2, sort_keys=True) + "\n").encode()


def resolve_token(token: str | None) -> str:
    """The explicit token, else HF_TOKEN / the `hf auth login` cache; a push cannot work without one."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(
            "pushing needs a Hugging Face write token: set HF_TOKEN, run `hf auth login`, or pass token=..."
        )
    return token


def push_failure_message(error: Exception, model_dir: Path, repo_id: str, revision: str | None) -> str:
    """What went wrong, that nothing changed, and what to do next."""
    target = repo_id + (f" (branch {revision!r})" if revision else "")
    namespace = repr(repo_id.split("/")[0]) if "/" in repo_id else "your namespace"
    status = getattr(getattr(error, "response", None), "status_code", None)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    unchanged = f"Nothing was committed (a Hub commit is all-or-nothing) and {model_dir} is unchanged"
    if status in (401, 403):
        return (
            f"push of {model_dir} to {target} failed: the Hub refused the token (HTTP {status}): check that it is "
            f"valid and has write access to {namespace} ({detail}). {unchanged}."
        )
    reason = f"HTTP {status}: {detail}" if status else detail
    return (
        f"push of {model_dir} to {target} failed: {reason}. {unchanged}; run the same push again to retry "
        f"(files already uploaded are not sent twice)."
    )


def stale_weight_files(api: HfApi, repo_id: str, revision: str | None, uploading: set[str]) -> list[str]:
    """Weight files already in the repo that this push does not replace: left behind they could be loaded
    instead of the new ones (a single `model.safetensors` wins over a shard index, and vice versa)."""
    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    return [path for path in remote if path.endswith(WEIGHT_SUFFIXES) and path not in uploading]


def export_operations(model_dir: Path, formats: list[str], scratch: Path) -> list[CommitOperationAdd]:
    """Exports the model in `model_dir` to each format under `scratch/<format>` (never into `model_dir`) and returns
    the uploads to `onnx/` / `openvino/` in the repo."""
    from .export import export
    from .modeling_padim import PadimModel

    model = PadimModel.from_pretrained(model_dir)
    operations = []
    for fmt in formats:
        for path in export(model, scratch / fmt, fmt):
            operations.append(CommitOperationAdd(path_in_repo=f"{fmt}/{path.name}", path_or_fileobj=str(path)))
    return operations


def card_operation(model_dir: Path, repo_id: str, tags: list[str] | None, exports: list[str] | None = None) -> CommitOperationAdd:
    """README.md: the directory's own card when it has one, else one generated from its config (the local
    directory is not modified)."""
    if (model_dir / CARD_FILE).is_file():
        return CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(model_dir / CARD_FILE))
    card = model_card_for_directory(model_dir, repo_id, tags=tags, exports=exports)
    return CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode())


def push_model_commit(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    export: Sequence[str] = (),
) -> CommitInfo:
    """Like `push_model`, returning the `CommitInfo`; `private=None` leaves new repos at the namespace's default."""
    model_dir = Path(model_dir)
    check_model_directory(model_dir)
    if constants.is_offline_mode():
        raise HubPushError("cannot push while HF_HUB_OFFLINE=1 is set: unset it to reach the Hub")
    unknown = sorted(set(export) - {"onnx", "openvino"})
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: choose from onnx, openvino")
    api = HfApi(token=resolve_token(token))
    exports = list(dict.fromkeys(export))
    # A requested export replaces whatever the directory holds in that folder (it is made from the same weights).
    files = [name for name in local_files(model_dir) if name != CARD_FILE and name.split("/")[0] not in exports]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files]
    config = public_config(model_dir)
    if config is not None:
        operations = [op for op in operations if op.path_in_repo != "config.json"]
        operations.append(CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=config))
    exported_here = [name for name in ("onnx", "openvino") if any(f.startswith(f"{name}/") for f in files)]
    with tempfile.TemporaryDirectory() as scratch:  # exports are written here, never into model_dir
        try:
            if exports:
                operations += export_operations(model_dir, exports, Path(scratch))
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare name gains a namespace
            operations.append(card_operation(model_dir, repo_id, tags, sorted({*exports, *exported_here})))
            if revision is not None and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            stale = stale_weight_files(api, repo_id, revision, set(files))
            operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=commit_message or "Upload PaDiM model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        except Exception as error:
            if not is_network_error(error):
                raise
            raise HubPushError(push_failure_message(error, model_dir, repo_id, revision)) from error


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    export: Sequence[str] = (),
) -> str:
    """Uploads a model directory written by `PadimModel.save_pretrained` to the Hub in a single commit.

    An allow-list goes up: config.json (with `auto_map`, `custom_pipelines`; dataset references reduced to Hub ids
    or folder names, never local paths), the safetensors weights (sharded or not), preprocessor_config.json, the
    code files for `trust_remote_code=True` users, README.md, `gallery.png`, and exported models under `onnx/` and
    `openvino/`. Any other file of the directory stays on this machine (and is named in a warning). The model card is the directory's README.md, or one generated from the config
    (metrics included) when there is none. Weight files of an earlier push that this one does not replace are
    deleted in the same commit.

    Args:
        model_dir: the saved model directory; it is never modified.
        repo_id: `"org/name"`; the repo is created when missing (`private` only applies then).
        revision: branch to commit to, created from `main` when missing.
        token: write token; defaults to HF_TOKEN or the `hf auth login` cache.
        commit_message: defaults to "Upload PaDiM model".
        export: formats ("onnx", "openvino") to export from the model and add to the same commit under `onnx/` /
            `openvino/`, with a model-card section on running them without PyTorch. The export is written to a
            temporary folder, never into `model_dir`.

    Returns:
        The URL of the new commit.

    Raises:
        FileNotFoundError / ValueError: `model_dir` is not a saved PaDiM model.
        HubPushError: no token, offline mode, or the Hub refused or failed the push (nothing is committed then).
    """
    commit = push_model_commit(
        model_dir, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
        export=export,
    )
    return commit.commit_url


def push(
    model: "str | Path | PadimModel",
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    export: Sequence[str] = (),
) -> str:
    """Uploads a fitted model, or a model directory, to the Hub in one commit; returns the commit URL.

    A `PadimModel` is saved to a temporary folder first; a directory is pushed as `push_model` describes (allow-list,
    model card with the evaluation metrics, exports under `onnx/` / `openvino/`, stale weights deleted).

    Example:

    ```python
    from padim_hf import push
    url = push("models/bottle", "my-org/padim-bottle", export=["onnx"])   # token: HF_TOKEN or `hf auth login`
    ```
    """
    options = dict(private=private, revision=revision, token=token, commit_message=commit_message, export=export)
    if isinstance(model, (str, Path)):
        return push_model(model, repo_id, **options)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return push_model(directory, repo_id, **options)


__all__ = ["HubPushError", "push", "push_model", "push_model_commit"]
