"""The fine-tuning recipe as a script, for a clone:

    torchrun --nproc_per_node=2 recipes/finetune.py --config configs/smollm2_135m_squad_pp2.yaml [--a.b value ...]

The recipe itself is :mod:`nemo_pp.recipes.finetune` (installed with the package, and what
``nemo-pp finetune`` launches).
"""

import sys

from nemo_pp.recipes.finetune import FinetuneRecipe, main  # noqa: F401  (FinetuneRecipe: for importers)

if __name__ == "__main__":
    sys.exit(main())
