#!/usr/bin/env bash
# The report chain on the GPU machine (no diffusers / papermill / jupyter there: they travel as wheels in .whl/,
# which `bash scripts/gpu_wheels.sh` downloads here; name ".whl" in the device call's carry).
#
#   bash scripts/gpu_report.sh OUTDIR [report args...]
#   e.g. bash scripts/gpu_report.sh $OUT -p device cuda -p n_prompts 2000 -p n_ablation 1000 -p batch_size 250
#
# Runs `python -m dgq_utils.report` with the arguments given, which writes into its run folder
# outputs/runs/<settings>/ (figures, results, executed notebooks + HTML, run.json) as on any machine; then packs
# outputs/runs and outputs/quick into OUTDIR/report.tgz.* (what the device tool brings back;
# `cat report.tgz.* | tar xz` unpacks it; `python -m dgq_utils.report.publish outputs/runs/<run>` makes it the
# committed set),
# and logs nvidia-smi, the package versions and the wall time of the whole call to OUTDIR/env.txt.
set -o pipefail
OUTDIR=${1:?usage: gpu_report.sh OUTDIR [report args...]}
shift
mkdir -p "$OUTDIR"
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export JUPYTER_PATH=/tmp/site/share/jupyter   # nbconvert's HTML templates installed with --target
export PATH=/tmp/site/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -c "import torch, diffusers, transformers, papermill, nbconvert, torch_fidelity, torchmetrics; \
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__, 'papermill', papermill.__version__, 'torchmetrics', torchmetrics.__version__)"
} 2>&1 | tee "$OUTDIR/env.txt"
# a missing wheel shows here, in seconds, instead of as a chain that cannot export its first notebook
python3 -c "from nbconvert import HTMLExporter; import papermill, ipykernel, diffusers, torch_fidelity" \
  || { echo "the carried wheels are incomplete (bash scripts/gpu_wheels.sh)" | tee -a "$OUTDIR/env.txt"; exit 1; }
# REPORT_TIMEOUT (s, default 560) stops the chain early enough that the packing below still runs inside the
# device call's limit: a stopped chain still brings back what it finished (with rc 124).
timeout "${REPORT_TIMEOUT:-560}" python3 -m dgq_utils.report "$@" 2>&1 | tee "$OUTDIR/report.log"
rc=$?
echo "report rc=$rc, wall $(( $(date +%s) - start )) s (wheel install included)" | tee -a "$OUTDIR/env.txt"
# the device tool brings back files of at most 16 MiB: split the archive
tar czf - outputs/runs outputs/quick 2>/dev/null | split -b 15m - "$OUTDIR/report.tgz."
ls -la "$OUTDIR"
exit $rc
