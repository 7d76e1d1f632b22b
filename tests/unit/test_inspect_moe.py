"""The memory plans of the shipped real mixture-of-experts configs (``configs/models/``,
config only) at the README's layouts, printed by ``scripts/inspect_pipeline.py`` from the
meta device: the experts per ep rank, the all-to-all volume and a plan per pp rank."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.helpers import ROOT


def _inspect(argv: list[str], capsys) -> str:
    spec = importlib.util.spec_from_file_location("inspect_pipeline", ROOT / "scripts" / "inspect_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("folder, pp, ep, world, experts", [
    ("qwen3-30b-a3b", 4, 8, 32, "16 of 128"),
    ("deepseek-v3", 4, 64, 256, "4 of 256"),
])
def test_real_moe_configs_print_their_memory_plans(real_assets, tmp_path, capsys, folder, pp, ep, world, experts):
    out = _inspect([
        "--config", str(ROOT / "configs" / "smollm2_135m_squad_pp2.yaml"),
        "--model.pretrained_model_name_or_path", str(ROOT / "configs" / "models" / folder),
        "--model.torch_dtype", "bfloat16", "--distributed.pp_size", str(pp), "--distributed.ep_size", str(ep),
        "--world-size", str(world), "--dataloader.batch_size", "8", "--step_scheduler.global_batch_size",
        str(8 * world // pp), "--dataset.seq_length", "4096", "--validation_dataset.seq_length", "4096",
        "--png", str(tmp_path / "schedule.png"),
    ], capsys)
    assert f"moe_mesh pp {pp} x ep_shard 1 x ep {ep}; each rank holds {experts} experts per MoE layer" in out
    sent = [float(x) for x in re.findall(r"stage \d+: ([\d.]+) GiB", out.split("expert all-to-all sent")[1].split("\n")[0])]
    assert len(sent) == pp and all(x > 1 for x in sent)
    rows = re.findall(r"^  (\d)\s+\[\d\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(pp))
    for _, params, _grads, optim, act, act_ac in rows:
        assert float(act_ac) < float(act) and float(params) > 0 and float(optim) == pytest.approx(2 * float(params), abs=0.02)
    assert float(rows[0][5]) < float(rows[0][4]) / 10  # the first rank holds pp microbatches: checkpointing pays
