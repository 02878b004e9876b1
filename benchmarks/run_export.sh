#!/bin/bash
# The issue-12 CPU benchmark: every engine of both implementations side by side, one run per model
# (run under flock /work/coord/heavy.lock on the shared machine). Needs .venv-bench (benchmarks/requirements.txt).
set -ex
cd "$(dirname "$0")/.."
.venv-bench/bin/python benchmarks/bench_export.py --configs r18 --batches 3 --latency-runs 7 \
    --output benchmarks/results/export_cpu_r18.json > benchmarks/results/export_cpu_r18.stdout 2>&1
.venv-bench/bin/python benchmarks/bench_export.py --configs wr50 --batches 2 --latency-runs 5 \
    --output benchmarks/results/export_cpu_wr50.json > benchmarks/results/export_cpu_wr50.stdout 2>&1
