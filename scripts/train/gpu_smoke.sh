#!/usr/bin/env bash
# GPU smoke run: every stage at real batch sizes for a few steps, the evaluation at reduced size, plus
# UNet throughput at two other batch sizes. Usage (device machine): bash scripts/train/gpu_smoke.sh $OUT
set -o pipefail
OUTDIR=${1:-/tmp/out}
source scripts/train/device_setup.sh || exit 1
S=runs/gsmoke
rm -rf $S
python3 scripts/train_embedded.py --smoke --smoke-steps 150 --device cuda --out $S --quiet --eval-n 250 --eval-real 500 2>&1 | grep -v "Loading\|Writing" | tee $OUTDIR/smoke.log
for b in 1024 256; do
  rm -rf runs/gsmoke_b$b; cp -r $S runs/gsmoke_b$b
  python3 scripts/train_embedded.py --smoke --smoke-steps 200 --device cuda --out runs/gsmoke_b$b --stages unet --quiet --unet-batch $b 2>&1 | grep "==" | tee -a $OUTDIR/smoke.log
  cp runs/gsmoke_b$b/logs/unet.jsonl $S/logs/unet_b$b.jsonl
done
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob("runs/gsmoke/logs/*.jsonl")):
    rows = [json.loads(l) for l in open(f) if '"step"' in l]
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        print(f, "steps/s (steady)", round((b["step"] - a["step"]) / (b["seconds"] - a["seconds"]), 2))
PY
tar czf - runs/gsmoke | split -b 15m - $OUTDIR/gsmoke.tgz.
