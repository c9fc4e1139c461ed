#!/usr/bin/env bash
# A/B timing of run-time switches on the device machine: `hymba bench` for
# each configuration (a set of environment variables) and each benchmark,
# alternated round by round so that the card's drift hits every
# configuration alike, then the median per (benchmark, configuration).
#
#   AB_CONFIGS  configurations separated by '|'; each is space-separated
#               VAR=VALUE assignments, empty for the defaults
#               (default: "|HYMBA_PDL=0")
#   AB_RUNS     benchmarks, comma-separated (default: 1k,8k,batch):
#                 1k     batch-1 decode after a 1024-token prompt (decode ms/step)
#                 8k     batch-1 decode after an 8192-token prompt (decode ms/step)
#                 batch  128 sequences of 8192 tokens decoding together (ms/step)
#                 b4, b8 4 or 8 sequences of 1024 tokens decoding together (ms/step)
#                 pre8k  prefill of 8192 tokens (tok/s)
#   AB_ROUNDS   rounds (default 3)
#
# Example: AB_CONFIGS="|HYMBA_ATTN_SPAN=16|HYMBA_ATTN_SPAN=32" AB_RUNS=batch bash bench/ab_bench.sh
# Build here with bench/cuda_prepare.sh and carry build-cuda/dist.tar.gz.
# Lines go to stdout and $OUT/ab.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
make_model "$out/init.log"

# Split on '|' keeping empty fields, a trailing one included ("X|" is X and
# the defaults; `read -a` would drop it).
configs=()
rest="${AB_CONFIGS-|HYMBA_PDL=0}|"
while [ -n "$rest" ]; do
  configs+=("${rest%%|*}")
  rest="${rest#*|}"
done
IFS=',' read -ra runs <<<"${AB_RUNS:-1k,8k,batch}"
rounds=${AB_ROUNDS:-3}

run_args() {
  case "$1" in
    1k) echo "--prompt-len 1024 --gen-len 128" ;;
    8k) echo "--prompt-len 8192 --gen-len 64" ;;
    batch) echo "--prompt-len 8192 --gen-len 16 --batch 128 --batch-fill replicate" ;;
    b4) echo "--prompt-len 1024 --gen-len 128 --batch 4 --batch-fill replicate" ;;
    b8) echo "--prompt-len 1024 --gen-len 128 --batch 8 --batch-fill replicate" ;;
    pre8k) echo "--prompt-len 8192 --gen-len 2" ;;
    *) return 1 ;;
  esac
}
metric() { [ "$1" = pre8k ] && echo prefill_tok_s || echo decode_step_ms; }
for r in "${runs[@]}"; do run_args "$r" >/dev/null || { echo "unknown benchmark '$r' in AB_RUNS" >&2; exit 2; }; done

results=$(mktemp)
for ((round = 1; round <= rounds; round++)); do
  for r in "${runs[@]}"; do
    for c in "${configs[@]}"; do
      # shellcheck disable=SC2046,SC2086  # word splitting of the assignments and the arguments is intended
      json=$(env $c timeout 150 "$hymba" bench -m "$model" --device cuda --json $(run_args "$r") 2>/dev/null)
      v=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['$(metric "$r")'])" "$json" 2>/dev/null || echo nan)
      printf '%s\t%s\t%s\n' "$r" "${c:-defaults}" "$v" | tee -a "$results"
    done
  done
done | sed 's/^/run /' | tee "$out/ab.txt"

echo "median over $rounds rounds (ms/step; pre8k: tok/s):" | tee -a "$out/ab.txt"
python3 - "$results" <<'PY' | tee -a "$out/ab.txt"
import statistics, sys
from collections import OrderedDict
cells = OrderedDict()
for line in open(sys.argv[1]):
    run, cfg, v = line.rstrip("\n").split("\t")
    cells.setdefault((run, cfg), []).append(float(v))
for (run, cfg), vs in cells.items():
    ok = [v for v in vs if v == v]
    med = statistics.median(ok) if ok else float("nan")
    print(f"{run:6} {cfg:40} median {med:10.3f}   runs {' '.join(f'{v:.3f}' for v in vs)}")
PY
rm -f "$results"
