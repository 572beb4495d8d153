#!/usr/bin/env bash
# One device call (H200) for issue 10's attention / compile work: GPU tests of the changed kernels, the fused
# attention's passes before (BEFORE_ROOT's kernels) and after (this tree's, with a launch sweep), then
# bench_sd_scale.py inside what is left of the time, compiled dgq-w8a8 early.
# Usage (from a staged copy): bash scripts/gpu_speed.sh OUT_DIR [total seconds] [BEFORE_ROOT]
# SKIP_ATTENTION=1 leaves out the attention passes; COMPILE_NEED_S (default 150: the SD-scale dgq-w8a8 compile ran
# past 87 s in the first call of this script) is the time the compile section needs before the deadline.
set -u
out=${1:?output folder}; total=${2:-400}; before=${3:-}
mkdir -p "$out"
start=$(date +%s)
used() { echo $(( $(date +%s) - start )); }
log="$out/gpu_tests.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv > "$log" 2>&1
export DGQ_KMEANS_TIMEOUT=${DGQ_KMEANS_TIMEOUT:-90} PYTHONUNBUFFERED=1
# the kernel tests at every SD head dim in fp16 (self + cross), fp32 and bf16 at head dim 64, the processor's
# recipes in fp16 at 4096 tokens, the fallbacks; results per case to gpu_results.json
DGQ_GPU_TEST_OUT="$out/gpu_results.json" timeout 105 python -m pytest -v -m gpu -p no:cacheprovider \
  tests/test_fake_quant_kernel.py tests/test_kernels_attention.py -rfE \
  -k "registered_op or transposed or (bit_identical and float16 and not bfloat16) or (kernel_matches and (float16 and not bfloat16)) or (kernel_matches and nq1024-d64) or (processor and float16 and not bfloat16 and (dgq or static)) or fallbacks" \
  >> "$log" 2>&1
echo "pytest exit $? after $(used) s" >> "$log"
sweep="64l=128,64,8,3 64l=128,128,8,3 64l=128,128,4,3 64l=128,64,4,4 64l=64,64,4,3 128l=128,64,4,3 128l=64,64,4,3"
if [ -n "$before" ] && [ -z "${SKIP_ATTENTION:-}" ]; then
  timeout 40 python benchmarks/bench_attention_core.py --root "$before" --label "before (main's kernels)" \
    --out "$out/attn_before" >> "$out/attn.log" 2>&1
  echo "attention before: exit $? after $(used) s" >> "$log"
fi
[ -z "${SKIP_ATTENTION:-}" ] && timeout 60 python benchmarks/bench_attention_core.py --label "after (this tree) + launch sweep" --sweep $sweep \
  --best-env "$out/best_launch.txt" --out "$out/attn_after" >> "$out/attn.log" 2>&1
echo "attention after: exit $? after $(used) s" >> "$log"
best=$(cat "$out/best_launch.txt" 2>/dev/null | tr -d '\n')
[ -n "$best" ] && export DGQ_ATTENTION_LAUNCH="$best"
echo "DGQ_ATTENTION_LAUNCH='${best}'" >> "$log"
cat "$out"/attn_before.md "$out"/attn_after.md >> "$log" 2>/dev/null
rm -f "$out"/attn_before.md "$out"/attn_after.md "$out/best_launch.txt"
left=$(( total - $(used) - 12 ))
echo "bench deadline ${left}s" >> "$log"
timeout $(( left + 8 )) python benchmarks/bench_sd_scale.py --deadline "$left" --presets dgq-w8a8 dgq-w8a6 \
  --batches 1 8 --calib-prompts 8 32 64 --calib-presets dgq-w8a8 --compile-presets dgq-w8a8 \
  --compile-modes default reduce-overhead --compile-early --compile-need-s "${COMPILE_NEED_S:-150}" --calib-need-s 45 --channels-last \
  --profile-presets fp dgq-w8a8 --out "$out/sd_scale_h200" > "$out/sd_scale_h200.log" 2>&1
echo "exit $? after $(used) s" >> "$out/sd_scale_h200.log"
