"""`padim-hf`: the command line. It parses a command's options (defined in `padim_hf.commands`), then imports the
command's module, whose `main(args)` calls the Python API (see `padim_hf`).

Nothing heavy is imported until the options are parsed, so `padim-hf --help`, `padim-hf COMMAND --help` and a
mistyped option answer at once.
"""

import argparse
import importlib
import logging
import os
import re
import sys

from .commands import command_parser
from .extras import MissingDependencyError

# Command -> ("module:function" taking the parsed `argparse.Namespace`, one line for the command list). In the order a user needs them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("padim_hf.demo:main", "make a small synthetic dataset, then fit, evaluate and predict on it (no download)"),
    "fit": ("padim_hf.fit:main", "fit a model on good images (a folder or a Hub dataset) and save it"),
    "calibrate": ("padim_hf.calibration:main", "set a model's threshold from good images at a target false-alarm rate"),
    "evaluate": ("padim_hf.evaluate:main", "measure AUROC/AUPRO/F1 on a labelled test split and set thresholds"),
    "predict": ("padim_hf.predict:main", "score images: heatmaps and predictions.csv/json"),
    "export": ("padim_hf.export:main", "export a fitted model to ONNX or OpenVINO (runs without PyTorch)"),
    "push": ("padim_hf.cli:push_main", "upload a model folder to the Hugging Face Hub in one commit"),
    "benchmark": ("padim_hf.benchmark:main", "fit and evaluate every category of an MVTec-style folder"),
    "sweep": ("padim_hf.sweep:main", "fit and evaluate one product at several input sizes: a table to choose one"),
}
INTERRUPTED = {
    # fit writes its model into a hidden staging folder renamed into place only when complete
    "fit": "interrupted; no model was written (the output directory is as it was)",
}
# Python-API spellings in messages (`overwrite=True`, `output_dir=`) and the command line's options for them.
PYTHON_OPTION = re.compile(r"`(\w+)=(True|\.\.\.|'[^'`]*')`")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: what padim-hf does, the command list (one line each) and the options every command
    takes. Each command's options are in `padim_hf.commands` (`padim-hf COMMAND --help`)."""
    width = max(len(name) for name in COMMANDS) + 2
    listing = "\n".join(f"  {name.ljust(width)}{summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="padim-hf",
        usage="padim-hf [--verbose] [--debug] COMMAND [options]",
        description="PaDiM anomaly detection: fit a defect detector on good images, evaluate it, look at heatmaps,\n"
        "share it on the Hugging Face Hub, export it.\n\ncommands:\n" + listing,
        epilog="Run `padim-hf COMMAND --help` for a command's options. New here? `padim-hf demo --output-dir padim-demo`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show the library's and its dependencies' log messages")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error (implies --verbose)")
    return parser


def push_main(args: argparse.Namespace) -> None:
    """`padim-hf push` once its options are parsed: `push_model`, then the repository's address printed."""
    from .hub import push_model

    print(push_model(args.model_dir, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                     export=args.export))


def expected_errors() -> tuple[type[BaseException], ...]:
    """Problems with the user's input or environment (a missing file, a bad value, a refused push): one line says
    what to fix. Anything else (a CUDA out-of-memory error, a bug) keeps its traceback: hiding it would hide the
    cause. Imported only once a command has run (their modules import torch)."""
    errors: list[type[BaseException]] = [ValueError, OSError, MissingDependencyError]
    for module, name in (("padim_hf.hub", "HubPushError"), ("padim_hf.modeling_padim", "NotFittedError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def as_command_line(message: str) -> str:
    """A Python API message as a command-line user reads it: `overwrite=True` -> `--overwrite`,
    `output_dir=...` -> `--output-dir`, `engine='openvino'` -> `--engine openvino`."""
    def option(match: re.Match) -> str:
        flag, value = f"--{match.group(1).replace('_', '-')}", match.group(2)
        return f"`{flag} {value.strip(chr(39))}`" if value.startswith("'") else f"`{flag}`"

    return PYTHON_OPTION.sub(option, message)


def configure_logging(verbose: bool) -> None:
    """By default the command line shows warnings and errors, padim_hf's progress bars and what the command prints;
    --verbose adds every library's INFO messages and progress bars (datasets' and transformers' too). Only this
    entry point configures logging: the library itself never touches the root logger."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # datasets reads this when imported (the command's module imports it below); a user's own setting wins.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


def release_process_group() -> None:
    """Destroys torch.distributed's default group if the command made one (a fit under torchrun or accelerate
    launch). A process that exits with a gloo group alive can abort in the group's destructor after its work is done
    ("terminate called without an active exception", exit -6, pytorch/pytorch#179291), failing the whole launch."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose/--debug may come anywhere (`padim-hf fit ... --debug`): they are taken out before the command parses.
    debug, verbose = "--debug" in argv, "--verbose" in argv or "--debug" in argv
    argv = [arg for arg in argv if arg not in ("--debug", "--verbose")]
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"padim-hf: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            sys.exit(2)
        parser.print_help()
        sys.exit(0)
    command = argv[0]
    # Parsed before anything heavy is imported: --help and a mistyped option answer at once.
    args = command_parser(command).parse_args(argv[1:])
    configure_logging(verbose)
    module, function = COMMANDS[command][0].split(":")
    run = getattr(importlib.import_module(module), function)
    try:
        run(args)
    except KeyboardInterrupt as interruption:
        if debug:
            raise
        # Only say what is true: predict names the files it wrote; other commands claim nothing they cannot know.
        detail = f"interrupted; {interruption}" if str(interruption) else INTERRUPTED.get(command, "interrupted")
        print(f"padim-hf {command}: {detail}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if debug or not isinstance(error, expected_errors()):
            raise
        print(f"padim-hf {command}: error: {as_command_line(str(error))}  (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        release_process_group()


if __name__ == "__main__":
    main()
