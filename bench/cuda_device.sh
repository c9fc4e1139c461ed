#!/usr/bin/env bash
# Device-side runner for the CUDA backend: runs the binaries that
# bench/cuda_prepare.sh built here and gathered into build-cuda/dist (carry
# that path with the run), writes logs to $OUT and prints a short summary.
#   1. the CUDA-vs-CPU op tests (tests/cuda/test_cuda_backend.cpp),
#   2. compute-sanitizer memcheck on them (all but the Memory test, whose
#      deliberate out-of-memory cudaMalloc memcheck reports as an API
#      error) and racecheck on attention and scan,
#   3. unless BENCH=0, the timing test (Hymba-1.5B shapes).
# Each step has a time limit; the script always ends with the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${DIST:-build-cuda/dist}
out=${OUT:-/tmp/hymba-cuda-out}
mkdir -p "$out"
bin=$dist/bin/hymba_cuda_tests
[ -x "$bin" ] || { echo "no $bin: run bench/cuda_prepare.sh here first and carry $dist"; exit 1; }

export LD_LIBRARY_PATH="$PWD/$dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ! ldd "$bin" | grep -q "libcublasLt.so.13 => /"; then  # fall back to a pip-installed cuBLAS
  lt=$(find / -xdev -name 'libcublasLt.so.13' 2>/dev/null | head -1)
  [ -n "$lt" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$lt")"
fi
if ldd "$bin" 2>&1 | grep -q "not found"; then
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PWD/$dist/lib-extra"
fi
ldd "$bin" >"$out/ldd.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader >"$out/gpu.txt" 2>&1
export OMP_NUM_THREADS=$(nproc)

echo "== tests"
timeout 150 "$bin" --gtest_color=no >"$out/tests.log" 2>&1
rc_tests=$?
grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[  FAILED|Failure|error" "$out/tests.log" | head -40

echo "== compute-sanitizer memcheck"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin" --gtest_color=no \
  --gtest_filter='-*Memory*:*Timing*' >"$out/memcheck.log" 2>&1
rc_mem=$?
echo "== compute-sanitizer racecheck (attention, scan)"
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 "$bin" --gtest_color=no \
  --gtest_filter='*Attention*:*SelectiveScan*' >"$out/racecheck.log" 2>&1
rc_race=$?

rc_bench=skipped
if [ "${BENCH:-1}" = 1 ]; then
  echo "== timing"
  timeout 60 "$bin" --gtest_color=no --gtest_also_run_disabled_tests --gtest_filter='*Timing*' >"$out/timing.log" 2>&1
  rc_bench=$?
fi

echo
echo "================ summary"
echo "gpu: $(cat "$out/gpu.txt")"
grep "^\[cuda-vs-cpu\]" "$out/tests.log" | grep -v rel_l2 || true
echo "tests: rc=$rc_tests  $(grep -E '^\[  PASSED  \]|^\[  FAILED  \].*tests?, listed' "$out/tests.log" | tr '\n' ' ')"
echo "memcheck: rc=$rc_mem  $(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -1)"
echo "racecheck: rc=$rc_race  $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck.log" | tail -1)"
[ -f "$out/timing.log" ] && grep "^\[cuda-timing\]" "$out/timing.log"
echo "bench: rc=$rc_bench"
[ "$rc_tests" = 0 ] && [ "$rc_mem" = 0 ] && [ "$rc_race" = 0 ]
