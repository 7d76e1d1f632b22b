"""Recipes importable from the installed package (``nemo-pp finetune`` runs ``nemo_pp.recipes.finetune``)."""
