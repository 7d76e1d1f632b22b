"""The package without a clone: the wheel installed into a fresh venv runs the shipped main
config by name from an empty directory (``nemo-pp finetune``), ``nemo-pp cp`` copies it, and
``nemo-pp plan`` plans it and the shipped 70B config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, timeout=600, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.e2e
def test_wheel_in_a_fresh_venv_runs_a_shipped_config_by_name(real_assets, tmp_path):
    dist = tmp_path / "dist"
    isolation = ["--no-build-isolation"] if _has_setuptools() else []  # else pip fetches setuptools
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", dist, ROOT], cwd=tmp_path)
    wheel = next(dist.glob("nemo_pp-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    # torch, transformers, ... from the test environment; nemo_pp only from the wheel
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    where = _run([py, "-c", "import nemo_pp; print(nemo_pp.__file__)"], tmp_path).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the clone

    work = tmp_path / "work"
    work.mkdir()
    nemo_pp = venv / "bin" / "nemo-pp"
    listed = _run([nemo_pp, "list"], work).stdout
    assert "smollm2_135m_squad_pp2 " in listed and "smollm2_135m_squad_pp2_lora" in listed
    _run([nemo_pp, "cp", "smollm2_135m_squad_pp2", "mine.yaml"], work)
    assert (work / "mine.yaml").read_text() == (ROOT / "configs" / "smollm2_135m_squad_pp2.yaml").read_text()

    proc = _run([nemo_pp, "finetune", "--config", "smollm2_135m_squad_pp2", "--nproc-per-node", "2",
                 "--step_scheduler.max_steps", "2", "--step_scheduler.global_batch_size", "2",
                 "--dataloader.batch_size", "2", "--dataset.seq_length", "64", "--dataset.limit_dataset_samples", "16",
                 "--validation_dataset.limit_dataset_samples", "2", "--checkpoint.enabled", "false",
                 "--checkpoint.save_consolidated", "false", "--evaluation", "null"], work, env={"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert "-m nemo_pp.recipes.finetune --config " + str(site) in proc.stdout  # the packaged recipe and config
    records = [json.loads(line) for line in (work / "outputs" / "smollm2_135m_squad_pp2" / "metrics.jsonl")
               .read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]

    # the Slurm batch script's template is package data: a dry run renders it from the wheel
    dry = _run([nemo_pp, "finetune", "--config", "smollm2_135m_squad_pp2", "--slurm", "--nodes", "1",
                "--gpus-per-node", "2", "--dry-run", "--dist_env.device", "cpu", "--checkpoint.enabled", "true"],
               work).stdout
    assert "#SBATCH --requeue" in dry and f"--config {site}/nemo_pp/configs/smollm2_135m_squad_pp2.yaml" in dry

    # the layout search from the wheel: the shipped config, and the shipped 70B config (its model a
    # config folder inside the package) over 8 nodes of 8 H100s, written as a YAML the recipe plans
    small = _run([nemo_pp, "plan", "--config", "smollm2_135m_squad_pp2", "--gpus-per-node", "2", "--device", "H100",
                  "--top", "3"], work).stdout
    assert "best layout, as a command line" in small and "nemo-pp finetune --config smollm2_135m_squad_pp2" in small
    large = _run([nemo_pp, "plan", "--config", "llama3_1_70b_squad", "--nodes", "8", "--gpus-per-node", "8",
                  "--device", "H100", "--top", "3", "--yaml", "best70b.yaml"], work).stdout
    assert "64 ranks (8 per node) of H100" in large and (work / "best70b.yaml").is_file()
    _run([py, "-c", "from nemo_pp.planning.schema import load_recipe_config; from nemo_pp.planning.run_plan import "
          "plan_run; print(plan_run(load_recipe_config('best70b.yaml'), 64, check_checkpoint=False).describe())"], work)


def _has_setuptools() -> bool:
    import importlib.util

    return importlib.util.find_spec("setuptools") is not None
