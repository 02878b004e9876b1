"""`padim-hf`: fit, evaluate, predict, push, demo, benchmark."""

import argparse
import logging
import sys

from . import benchmark, demo, evaluate, fit, predict


def push_main(argv: list[str]) -> None:
    from .hub import push_model

    parser = argparse.ArgumentParser(prog="padim-hf push", description="Push a model directory to the Hub in one commit.")
    parser.add_argument("model_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache)")
    args = parser.parse_args(argv)
    print(push_model(args.model_dir, args.repo_id, private=args.private, revision=args.revision, token=args.token))


COMMANDS = {"fit": fit.main, "evaluate": evaluate.main, "predict": predict.main, "push": push_main, "demo": demo.main, "benchmark": benchmark.main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: padim-hf {{{','.join(COMMANDS)}}} ...  (padim-hf COMMAND --help)", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        # Input problems are the user's to fix: a one-line message naming them, not a traceback.
        print(f"padim-hf {argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"padim-hf {argv[0]}: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
