#!/usr/bin/env bash
# The fused-attention GPU job in one device call: the micro-benchmark first (alone on the GPU, clean timings),
# then the gpu-marked tests of tests/test_kernels_attention.py, one process per dtype in parallel (Triton
# compiles each kernel variant on the CPU: three processes use three cores).
#
#   bash benchmarks/gpu_attention.sh OUTDIR [WHEEL_DIR...]
#
# Wheels (diffusers; pytest and hypothesis where the machine lacks them) are installed from the WHEEL_DIRs into
# /tmp/site. Writes OUTDIR/env.txt (versions, the benchmark's output), attention_h200.{json,md}, tests.log and
# gpu_tests.json (the measured flip fractions and errors of every case) -- five files, under the device tool's
# limit of eight.
set -o pipefail
OUTDIR=${1:?usage: gpu_attention.sh OUTDIR [WHEEL_DIR...]}
shift
mkdir -p "$OUTDIR"
start=$(date +%s)
wheels=()
for d in "$@"; do wheels+=("$d"/*.whl); done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c "import torch, triton, diffusers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUTDIR/env.txt"
timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/bench_attention.py --out "$OUTDIR/attention_h200" ${BENCH_ARGS:-} \
  2>&1 | tee -a "$OUTDIR/env.txt"
echo "bench rc=$? at $(( $(date +%s) - start )) s" | tee -a "$OUTDIR/env.txt"
pids=()
tags=(float16 bfloat16 float32)
sels=("(float16 and not bfloat16) or fallbacks" "bfloat16" "float32")
if [ -n "${TESTS_K:-}" ]; then  # a shorter run: ';'-separated -k selections, one process each
  IFS=';' read -r -a sels <<< "$TESTS_K"
  tags=(); for i in "${!sels[@]}"; do tags+=("part$i"); done
fi
for i in "${!sels[@]}"; do
  DGQ_GPU_TEST_OUT="/tmp/gpu_tests_${tags[$i]}.json" timeout "${TEST_TIMEOUT:-200}" \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_attention.py -k "${sels[$i]}" -rA -v --tb=short \
    > "/tmp/tests_${tags[$i]}.log" 2>&1 &
  pids+=($!)
done
for i in "${!sels[@]}"; do wait "${pids[$i]}"; echo "tests ${tags[$i]} rc=$?" | tee -a "$OUTDIR/env.txt"; done
for t in "${tags[@]}"; do echo "== tests -m gpu, ${t}"; cat "/tmp/tests_$t.log"; done > "$OUTDIR/tests.log"
python3 - "$OUTDIR/gpu_tests.json" <<'PY'
import glob, json, sys
rows = []
for f in sorted(glob.glob("/tmp/gpu_tests_*.json")):
    rows += json.load(open(f))
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print(len(rows), "gpu test records")
PY
for t in "${tags[@]}"; do echo "== $t"; tail -n 15 "/tmp/tests_$t.log"; done
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUTDIR/env.txt"
