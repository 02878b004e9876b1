#!/bin/bash
# Reduced follow-up of run_all.sh used at the end of the session (time-boxed): final code for WR50 at 32 images,
# R18 side by side, Lite0 hazelnut accuracy side by side.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-.venv-bench/bin/python}
OUT=benchmarks/results
run() { name=$1; shift; echo "=== $name $(date -u +%H:%M:%S)" >> $OUT/progress.log; $PY benchmarks/bench_padim.py "$@" --json $OUT/$name.json --markdown $OUT/$name.md > $OUT/$name.stdout 2> $OUT/$name.stderr; echo "=== $name exit $? $(date -u +%H:%M:%S)" >> $OUT/progress.log; }
run wr50_n32_final --configs wr50 --n-images 32 --repeats 1 --no-anomalib --no-hazelnut
run r18_n32 --configs r18 --n-images 32 --repeats 1 --no-hazelnut
run hazelnut_lite0 --hazelnut-only --configs lite0
run r18_n256_1000 --configs r18 --n-images 256 1000 --repeats 1 --anomalib-max-images 256 --fit-only-above 256 --no-hazelnut
