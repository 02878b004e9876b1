"""Wall time and peak memory of a command's whole process tree (e.g. the test suite, which starts subprocesses).

    .venv/bin/python benchmarks/suite_footprint.py --json out.json -- .venv/bin/python -m pytest -q --durations=15

Every `--interval` seconds it samples two sums over the command and all its descendants:

- summed RSS: resident pages, counted once per process that maps them (torch's libraries, shared by every
  Python process of the tree, count once per process), so an upper bound;
- summed PSS (proportional set size, from /proc/PID/smaps_rollup): each shared page is split between the
  processes mapping it, so the sum is what the tree holds in RAM (a little less where it shares library pages
  with processes outside it). This is the figure the project's "peak memory" means. The machine's memory
  cgroup (v1 here) holds other jobs and the page cache too, so its counters cannot isolate the tree.

A peak shorter than one interval can be missed. When the command is pytest, a plugin defined in this file
(loaded through PYTEST_PLUGINS) writes the running test's id to a file, and the report names the tests during
which each sum peaked (a fixture counts toward the test that first asks for it; the PSS at a test's first sample
shows what earlier tests' fixtures still hold). Reading PSS costs the sampler some CPU, which it reports, with
the CPU seconds the machine spent on other jobs meanwhile. Run it under `flock /work/coord/heavy.lock` on the
project's machine: other jobs on the same cores make the wall time noisy, not the memory.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CURRENT_TEST_ENV = "SUITE_FOOTPRINT_CURRENT_TEST"


def pytest_runtest_logstart(nodeid: str, location) -> None:
    """pytest hook (this file is the plugin too): record which test is running, for the sampler to read."""
    path = Path(os.environ[CURRENT_TEST_ENV])
    staging = path.with_suffix(f".{os.getpid()}")
    staging.write_text(nodeid)
    staging.replace(path)  # atomic: the sampler never reads a half-written id


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of `root` and its descendants now (processes that exit meanwhile count 0)."""
    rss = pss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += info.pss
    return rss, pss


def git_commit() -> str:
    """The checkout's commit, with "+changes" when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent on anything but idling since boot (all cores together)."""
    times = psutil.cpu_times()  # (guest time is already inside user time; steal is other virtual machines')
    return times.user + times.nice + times.system + times.irq + times.softirq


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def top_tests(peaks: dict[str, list[int]], index: int, count: int) -> list[dict]:
    """The `count` tests with the largest tree peak of measure `index` (0: RSS, 1: PSS), in GiB; the PSS at the
    test's first sample tells what earlier tests' fixtures still held from what the test itself added."""
    ranked = sorted(peaks.items(), key=lambda item: item[1][index], reverse=True)[:count]
    return [
        {
            "test": test,
            "peak_tree_rss_gib": round(rss / 2**30, 2),
            "peak_tree_pss_gib": round(pss / 2**30, 2),
            "tree_pss_at_start_gib": round(pss_at_start / 2**30, 2),
        }
        for test, (rss, pss, pss_at_start) in ranked
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default: 0.2)")
    parser.add_argument("--top", type=int, default=10, help="how many tests to name per measure (default: 10)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    current_test = Path(tempfile.mkstemp(prefix="suite-footprint-", suffix=".txt")[1])
    env = dict(os.environ)
    env[CURRENT_TEST_ENV] = str(current_test)
    env["PYTEST_PLUGINS"] = ",".join(filter(None, [env.get("PYTEST_PLUGINS"), "suite_footprint"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))

    load_at_start = [round(value, 2) for value in psutil.getloadavg()]
    busy_at_start = busy_cpu_seconds()
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    per_test: dict[str, list[int]] = {}  # test id -> [largest summed RSS, largest summed PSS, first PSS] while it ran
    while child.poll() is None:
        rss, pss = tree_memory(root)
        test = current_test.read_text() or "(collection / start-up)"
        peaks = per_test.setdefault(test, [0, 0, pss])
        peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(args.interval)
    current_test.unlink()
    # The command's processes, once reaped (pytest waits for the ones it starts), count as this script's children;
    # what the machine did besides them and this sampler was other jobs' work, which slows the command down.
    tree_cpu, sampler_cpu = cpu_seconds(resource.RUSAGE_CHILDREN), cpu_seconds(resource.RUSAGE_SELF)
    other_cpu = busy_cpu_seconds() - busy_at_start - tree_cpu - sampler_cpu

    result = {
        "invocation": " ".join([f"CI={os.environ['CI']}"] * ("CI" in os.environ) + [os.path.relpath(sys.executable), *sys.argv]),
        "commit": git_commit(),
        "command": command,
        "returncode": child.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_gib": round(peak_rss / 2**30, 2),
        "peak_tree_pss_gib": round(peak_pss / 2**30, 2),
        "interval_seconds": args.interval,
        "top_tests_by_pss": top_tests(per_test, 1, args.top),
        "top_tests_by_rss": top_tests(per_test, 0, args.top),
        "machine": f"{platform.node()} {psutil.cpu_count()} CPUs {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "cpu_seconds": {"command": round(tree_cpu), "sampler": round(sampler_cpu), "other_jobs": round(other_cpu)},
        "load_average_at_start": load_at_start,  # 1, 5, 15 min: other jobs on the machine slow the run down
        "load_average_at_end": [round(value, 2) for value in psutil.getloadavg()],
    }
    print(json.dumps(result, indent=2), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
