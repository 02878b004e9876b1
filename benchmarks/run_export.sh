#!/bin/bash
# The issue-12 runs, in order of importance (run under flock /work/coord/heavy.lock on the shared machine).
set -x
cd "$(dirname "$0")/.."
.venv-bench/bin/python benchmarks/bench_export.py --configs r18 --batches 2 --latency-runs 5 \
    --output benchmarks/results/export_cpu_r18.json > benchmarks/results/export_cpu_r18.stdout 2>&1
.venv-bench/bin/python benchmarks/bench_export.py --configs wr50 --batches 2 --latency-runs 5 \
    --engines ours-torch anomalib-torch ours-onnxruntime ours-openvino \
    --output benchmarks/results/export_cpu_wr50.json > benchmarks/results/export_cpu_wr50.stdout 2>&1
.venv-bench/bin/python benchmarks/bench_export.py --configs wr50 --batches 2 --latency-runs 5 \
    --engines anomalib-torch anomalib-openvino anomalib-openvino-f32 \
    --output benchmarks/results/export_cpu_wr50_anomalib_ov.json > benchmarks/results/export_cpu_wr50_anomalib_ov.stdout 2>&1
# Re-run of the torch rows after the float64 finite check copy was removed (commit after 'bench_export: anomalib loads').
.venv-bench/bin/python benchmarks/bench_export.py --configs wr50 --batches 2 --latency-runs 5 \
    --engines ours-torch anomalib-torch \
    --output benchmarks/results/export_cpu_wr50_torch.json > benchmarks/results/export_cpu_wr50_torch.stdout 2>&1
