#!/bin/bash
# The benchmark runs behind BENCHMARKS.md, one heavy process at a time (2-core, 24 GB machine shared with others).
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-.venv-bench/bin/python}
OUT=benchmarks/results
mkdir -p $OUT
run() { name=$1; shift; echo "=== $name $(date -u +%H:%M:%S)" >> $OUT/progress.log; $PY benchmarks/bench_padim.py "$@" --json $OUT/$name.json --markdown $OUT/$name.md > $OUT/$name.stdout 2> $OUT/$name.stderr; echo "=== $name exit $? $(date -u +%H:%M:%S)" >> $OUT/progress.log; }
# anomalib WR50 only at 32 images (it peaks ~16 GB there and grows ~7 MB per image)
[ -n "$WITH_ANOMALIB_WR50" ] && run wr50_n32 --configs wr50 --n-images 32 --repeats 1 --no-hazelnut
run wr50_n32_padim_hf --configs wr50 --n-images 32 --repeats 1 --no-anomalib --no-hazelnut
run wr50_n256_1000 --configs wr50 --n-images 256 1000 --repeats 1 --no-anomalib --no-hazelnut --fit-only-above 256
run r18_n32 --configs r18 --n-images 32 --repeats 3 --no-hazelnut
run r18_n256_1000 --configs r18 --n-images 256 1000 --repeats 1 --anomalib-max-images 256 --fit-only-above 256 --no-hazelnut
run hazelnut_lite0 --hazelnut-only --configs lite0
run hazelnut_wr50 --hazelnut-only --no-anomalib --configs wr50
