# Sourced by the device-side scripts (bench/gpu_bench.sh, bench/ab_bench.sh)
# from the repository root: unpacks what bench/cuda_prepare.sh left to carry
# (build-cuda/dist.tar.gz) and sets up the carried binaries' environment.
# Sets dist, hymba, tests, model and out (results: $OUT, made here); defines
# make_model LOG.
dist=${DIST:-build-cuda/dist}
[ -d "$dist" ] || [ ! -f build-cuda/dist.tar.gz ] || tar -C build-cuda -xzf build-cuda/dist.tar.gz
hymba=$dist/bin/hymba
tests=$dist/bin/hymba_cuda_tests
[ -x "$hymba" ] || { echo "no $hymba: run bench/cuda_prepare.sh here and carry build-cuda/dist.tar.gz" >&2; exit 1; }
export LD_LIBRARY_PATH="$PWD/$dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ! ldd "$hymba" | grep -q "libcublasLt.so.13 => /"; then
  lt=$(find / -xdev -name 'libcublasLt.so.13' 2>/dev/null | head -1)
  [ -n "$lt" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$lt")"
fi
ldd "$hymba" 2>&1 | grep -q "not found" && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PWD/$dist/lib-extra"
export HYMBA_TEST_WORK=$PWD/$dist/test-work HYMBA_SHARED_DIR=$PWD/$dist/shared HYMBA_REPO_DIR=$PWD
export OMP_NUM_THREADS=$(nproc)
out=${OUT:-/tmp/hymba-gpu-out}
mkdir -p "$out"

# The benchmark model: random weights of the released 1.5B config, in bf16.
model=${MODEL:-/tmp/hymba-1.5b-random-bf16}
make_model() {
  [ -f "$model/model.safetensors" ] ||
    timeout 150 "$hymba" init --preset 1.5b --dtype bf16 --seed 1 --out "$model" >"$1" 2>&1 ||
    echo "init failed (log: $1)"
}
