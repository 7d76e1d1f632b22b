"""Launchers above torchrun: :mod:`nemo_pp.launch.slurm` writes and submits the batch
script of ``nemo-pp finetune --slurm`` (its template: ``finetune.sbatch`` in this package)."""
