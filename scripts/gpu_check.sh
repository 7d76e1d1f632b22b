#!/usr/bin/env bash
# The GPU acceptance check (scripts/gpu_check.py): CUDA-only tests and a bf16 recipe on a
# synthetic 1.5B Llama, with a table of step time, tokens/s, TFLOP/s, MFU and peak memory
# against the memory plan. Without a CUDA device it says so and exits 0 having run nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
