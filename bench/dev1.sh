set -uo pipefail
base=$OUT
source bench/device_env.sh
make_model "$base/init.log"
export HYMBA_MLP_FUSED=0
nc=/usr/local/cuda/bin/ncu
timeout 100 $nc --set full --kernel-name regex:decode_fast_kernel --launch-skip 0 --launch-count 2 "$hymba" bench -m "$model" --device cuda --prompt-len 8192 --gen-len 2 --batch 128 --batch-fill replicate --no-warmup > $base/ncu_attention_batch128.txt 2>&1; echo "batch rc=$?"
timeout 50 $nc --set full --kernel-name regex:'decode_fast_kernel|normed_scan_step|conv_silu_short' --launch-skip 0 --launch-count 6 "$hymba" bench -m "$model" --device cuda --prompt-len 1024 --gen-len 2 --no-warmup > $base/ncu_branches_b1.txt 2>&1; echo "b1 rc=$?"
grep -E "decode_fast_kernel|normed_scan|conv_silu|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Warp Cycles Per Issued" $base/ncu_attention_batch128.txt $base/ncu_branches_b1.txt | sed 's/  */ /g' | cut -c1-150 | head -70
