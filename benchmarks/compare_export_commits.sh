#!/bin/bash
# Our export engines (torch eager, ONNX Runtime, OpenVINO float32 / bfloat16), R18-Rd100 at 224 px, for two checkouts
# of padim_hf, interleaved (A B A B ...), each run in the checkout's own code through one venv's interpreter:
#   flock /work/coord/heavy.lock benchmarks/compare_export_commits.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR [REPEATS]
# e.g. OLD_CHECKOUT from `git worktree add --detach ../old <commit>`. Needs onnxruntime and openvino, not anomalib.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath -m "$3"); repeats=${4:-2}
python=$(realpath "$(dirname "$0")/../.venv/bin/python")
mkdir -p "$out"
for rep in $(seq "$repeats"); do
  for side in old new; do
    code=${!side}
    PYTHONPATH=$code "$python" "$code/benchmarks/bench_export.py" --configs r18 \
      --engines ours-torch ours-onnxruntime ours-openvino ours-openvino-bf16 --output "$out/r18_${side}_${rep}.json" \
      > "$out/r18_${side}_${rep}.log" 2>&1
    echo "$side repeat $rep done $(date -u +%T)"
  done
done
