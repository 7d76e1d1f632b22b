#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct fine-tuned on SQuAD through a 2-stage pipeline.
# Extra arguments are config overrides, e.g. --step_scheduler.max_steps 5
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m nemo_pp.assets
exec .venv/bin/torchrun --nproc_per_node=2 recipes/finetune.py --config configs/smollm2_135m_squad_pp2.yaml "$@"
