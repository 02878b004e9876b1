#!/usr/bin/env python
"""Peak RSS per process of a multi-process fit (torchrun, gloo on CPU) next to the one-process fit, in one run.

Each process count runs in fresh torchrun processes (`--standalone`); every rank reports its own peak RSS
(ru_maxrss: the whole process, imports included), its images and its wall time. The main process also saves the
model (as `padim-hf fit` does) into a temporary directory. The backbone has timm's random initialisation (no
download; memory and time do not depend on the weights). Images: synthetic, seeded, 256 x 256 (the WR50 preset
resizes to 256 and crops 224).

Example (the BENCHMARKS.md figures):
    flock /work/coord/heavy.lock python benchmarks/distributed_memory.py --preset padim-wr50-rd550 --n-images 32 --processes 1 2
"""

from __future__ import annotations

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


def synthetic_images(count: int, size: int = 256) -> list:
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def worker(args: argparse.Namespace) -> None:
    from padim_hf.fit import build_model, fit_padim, make_accelerator, save_fitted

    accelerator = make_accelerator()
    model = build_model(args.preset, allow_random_backbone=True)
    images = synthetic_images(args.n_images)
    started = time.perf_counter()
    fit_padim(model, images, batch_size=args.batch_size, accelerator=accelerator, allow_random_backbone=True, progress=False)
    fitted = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.report_dir) as directory:
        save_fitted(model, Path(directory) / "model")
    report = dict(
        rank=accelerator.process_index,
        processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type),
        fit_s=fitted - started,
        fit_and_save_s=time.perf_counter() - started,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # Linux: kilobytes
    )
    Path(args.report_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


def run(processes: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as report_dir:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__,
            "--worker", "--preset", args.preset, "--n-images", str(args.n_images), "--batch-size", str(args.batch_size),
            "--report-dir", report_dir,
        ]
        threads = max(1, (os.cpu_count() or 1) // processes)  # the same cores in every run
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("WORLD_SIZE", None)
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        wall = time.perf_counter() - started
        reports = [json.loads(Path(report_dir, f"rank{rank}.json").read_text()) for rank in range(processes)]
    for report in reports:
        report.update(threads=threads, launch_wall_s=wall)
        assert report["processes"] == processes, report  # the launch really gave this many cooperating processes
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="padim-wr50-rd550")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="write the raw per-rank reports here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {processes: run(processes, args) for processes in args.processes}
    baseline = max(report["peak_rss_gb"] for report in results[min(results)])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "padim_hf"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    print(f"\n{args.preset}, {args.n_images} images, batch {args.batch_size}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; code {commit or '?'}{' (modified)' if dirty else ''}; "
          f"baseline: the {min(results)}-process peak {baseline:.2f} GB")
    print("| processes | rank | distributed type | threads | peak RSS (GB) | vs baseline | fit (s) | fit + save (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for processes, reports in results.items():
        for report in reports:
            print(f"| {processes} | {report['rank']} | {report['distributed_type'].split('.')[-1]} | {report['threads']} | "
                  f"{report['peak_rss_gb']:.2f} | {report['peak_rss_gb'] / baseline:.3f}x | {report['fit_s']:.1f} | "
                  f"{report['fit_and_save_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
