"""Wall time and peak memory of a command's whole process tree (e.g. the test suite, which starts subprocesses).

    python benchmarks/suite_footprint.py --json out.json -- .venv/bin/python -m pytest -q --durations=30

Peak memory is the largest sum of the resident set sizes of the command and all its descendants, sampled every
`--interval` seconds (so a peak shorter than one interval can be missed; shared pages are counted once per process,
which overstates a tree that shares memory). Run it under `flock /work/coord/heavy.lock` on the project's machine:
other jobs on the same cores make the wall time noisy, not the memory.
"""

import argparse
import json
import platform
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    """Bytes resident in `root` and its descendants now (processes that exit meanwhile count as 0)."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default: 0.2)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(args.interval)
    result = {
        "command": command,
        "returncode": child.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_gib": round(peak / 2**30, 2),
        "interval_seconds": args.interval,
        "machine": f"{platform.node()} {psutil.cpu_count()} CPUs {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "load_average_at_end": [round(value, 2) for value in psutil.getloadavg()],
    }
    print(json.dumps(result), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
