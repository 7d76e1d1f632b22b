"""The GPU acceptance script: without CUDA it says so and runs nothing; its run plans here."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_runs_nothing_and_exits_0():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "pytest" not in proc.stdout


def test_its_run_plans_on_the_meta_device():
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--plan-only"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedule Interleaved1F1B" in proc.stdout and "memory plan:" in proc.stdout
