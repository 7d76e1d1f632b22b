"""Fixtures the end-to-end modules share."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import ROOT, metric_records, quiet_env, restart_command


@pytest.fixture(scope="session")  # one reference run for the restart and the Slurm tests
def straight_loss(tiny_assets, tmp_path_factory) -> float:
    """The final train loss of the restart run (:func:`tests.helpers.restart_command`)
    uninterrupted: what every interrupted and resumed run must end with."""
    model, squad = tiny_assets
    out = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(restart_command(model, squad, out), cwd=ROOT, env=quiet_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metric_records(out)[-1]["final_train_loss"]
