#!/usr/bin/env bash
# The whole test suite (unit, multi-rank on gloo, end-to-end torchrun on the real SmolLM2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m nemo_pp.assets
# end-to-end tests must not skip for lack of assets here: they were just prepared
export NEMO_PP_REQUIRE_ASSETS=1
exec .venv/bin/python -m pytest -q "$@"
