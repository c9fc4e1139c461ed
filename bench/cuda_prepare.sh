#!/usr/bin/env bash
# Here-side half of the CUDA device run (bench/gpu_bench.sh is the other).
# The device machine has CUDA but none of our Debian packages (GoogleTest,
# nlohmann-json, CLI11, sentencepiece), so nothing is built there: this
# builds ./build-cuda with nvcc here (Release, HYMBA_NATIVE=OFF since the
# device CPU may lack this one's ISA; the CPU matmul picks its path at run
# time) and gathers the test binary plus the shared libraries the device
# lacks into build-cuda/dist (bin/, lib/; libstdc++/libgcc_s into
# lib-extra/, used there only if the system ones are too old). CUDA's own
# libraries (cudart is linked statically; libcublasLt comes from the
# device's CUDA) are not carried. Carry build-cuda/dist with the run.
#
# Usage: bench/cuda_prepare.sh   (then, on the device, carrying build-cuda/dist.tar.gz:
#        bash bench/gpu_bench.sh; PARTS=tests,memcheck,racecheck for checks only)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-2}
cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DHYMBA_NATIVE=OFF -DHYMBA_BUILD_TESTS=ON -DHYMBA_CUDA=ON -DHYMBA_CUDA_SHARED=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90a}" \
  >build-cuda.configure.log 2>&1 || { cat build-cuda.configure.log; exit 1; }
rm -f build-cuda.configure.log
grep -q "HYMBA_HAVE_CUDA" build-cuda/compile_commands.json || { echo "build-cuda has no CUDA backend (nvcc not found?)"; exit 1; }
cmake --build build-cuda -j "$jobs" --target hymba_cuda_tests hymba

dist=build-cuda/dist
rm -rf "$dist"
mkdir -p "$dist/bin" "$dist/lib" "$dist/lib-extra"
cp build-cuda/tests/cuda/hymba_cuda_tests build-cuda/hymba "$dist/bin/"
strip "$dist/bin/"*
for b in "$dist/bin/"*; do ldd "$b"; done | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libcuda.so* | libcublas* | libcudart* | libc.so* | libm.so* | ld-linux* | libdl.so* | libpthread.so* | librt.so*) ;;
    libstdc++* | libgcc_s*) cp -L "$lib" "$dist/lib-extra/" ;;
    *) cp -L "$lib" "$dist/lib/" ;;
  esac
done
[ ! -f "$dist/lib/libhymba_cuda.so" ] || strip --strip-unneeded "$dist/lib/libhymba_cuda.so"
# Test data the GPU tests read (the device has no ../shared): the reference
# goldens, made here by the PyTorch reference, and NVIDIA's tiny-a fixture.
mkdir -p "$dist/test-work" "$dist/shared/fixtures"
/usr/bin/python3 tests/reference/make_goldens.py --out "$dist/test-work/goldens" >/dev/null
cp -r ../shared/fixtures/tiny-a "$dist/shared/fixtures/"
# One compressed file to carry (the two binaries share most of their code;
# the working tree plus what is carried must stay under 64 MiB).
tar -C build-cuda -czf build-cuda/dist.tar.gz dist
echo "build-cuda/dist ready (carry build-cuda/dist.tar.gz: $(du -h build-cuda/dist.tar.gz | cut -f1)):"
du -sh "$dist" "$dist"/*
ls "$dist/lib" "$dist/lib-extra"
