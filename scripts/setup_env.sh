#!/usr/bin/env bash
# Create .venv (or reuse it), install the pinned CPU torch FIRST (a plain `torch`
# would pull gigabytes of CUDA), then this project with its dev and asset extras, at the
# exact versions the suite passed on (constraints.txt; scripts/check_newest.sh tries the newest).
# On a GPU machine, install your CUDA torch build into the venv before running this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${NEMO_PP_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,assets]"
