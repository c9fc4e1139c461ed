#!/usr/bin/env bash
# CPU benchmark of the issue's setup: the random-weight 1.5b preset in bf16
# (identical config to Hymba-1.5B), 2 threads. Prints the JSON of
#   1. prompt 512 / 64 generated tokens (prefill and decode speed),
#   2. a 4K context (prompt 4000 + 96 generated) for peak RSS.
# Usage: bench/cpu_bench.sh [THREADS] [MODEL_DIR] [extra hymba bench options, e.g. --hugepages]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
model=${2:-build/models/hymba-1.5b-random-bf16}
shift $(( $# < 2 ? $# : 2 ))
extra=("$@")
[[ -x build/hymba ]] || scripts/build.sh
if [[ ! -f $model/model.safetensors ]]; then
  build/hymba init --preset 1.5b --dtype bf16 --seed 1 --out "$model"
fi
echo "# machine: $(lscpu | sed -n 's/^Model name: *//p') / $(nproc) cores, $(date -u +%F)"
# The memory-read ceiling in this same run (decode is bandwidth-bound).
[[ -x build/bench/bench_matmul ]] || cmake --build build --target bench_matmul >/dev/null
build/bench/bench_matmul --threads "$threads" --n 1 --reps 5 --shape 8960x1600 | grep -E "probe|8960"
echo "# hymba bench -m $model --prompt-len 512 --gen-len 64 -t $threads --json ${extra[*]}"
build/hymba bench -m "$model" --prompt-len 512 --gen-len 64 -t "$threads" --json "${extra[@]}"
echo "# hymba bench -m $model --prompt-len 4000 --gen-len 96 -t $threads --json ${extra[*]}"
build/hymba bench -m "$model" --prompt-len 4000 --gen-len 96 -t "$threads" --json "${extra[@]}"
