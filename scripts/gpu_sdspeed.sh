#!/usr/bin/env bash
# One device call for issue 10's speed work (H200): GPU tests, then bench_sd_scale.py inside a deadline.
# Usage (from a staged copy of the repository): bash scripts/gpu_sdspeed.sh OUT_DIR [total seconds]
set -u
out=${1:?output folder}; total=${2:-440}
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu_tests.txt" 2>&1
python -c "import accelerate; print('accelerate', accelerate.__version__)" >> "$out/gpu_tests.txt" 2>&1
# a K-means worker pool that finishes no chunk of fits in 90 s fails the calibration clearly (never a hang)
export DGQ_KMEANS_TIMEOUT=${DGQ_KMEANS_TIMEOUT:-90}
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py tests/test_fake_quant_kernel.py \
  tests/test_gpu_speed_paths.py -k "not inductor" -s -rA 2>&1 | grep -v "^PASSED\|^$" | tail -60 >> "$out/gpu_tests.txt"
left=$(( total - ($(date +%s) - start) - 15 ))
echo "bench deadline ${left}s" >> "$out/gpu_tests.txt"
timeout $(( left + 10 )) python benchmarks/bench_sd_scale.py --deadline "$left" --presets dgq-w8a8 dgq-w8a6 \
  --batches 1 8 --calib-prompts 8 32 64 --calib-presets dgq-w8a8 --compile-presets dgq-w8a8 \
  --compile-modes default reduce-overhead --compile-need-s 110 --calib-need-s 45 --channels-last \
  --profile-presets fp dgq-w8a8 --out "$out/sd_scale_h200" > "$out/sd_scale_h200.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/sd_scale_h200.log"
