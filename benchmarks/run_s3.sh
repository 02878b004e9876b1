#!/bin/bash
# The runs behind BENCHMARKS.md's "Current results" (one heavy process at a time, machine otherwise idle).
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-.venv-bench/bin/python}
OUT=benchmarks/results
run() { name=$1; shift; echo "=== $name $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/progress.log; $PY benchmarks/bench_padim.py "$@" --json $OUT/$name.json --markdown $OUT/$name.md > $OUT/$name.stdout 2> $OUT/$name.stderr; echo "=== $name exit $? $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/progress.log; }
[ "$1" = "--rest" ] || {
run wr50_n32_s3 --configs wr50 --n-images 32 --repeats 1 --no-hazelnut
run wr50_n256_s3 --configs wr50 --n-images 256 --repeats 1 --no-anomalib --no-hazelnut
}
run wr50_n1000_s3 --configs wr50 --n-images 1000 --repeats 1 --no-anomalib --no-hazelnut --fit-only-above 256
run hazelnut_wr50_s3 --hazelnut-only --configs wr50 --no-anomalib
run r18_n32_s3 --configs r18 --n-images 32 --repeats 3 --no-hazelnut
