#!/usr/bin/env bash
# Device-side run of issue 4's checks and benchmarks, in ONE call so that
# hymba.cpp and the PyTorch baseline are measured on the same card:
#   1. the GPU tests (tests/cuda: op by op vs the CPU backend; the whole
#      engine vs the reference goldens, NVIDIA's tiny-a fixture, the CPU
#      engine, incremental decode and batch invariance);
#   2. the card's two ceilings (device-to-device copy bandwidth, bf16 GEMM);
#   3. `hymba bench --device cuda` on a random-weight 1.5B bf16 checkpoint
#      (hymba init): batch-1 decode at 1K and 8K context, 8K prefill,
#      128 sequences of 8K prompts decoding together, and 4 and 8 sequences
#      of 1K prompts (a small server's load);
#   4. bench/torch_bench.py (the PyTorch baseline, same config) with
#      TORCH_BUDGET seconds (default 200: less skips the compiled batched
#      mode, which needs ~60 s left);
#   5. compute-sanitizer memcheck on the model-level GPU tests and the
#      matmul test; (PARTS=racecheck) racecheck on the attention and scan tests.
#   6. (PARTS=profile) `hymba bench --profile`: per-op GPU time of decode,
#      8K prefill and the 32-sequence batched decode (each op synchronised);
#      PROFILE_RUNS='ARGS;ARGS' replaces those runs.
#   7. (PARTS=micro) the kernel timing tests (DISABLED_*Timing* in
#      tests/cuda): GEMV bandwidth, attention, scan, sampling.
#   9. (PARTS=ncu) Nsight Compute: each kernel's time and DRAM bytes in a
#      short decode (NCU_STEPS steps) after a prompt of NCU_PROMPT tokens
#      (default 1024), as CSV, and where the last decode step's time goes
#      (bench/ncu_step_summary.py, ncu_step.txt) and where the prompt's
#      time goes (ncu_prefill.txt; NCU_PROMPT=8192 NCU_STEPS=1 for the 8K
#      prefill); NCU_BATCH=B decodes B
#      sequences together (replicated prompt); NCU_ARGS adds ncu options.
# TORCH_MODES picks the PyTorch decode modes (default eager,graph,compile).
# PARTS selects steps (default tests,ceilings,bench,torch,memcheck).
# Build here first with bench/cuda_prepare.sh and carry build-cuda/dist.tar.gz.
# Every step has a time limit; logs and JSON go to $OUT, packed into
# $OUT/all.tgz at the end (PACK=0: left as files).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1
echo "gpu: $(cat "$out/gpu.txt")"
"$hymba" --version

parts=${PARTS:-tests,ceilings,bench,torch,memcheck}
want() { [[ ",$parts," == *",$1,"* ]]; }

if want tests; then
echo "== 1. GPU tests"
timeout 150 "$tests" --gtest_color=no >"$out/gpu_tests.log" 2>&1
echo "rc=$?"; grep -E "^\[  (FAILED|PASSED|SKIPPED) " "$out/gpu_tests.log" | head -30
grep -B2 -A6 "Failure" "$out/gpu_tests.log" | head -60
fi

if want ceilings; then
echo "== 2. ceilings"
timeout 60 python3 - >"$out/ceilings.json" 2>"$out/ceilings.log" <<'PY'
import json, torch
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); n = 10
for _ in range(n): y.copy_(x)
e.record(); torch.cuda.synchronize()
bw = 2 * x.numel() * n / (s.elapsed_time(e) / 1e3) / 1e9
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s.record()
for _ in range(10): a @ b
e.record(); torch.cuda.synchronize()
tf = 2 * 8192**3 * 10 / (s.elapsed_time(e) / 1e3) / 1e12
print(json.dumps({"copy_gb_s_read_plus_write": bw, "bf16_gemm_tflops": tf, "torch": torch.__version__}))
PY
cat "$out/ceilings.json"
fi

if want bench; then
echo "== 3. hymba bench --device cuda"
make_model "$out/init.log"
i=0
for args in "--prompt-len 1024 --gen-len 128" "--prompt-len 8192 --gen-len 64" \
            "--prompt-len 8192 --gen-len 16 --batch 128 --batch-fill replicate" \
            "--prompt-len 1024 --gen-len 128 --batch 4 --batch-fill replicate" \
            "--prompt-len 1024 --gen-len 128 --batch 8 --batch-fill replicate"; do
  i=$((i + 1))
  timeout 150 "$hymba" bench -m "$model" --device cuda --json $args >"$out/bench_$i.json" 2>"$out/bench_$i.log"
  echo "bench $i ($args): rc=$? $(tr -d '\n ' <"$out/bench_$i.json" | head -c 600)"
done
fi

if want torch; then
echo "== 4. PyTorch baseline"
timeout $(( ${TORCH_BUDGET:-200} + 60 )) python3 bench/torch_bench.py --preset 1.5b --device cuda \
  --modes "${TORCH_MODES:-eager,graph,compile}" --time-budget "${TORCH_BUDGET:-200}" --json-out "$out/torch_bench.json" \
  >"$out/torch_bench.stdout" 2>"$out/torch_bench.log"
echo "rc=$?"; tail -25 "$out/torch_bench.log"
fi

if want memcheck; then
echo "== 5. memcheck (model-level tests, matmul)"
timeout 280 compute-sanitizer --tool memcheck --error-exitcode 9 "$tests" --gtest_color=no \
  --gtest_filter='CudaModel.FixtureTinyA:CudaModel.BatchedDecodeEqualsDecodingAlone:CudaVsCpu.Matmul:CudaVsCpu.CausalConvSilu:GemvTest.*:DecodeAttention*:CudaMamba.NormedSelectiveScanStep:CudaScan.SelectiveScanChunked:CudaAttentionTc.MaskProbeExact:Sampling.GreedyTiesAndLargeVocabInChunks:CudaVsCpu.StoreRowsBatchIsBitExact:CudaVsCpu.PrepareQkvIsBitExact:CudaVsCpu.FusedProductsForLargeNMatchTheComposition:CudaVsCpu.MlpResidual:CudaMamba.NormedSelectiveScanBatch:CudaMamba.ConvSiluBatchOneToken:CudaBatch.AttentionBatch:CudaVsCpu.ConvSiluMatmul:-DecodeAttentionBatch.MixedPaperShapes' \
  >"$out/memcheck_model.log" 2>&1
echo "rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck_model.log" | tail -1)"
fi

if want racecheck; then
echo "== 5b. racecheck (attention, scan)"
timeout 280 compute-sanitizer --tool racecheck --error-exitcode 9 "$tests" --gtest_color=no \
  --gtest_filter='CudaAttentionTc.MaskProbeExact:DecodeAttention.*:CudaScan.SelectiveScanChunked:CudaMamba.NormedSelectiveScanStep:Sampling.GreedyTiesAndLargeVocabInChunks:GemvTest.GemvNormMatmul:GemvTest.GemvFuseBranchesMatmul:CudaMamba.NormedSelectiveScanBatch:CudaVsCpu.ConvSiluMatmul' >"$out/racecheck.log" 2>&1
echo "rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck.log" | tail -1)"
fi

if want profile; then
echo "== 6. decode profile"
make_model "$out/init.log"
IFS=';' read -ra profile_runs <<<"${PROFILE_RUNS:---prompt-len 1024 --gen-len 32;--prompt-len 8192 --gen-len 2;--prompt-len 2048 --gen-len 8 --batch 32 --batch-fill replicate}"
for args in "${profile_runs[@]}"; do
  echo "-- profile: $args"
  timeout 120 "$hymba" bench -m "$model" --device cuda $args --profile >>"$out/profile.log" 2>&1
  echo "rc=$?"
done
cat "$out/profile.log" | grep -v "^loading" | head -150
fi

if want nsys; then
echo "== 8. nsys: GPU kernel time of batch-1 decode (1K context) and 8K prefill"
make_model "$out/init.log"
ns=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -z "$ns" ]; then echo "nsys not found"; else
  for args in "--prompt-len 1024 --gen-len 64" "--prompt-len 8192 --gen-len 1"; do
    rep=/tmp/hymba-nsys-$RANDOM
    timeout 200 "$ns" profile -o "$rep" --force-overwrite true --stats=false "$hymba" bench -m "$model" --device cuda \
      $args >/dev/null 2>"$out/nsys.err"
    echo "-- $args"
    timeout 100 "$ns" stats -r cuda_gpu_kern_sum,cuda_api_sum -f csv "$rep.nsys-rep" 2>/dev/null >"$out/nsys_$(echo $args | tr -d ' -').csv"
    python3 - "$out/nsys_$(echo $args | tr -d ' -').csv" <<'PY'
import csv, sys
rows, cur = [], None
for line in open(sys.argv[1]):
    pass
text = open(sys.argv[1]).read()
blocks = [b for b in text.split("\n\n") if b.strip()]
for b in blocks:
    lines = [l for l in b.splitlines() if l.strip()]
    hdr = None
    for i, l in enumerate(lines):
        if l.startswith('"Time (%)"') or l.startswith("Time (%)"):
            hdr = i; break
    if hdr is None: continue
    r = list(csv.DictReader(lines[hdr:]))
    tot = sum(float(x.get("Total Time (ns)", 0) or 0) for x in r)
    print(f"  total {tot/1e6:.2f} ms over {sum(int(x.get('Instances', x.get('Num Calls', 0)) or 0) for x in r)} items")
    for x in r[:14]:
        print(f"  {float(x['Time (%)']):5.1f}%  {float(x['Total Time (ns)'])/1e6:8.2f} ms  n={x.get('Instances', x.get('Num Calls'))}  avg {float(x['Avg (ns)'])/1e3:7.1f} us  {x['Name'][:90]}")
PY
  done
fi
fi

if want ncu; then
echo "== 9. ncu: per-kernel GPU time and DRAM bytes of a ${NCU_PROMPT:-1024}-token prompt and decode (isolated kernels, clocks and caches untouched)"
make_model "$out/init.log"
nc=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
batch_args=()
[ -n "${NCU_BATCH:-}" ] && batch_args=(--batch "$NCU_BATCH" --batch-fill replicate)
timeout 400 "$nc" --clock-control none --cache-control none --csv --print-units base ${NCU_ARGS:-} \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size \
  --log-file "$out/ncu_decode.csv" "$hymba" bench -m "$model" --device cuda --prompt-len ${NCU_PROMPT:-1024} --gen-len ${NCU_STEPS:-4} \
  "${batch_args[@]}" --no-warmup >"$out/ncu_bench.log" 2>&1
echo "rc=$? $(wc -l <"$out/ncu_decode.csv") lines"
python3 bench/ncu_step_summary.py "$out/ncu_decode.csv" >"$out/ncu_step.txt" 2>&1
python3 bench/ncu_step_summary.py "$out/ncu_decode.csv" --prefill >"$out/ncu_prefill.txt" 2>&1
head -30 "$out/ncu_step.txt"
head -25 "$out/ncu_prefill.txt"
fi

if want micro; then
echo "== 7. kernel timings"
timeout 240 "$tests" --gtest_color=no --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_*Timing*' \
  >"$out/micro.log" 2>&1
echo "rc=$?"; grep -v "^\[ \|^$" "$out/micro.log" | head -120
fi

# A device call brings back at most 8 files: pack the results into one
# archive (PACK=0 leaves them as they are).
if [ "${PACK:-1}" = 1 ]; then
  # (the archive is written outside $out first: tar refuses a folder that
  # changes while it reads it)
  pack=$(mktemp /tmp/hymba-results.XXXXXX) &&
    tar -C "$out" -czf "$pack" . && find "$out" -mindepth 1 -delete && mv "$pack" "$out/all.tgz"
  echo "results packed into $out/all.tgz"
fi
