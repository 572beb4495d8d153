#!/usr/bin/env bash
# The GPU checks still open, as one device call of about 9 minutes (carry .whl: bash scripts/gpu_wheels.sh):
#   1. notebook 04's 8-bit section on CUDA (tests/test_eightbit_study.py -m gpu: int8 + fp8 rows, layer agreement);
#   2. issue 15's bit-identity of 2 processes against 1 on one GPU (scripts/gpu_sharded.sh, ~2.5 min);
#   3. issue 10's compiled SD-scale step: FP and dgq-w8a8 under torch.compile, eager beside it, and the profile.
# Usage: bash scripts/gpu_open_checks.sh OUT [seconds for step 3, default 380]
# At most 8 files come back from a device call: everything lands as flat files in OUT.
set -u
out=${1:?usage: gpu_open_checks.sh OUT [bench seconds]}; bench_s=${2:-380}
mkdir -p "$out"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PATH=/tmp/site/bin:$PATH
timeout 120 python3 -m pytest -q -m gpu tests/test_eightbit_study.py -rA > "$out/eightbit_gpu_tests.txt" 2>&1
echo "8-bit section GPU test: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
bash scripts/gpu_sharded.sh /tmp/sharded 16 >> "$out/log.txt" 2>&1
cp /tmp/sharded/summary.md "$out/sharded_summary.md" 2>/dev/null
cp /tmp/sharded/summary.json "$out/sharded_summary.json" 2>/dev/null
cp /tmp/sharded/log.txt "$out/sharded_log.txt" 2>/dev/null
echo "sharded check done after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
timeout $(( bench_s + 15 )) python3 benchmarks/bench_sd_scale.py --deadline "$bench_s" --presets dgq-w8a8 --batches 8 \
  --calib-prompts 8 --compile-presets dgq-w8a8 --compile-modes default --compile-early --compile-need-s 200 \
  --profile-presets dgq-w8a8 --out "$out/sd_scale_compile" > "$out/sd_scale_compile.log" 2>&1
echo "compiled SD-scale step: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
