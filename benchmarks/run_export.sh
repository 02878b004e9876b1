#!/bin/bash
# The issue-12 CPU benchmark: every engine of both implementations side by side, one run per model, repeated
# three times (interleaved) because single figures on this shared machine move by up to ~40 %; then the medians.
# Run under flock /work/coord/heavy.lock on the shared machine. Needs .venv-bench (benchmarks/requirements.txt).
set -ex
cd "$(dirname "$0")/.."
for rep in ${REPEATS:-1 2 3}; do
    .venv-bench/bin/python benchmarks/bench_export.py --configs r18 --batches 3 --latency-runs 7 \
        --output benchmarks/results/export_cpu_r18_rep$rep.json > benchmarks/results/export_cpu_r18_rep$rep.stdout 2>&1
    .venv-bench/bin/python benchmarks/bench_export.py --configs wr50 --batches 2 --latency-runs 5 \
        --output benchmarks/results/export_cpu_wr50_rep$rep.json > benchmarks/results/export_cpu_wr50_rep$rep.stdout 2>&1
done
.venv-bench/bin/python benchmarks/summarize_export.py benchmarks/results/export_cpu_*_rep*.json | tee benchmarks/results/export_cpu_summary.md
