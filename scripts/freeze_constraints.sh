#!/usr/bin/env bash
# Rewrite constraints.txt from .venv after the suite passed there: the exact tested versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
  echo "# The exact versions the test suite passed on (python 3.11, CPU, torch 2.13.0 installed first)."
  echo "# scripts/setup_env.sh installs with -c constraints.txt; regenerate after a passing run with"
  echo "# scripts/freeze_constraints.sh. torch is not listed: setup_env.sh pins it (CPU) or you bring your CUDA build."
  .venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' | grep -iv '^nvidia-\|^triton=='
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
