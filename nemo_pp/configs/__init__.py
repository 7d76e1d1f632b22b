"""The shipped recipe configs (YAML), installed with the package so that
``nemo-pp finetune --config <name>`` and ``nemo-pp cp <name> my.yaml`` find them by name.
In a clone, ``configs/`` at the repository root is a link to this folder."""
