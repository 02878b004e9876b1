"""Medians over repeated `bench_export.py` runs, and the issue-12 ratios computed from them.

    .venv-bench/bin/python benchmarks/summarize_export.py benchmarks/results/export_cpu_r18_rep*.json
"""

import json
import statistics
import sys
from pathlib import Path

ENGINES = ["ours-torch", "ours-onnxruntime", "ours-openvino", "ours-openvino-bf16", "anomalib-torch",
           "anomalib-openvino", "anomalib-openvino-f32"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(paths: list[str]) -> None:
    rows = {}  # (config, engine) -> metric -> [values over runs]
    for path in paths:
        for config, result in json.loads(Path(path).read_text())["results"].items():
            for engine in ENGINES:
                row = rows.setdefault((config, engine), {})
                throughput, latency = result.get(f"{engine}/throughput", {}), result.get(f"{engine}/latency", {})
                if "images_per_second" in throughput:
                    row.setdefault("img/s", []).append(throughput["images_per_second"])
                    row.setdefault("rss32", []).append(throughput["peak_rss_bytes"] / 2**30)
                if "latency_seconds" in latency:
                    row.setdefault("ms", []).append(latency["latency_seconds"] * 1000)
                    row.setdefault("rss1", []).append(latency["peak_rss_bytes"] / 2**30)
    print(f"{len(paths)} runs: {', '.join(paths)}\n")
    print("| model | engine | batch-32 img/s (median, runs) | batch-1 ms (median, runs) | peak RSS GiB load + batch 1 | load + batch 32 |")
    print("|---|---|---|---|---|---|")
    for (config, engine), row in rows.items():
        if row:
            print(f"| {config} | {engine} | {median(row['img/s']):.1f} ({', '.join(f'{v:.1f}' for v in row['img/s'])}) | "
                  f"{median(row['ms']):.1f} ({', '.join(f'{v:.0f}' for v in row['ms'])}) | {median(row['rss1']):.2f} | "
                  f"{median(row['rss32']):.2f} |")
    print("\n| model | ratio | median | per run |\n|---|---|---|---|")
    for config in sorted({config for config, _ in rows}):
        def per_run(metric, engine):
            return rows.get((config, engine), {}).get(metric, [])

        def ratio(name, numerator, denominator):
            values = [a / b for a, b in zip(numerator, denominator)]
            print(f"| {config} | {name} | {median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")

        best_ours = [max(v) for v in zip(*(per_run("img/s", e) for e in ENGINES[1:4]))]
        best_anomalib = [max(v) for v in zip(*(per_run("img/s", e) for e in ENGINES[4:]))]
        fastest_ours = [min(v) for v in zip(*(per_run("ms", e) for e in ENGINES[:4]))]
        fastest_anomalib = [min(v) for v in zip(*(per_run("ms", e) for e in ENGINES[4:]))]
        ratio("best engine / our torch, batch 32 (target >= 1.5)", best_ours, per_run("img/s", "ours-torch"))
        ratio("our best / anomalib's best, batch 32 (target >= 1.15)", best_ours, best_anomalib)
        ratio("float32 OpenVINO: ours / anomalib's", per_run("img/s", "ours-openvino"), per_run("img/s", "anomalib-openvino-f32"))
        ratio("batch-1 latency, our fastest / anomalib's fastest (target <= 0.7)", fastest_ours, fastest_anomalib)
        ratio("peak RSS load + batch 1, our torch / anomalib's torch (target <= 0.6)", per_run("rss1", "ours-torch"),
              per_run("rss1", "anomalib-torch"))


if __name__ == "__main__":
    main(sys.argv[1:])
