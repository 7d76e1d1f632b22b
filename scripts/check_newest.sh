#!/usr/bin/env bash
# The manual check against the newest releases (run it before raising an upper bound in
# pyproject.toml, or on a schedule): a separate venv, the CPU torch pin, everything else
# unconstrained, then the unit and multi-rank tests (no end-to-end ones). Deprecation
# warnings from nemo_pp's own calls into transformers fail the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv-newest}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${NEMO_PP_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q --upgrade -e ".[dev,assets]"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(transformers|datasets|peft|accelerate|safetensors) '
"$VENV/bin/python" -m nemo_pp.assets
exec "$VENV/bin/python" -m pytest -q -m "not e2e" -W "error::FutureWarning:nemo_pp" "$@"
