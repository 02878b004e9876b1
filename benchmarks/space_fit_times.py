"""How long the Space takes on this machine: to start as a duplicated Space does, and to fit N uploaded images.

Start-up: `python spaces/app.py` with no PADIM_MODEL (it fits the example detector first), timed until its port
accepts connections; the example fit's own time is read from the app's log.

Runs the Space's own functions (spaces/fitting.py), as the Fit button does: check and decode the uploads, fit with
padim_hf (`fit_padim`: Lite0 backbone, held-out calibration), save the model and zip it. The uploads are synthetic
fabric PNGs of 1024 x 1024 px (the Space downscales anything larger to 1024 px first). Each count runs in a fresh
process (so its peak RSS is its own), `--repeats` times; the table gives medians.

    flock /work/coord/heavy.lock .venv/bin/python benchmarks/space_fit_times.py --counts 20 50 --repeats 3
"""

import argparse
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "spaces"


def one_run(count: int, size: int, image_px: int) -> dict:
    """One fit of `count` images in this process: seconds per step and the peak RSS."""
    sys.path.insert(0, str(SPACE_DIR))
    import PIL.Image

    import fitting
    import synthetic
    from padim_hf.image_processing_padim import decode_image

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index in range(count):
            paths.append(Path(folder) / f"good_{index:03d}.png")
            PIL.Image.fromarray(synthetic.fabric(index, size=image_px, noise=0.02)).save(paths[-1], compress_level=1)
        times = {}
        started = time.perf_counter()
        images = fitting.read_good_images(paths, decode_image)
        times["read_s"] = time.perf_counter() - started
        started = time.perf_counter()
        detector = fitting.fit_detector(images, size)
        times["fit_s"] = time.perf_counter() - started
        started = time.perf_counter()
        model_zip = fitting.save_model(detector, Path(folder))
        times["save_zip_s"] = time.perf_counter() - started
        times["zip_mb"] = model_zip.stat().st_size / 2**20
    times["total_s"] = times["read_s"] + times["fit_s"] + times["save_zip_s"]
    times["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times["held_out"] = detector.config.calibration["num_images"]
    return times


def startup_run() -> dict:
    """Seconds from `python app.py` (no PADIM_MODEL) until it serves, and the example fit's share of it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {key: value for key, value in os.environ.items() if key != "PADIM_MODEL"}
    environment.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    with tempfile.TemporaryFile("w+") as log:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "app.py"], cwd=SPACE_DIR, env=environment, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"app.py exited: {log.read()[-2000:]}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            serving = time.monotonic() - started
        finally:
            process.terminate()
            process.wait(timeout=30)
        log.seek(0)
        fitted = re.search(r"fitted the example detector in ([0-9.]+) s", log.read())
    return {"startup_s": serving, "example_fit_s": float(fitted.group(1)) if fitted else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--size", type=int, default=256, help="model input size (the Space's default: 256)")
    parser.add_argument("--image-px", type=int, default=1024, help="side of the uploaded images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one run in this process
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.size, args.image_px)))
        return
    startups = [startup_run() for _ in range(args.repeats)]
    startup = {key: statistics.median(run[key] for run in startups) for key in startups[0]}
    results = {}
    for count in args.counts:
        runs = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--one", str(count), "--size", str(args.size), "--image-px", str(args.image_px)]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
        results[count] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        results[count]["runs_total_s"] = [round(run["total_s"], 2) for run in runs]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))})"
    print(
        f"python spaces/app.py with no PADIM_MODEL serves after {startup['startup_s']:.1f} s (median of {args.repeats}; "
        f"the example detector's fit: {startup['example_fit_s']:.1f} s; runs: "
        f"{', '.join(format(run['startup_s'], '.1f') for run in startups)} s)\n"
    )
    print(f"Space fit times, {args.size} px input, {args.image_px} px PNG uploads, median of {args.repeats} ({machine})\n")
    print("| images | held out | check + decode | fit + calibrate | save + zip | total | zip | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for count, row in results.items():
        print(
            f"| {count} | {row['held_out']:.0f} | {row['read_s']:.1f} s | {row['fit_s']:.1f} s | {row['save_zip_s']:.1f} s "
            f"| **{row['total_s']:.1f} s** | {row['zip_mb']:.0f} MB | {row['peak_rss_gib']:.2f} GiB |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "startup": startups, "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
