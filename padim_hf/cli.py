"""`padim-hf`: fit, calibrate, evaluate, predict, push, demo, benchmark, export."""

import argparse
import logging
import sys

from . import benchmark, calibration, demo, evaluate, export, fit, predict, sweep
from .hub import HubPushError
from .modeling_padim import NotFittedError


def push_main(argv: list[str]) -> None:
    from .hub import push_model

    parser = argparse.ArgumentParser(prog="padim-hf push", description="Push a model directory to the Hub in one commit.")
    parser.add_argument("model_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache)")
    parser.add_argument("--export", nargs="+", choices=("onnx", "openvino"), default=(),
                        help="also export to these formats and upload them to onnx/ / openvino/ in the same commit")
    args = parser.parse_args(argv)
    print(push_model(args.model_dir, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                     export=args.export))


COMMANDS = {
    "fit": fit.main, "calibrate": calibration.main, "evaluate": evaluate.main, "predict": predict.main, "push": push_main, "demo": demo.main,
    "benchmark": benchmark.main, "export": export.main, "sweep": sweep.main,
}
# Problems with the user's input or environment (a missing file, a bad value, a refused push): one line says what
# to fix. Anything else (a CUDA out-of-memory error, a bug) keeps its traceback: hiding it would hide the cause.
EXPECTED_ERRORS = (ValueError, OSError, HubPushError, NotFittedError)
INTERRUPTED = {
    # fit writes its model into a hidden staging folder renamed into place only when complete
    "fit": "interrupted; no model was written (the output directory is as it was)",
}
USAGE = f"usage: padim-hf [--debug] {{{','.join(COMMANDS)}}} ...  (padim-hf COMMAND --help; --debug: full tracebacks)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    command = argv[0]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[command](argv[1:])
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        print(f"padim-hf {command}: error: {error}  (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interruption:
        if debug:
            raise
        # Only say what is true: predict names the files it wrote; other commands claim nothing they cannot know.
        detail = f"interrupted; {interruption}" if str(interruption) else INTERRUPTED.get(command, "interrupted")
        print(f"padim-hf {command}: {detail}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
