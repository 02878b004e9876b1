"""Seconds `padim-hf COMMAND --help` takes, for `padim-hf` itself and every command: the whole process (interpreter
start, imports, help text), median of --repeats runs; optionally side by side with another source tree of the
package, e.g. an older commit unpacked with `git archive COMMIT padim_hf | tar -x -C /tmp/old`.

    python benchmarks/cli_help.py --repeats 3 --baseline /tmp/old --json cli_help.json

Runs are interleaved (this tree, then the baseline, command by command), so both see the same machine load; the
load average before and after is printed with the table. Run it under `flock /work/coord/heavy.lock` on the
project's machine: other jobs on the same cores make the seconds noisy.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).parent / "padim-hf"  # the console script pip installed beside this interpreter


def commands() -> list[str]:
    sys.path.insert(0, str(REPOSITORY))
    from padim_hf.cli import COMMANDS  # light: padim_hf.cli imports no torch

    return list(COMMANDS)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"


def check_imported_from(tree: Path) -> None:
    """PYTHONPATH must win over the editable install, or both columns would time the same code."""
    found = subprocess.run([sys.executable, "-c", "import padim_hf; print(padim_hf.__file__)"], cwd="/", text=True,
                           env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True).stdout.strip()
    if not Path(found).is_relative_to(tree):
        raise SystemExit(f"padim_hf is imported from {found}, not from {tree}")


def seconds(argv: list[str], tree: Path) -> float:
    """Wall seconds of `padim-hf ARGV` with the package imported from `tree` (the help must exit 0)."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([str(ENTRY_POINT), *argv], cwd="/", env=environment, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command and tree (default: 3)")
    parser.add_argument("--baseline", type=Path, help="a folder holding another padim_hf package to compare with")
    parser.add_argument("--json", type=Path, help="also write every run's seconds to this JSON file")
    args = parser.parse_args()
    trees = {"this tree": REPOSITORY, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows = [["--help"], *([command, "--help"] for command in commands())]
    for tree in trees.values():
        check_imported_from(tree)
    runs: dict[str, dict[str, list[float]]] = {" ".join(argv): {name: [] for name in trees} for argv in rows}
    load_before = load_average()
    for _ in range(args.repeats):
        for argv in rows:
            for name, tree in trees.items():
                runs[" ".join(argv)][name].append(seconds(argv, tree))
    load_after = load_average()
    print(f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {load_before} before, {load_after} after; median of {args.repeats} runs (seconds)\n")
    print("| padim-hf | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for label, by_tree in runs.items():
        print(f"| {label} | " + " | ".join(f"{statistics.median(values):.2f}" for values in by_tree.values()) + " |")
    if args.json:
        trees_text = {name: str(tree) for name, tree in trees.items()}
        args.json.write_text(json.dumps({"trees": trees_text, "load_before": load_before, "load_after": load_after,
                                         "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
