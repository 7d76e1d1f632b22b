#!/usr/bin/env bash
# The whole test suite: the import-layer contract and ruff, then unit, multi-rank (gloo) and
# end-to-end torchrun tests on the real SmolLM2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# Debian's Slurm for tests/e2e/test_slurm.py (root with apt-get; otherwise it only says so)
bash scripts/install_slurm.sh
# the layers (pyproject.toml [tool.importlinter]): no upward import, no cycle between layers
.venv/bin/lint-imports
.venv/bin/ruff check nemo_pp tests scripts examples recipes
.venv/bin/python -m nemo_pp.assets
# end-to-end tests must not skip for lack of assets here: they were just prepared
export NEMO_PP_REQUIRE_ASSETS=1
exec .venv/bin/python -m pytest -q --durations=15 "$@"
