#!/usr/bin/env bash
# Issue 15 item 4 on the GPU machine: the sharded generation at SD v1.5 scale (random weights) in 1 process and
# in 2 processes on the same GPU (torchrun, --one-device), then the summary, whose same_images_as_1_process
# column says whether the 2-process images are bit-identical to the 1-process ones.
#   bash scripts/gpu_sharded.sh OUTDIR [n_images] [recipes...]      (carry .whl: bash scripts/gpu_wheels.sh)
set -u
out=${1:?usage: gpu_sharded.sh OUTDIR [n_images] [recipes...]}; n=${2:-16}; shift 2 2>/dev/null || shift $#
recipes=${*:-dgq-w8a8}
mkdir -p "$out"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PATH=/tmp/site/bin:$PATH
echo "wheels installed after $(( $(date +%s) - start )) s" | tee "$out/log.txt"
args="--recipes $recipes --n-images $n --n-calibration 2 --batch-size 8"
timeout 60 python3 benchmarks/bench_sharded.py "$out" $args >> "$out/log.txt" 2>&1
echo "1 process: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
timeout 70 torchrun --nproc_per_node 2 benchmarks/bench_sharded.py "$out" $args --one-device >> "$out/log.txt" 2>&1
echo "2 processes on one GPU: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
python3 benchmarks/bench_sharded.py "$out" --report >> "$out/log.txt" 2>&1
cat "$out/summary.md" 2>/dev/null
