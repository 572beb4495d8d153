#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-excluded; scripts/gpu_report.sh installs them there).
#
#   bash scripts/gpu_wheels.sh
#
# scripts/gpu_wheels.txt pins them: what diffusers, papermill, nbclient, nbconvert (with tinycss2, which its HTML
# sanitizer needs), ipykernel, ipywidgets, torch-fidelity and open_clip_torch need beyond the device image's packages
# (../.library/device/KINDS.md lists those), at the versions of this project's environment, for CPython 3.12.
# widgetsnbextension / jupyterlab_widgets (browser assets, 2.5 MB) are left out: the device tool carries at most
# 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
platforms=()
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl -r scripts/gpu_wheels.txt
du -sh .whl
