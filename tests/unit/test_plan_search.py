"""The layout search: it returns only layouts the recipe's plan accepts, its memory model
agrees with the memory plan and is monotone, its step-time model moves the right way, it
plans a 70B and a DeepSeek-V3 over 1,024 GPUs in seconds, and ``nemo-pp plan`` writes a
layout the recipe runs."""

from __future__ import annotations

import dataclasses
import time

import pytest

from nemo_pp.config import parse_cli
from nemo_pp.config.cli import normalize_overrides
from nemo_pp.planning.devices import GIB, KNOWN_DEVICES, DeviceSpec, device_spec
from nemo_pp.planning.layout import Layout
from nemo_pp.planning.layout_memory import ModelMemory
from nemo_pp.planning.run_plan import plan_run
from nemo_pp.planning.schema import load_recipe_config
from nemo_pp.planning.search import plan_layouts
from nemo_pp.planning.step_time import ModelShape, predict_step_time
from tests.tiny_models import tiny_config

CONFIG = "nemo_pp/configs/smollm2_135m_squad_pp2.yaml"
BIG = dataclasses.replace(KNOWN_DEVICES["H100"], memory_bytes=64 * GIB)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """``(config path, overrides)`` of the shipped config on a tiny Llama's config folder (8
    layers, 4 heads, 2 kv heads: tp 1 or 2), 1,024 tokens per sample (cp up to 4), a global
    batch of 8, and an empty data folder (planning reads no data)."""
    folder = tmp_path_factory.mktemp("tiny_plan")
    config = tiny_config("llama", layers=8, vocab=256, hidden=64)
    config.max_position_embeddings = 2048
    config.save_pretrained(folder / "model")
    (folder / "data").mkdir()
    path, overrides = parse_cli([
        "--config", CONFIG, "--model.pretrained_model_name_or_path", str(folder / "model"),
        "--dataset.path_or_dataset", str(folder / "data"), "--validation_dataset", "null", "--evaluation", "null",
        "--dataset.seq_length", "1024", "--step_scheduler.global_batch_size", "8", "--dataloader.batch_size", "8",
        "--dataloader.pad_seq_len_divisible", "16"])
    return path, overrides


def _meta(tiny_cfg, world: int = 1):
    path, overrides = tiny_cfg
    return plan_run(load_recipe_config(path, [*overrides, "distributed.pp_size=1"]), world, check_checkpoint=False)


def test_every_layout_the_search_returns_is_planned_by_the_recipe(tiny_cfg):
    path, overrides = tiny_cfg
    result = plan_layouts(path, overrides, nodes=1, gpus_per_node=4, device=BIG, top=40, exhaustive=True)
    assert result.refused == []  # the enumeration's arithmetic agrees with plan_run on every layout it ranked
    assert len(result.candidates) == 40
    axes = {(c.layout.pp, c.layout.sizes.dp, c.layout.cp, c.layout.tp) for c in result.search_space}
    assert {(4, 1, 1, 1), (1, 4, 1, 1), (1, 1, 4, 1), (2, 1, 1, 2), (2, 2, 1, 1), (1, 2, 2, 1)} <= axes
    assert {c.layout.schedule for c in result.search_space} >= {"1F1B", "Interleaved1F1B", "ZBVZeroBubble"}
    times = [c.step.total_s for c in result.candidates]
    assert times == sorted(times)
    for c in result.candidates:
        cfg = load_recipe_config(path, [*overrides, *normalize_overrides(c.layout.overrides(8))])
        run = plan_run(cfg, 4, check_checkpoint=False)
        lay = c.layout
        assert (run.sizes.pp, run.sizes.dp_replicate, run.sizes.dp_shard, run.sizes.cp, run.sizes.tp) == (
            lay.pp, lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp)
        assert run.pipeline.num_stages == lay.num_stages and run.pipeline.schedule == lay.schedule
        assert run.pipeline.microbatch_size == lay.microbatch_size and run.grad_acc_steps == lay.grad_acc_steps
        assert run.activation_checkpointing == lay.activation_checkpointing
        assert run.sizes.sequence_parallel == lay.sequence_parallel


def test_less_memory_fits_a_subset_of_the_layouts(tiny_cfg):
    path, overrides = tiny_cfg
    need = sorted(c.memory.total_bytes for c in plan_layouts(path, overrides, 1, 2, BIG, top=0, exhaustive=True)
                  .search_space)
    limit = need[len(need) // 2]  # about half of them fit without recomputation
    small = plan_layouts(path, overrides, 1, 2, dataclasses.replace(BIG, memory_bytes=limit), top=1000)
    large = plan_layouts(path, overrides, 1, 2, dataclasses.replace(BIG, memory_bytes=2 * limit), top=1000)

    def plain(result):  # recomputation is only weighed where the layout without it does not fit
        return {dataclasses.replace(c.layout, activation_checkpointing=False) for c in result.candidates}

    def without_recomputation(result):
        return {c.layout for c in result.candidates if not c.layout.activation_checkpointing}

    assert plain(small) <= plain(large)
    assert without_recomputation(small) and without_recomputation(small) < without_recomputation(large)
    assert all(c.memory.total_bytes <= limit for c in small.candidates)
    tight = plan_layouts(path, overrides, 1, 2, dataclasses.replace(BIG, memory_bytes=need[0] // 100), top=10)
    assert tight.best is None and tight.fitting == 0


def test_memory_grows_with_the_microbatch_and_shrinks_with_sharding_tp_and_recomputation(tiny_cfg):
    run = _meta(tiny_cfg)
    memory = ModelMemory(run.meta_model, seq_len=1024)
    base = Layout(2, 1, 1, 1, 1, 1, False, "1F1B", 2, None, 1, 8, 1, False)

    def need(**change) -> int:
        return max(m.total_bytes for m in memory.rank_memory(dataclasses.replace(base, **change), 1024))

    assert need() < need(microbatch_size=2) < need(microbatch_size=4)
    assert need(activation_checkpointing=True) < need()
    assert need(dp_shard=2) < need()  # FSDP shards parameters and optimizer state
    assert need(tp=2, sequence_parallel=True) < need(tp=2) < need()
    assert need(cp=2) < need()


@pytest.mark.parametrize("schedule,stages,mb,shard", [("1F1B", 2, 1, 1), ("1F1B", 2, 2, 2), ("GPipe", 2, 1, 1),
                                                      ("Interleaved1F1B", 4, 1, 1)])
def test_composed_memory_equals_the_memory_plan(tiny_cfg, schedule, stages, mb, shard):
    from nemo_pp.planning.memory import memory_plan
    from nemo_pp.planning.pipeline import make_pipeline_plan

    run = _meta(tiny_cfg)
    model = run.meta_model
    plan = make_pipeline_plan(model, 2, schedule, pp_microbatch_size=mb, pp_batch_size=8, split="balanced",
                              seq_len=1024, layers_per_stage=None, num_stages=stages if stages != 2 else None)
    exact = memory_plan(model, plan, 1024, fsdp_shards=shard)
    layout = Layout(2, 1, shard, 1, 1, 1, False, schedule, stages, None, mb, 8, 1, False)
    composed = ModelMemory(model, seq_len=1024).rank_memory(layout, 1024)
    for e, c in zip(exact, composed):
        assert c.param_bytes == pytest.approx(e.param_bytes, rel=1e-6)
        assert c.grad_bytes == pytest.approx(e.grad_bytes, rel=1e-6)
        assert c.optimizer_bytes == pytest.approx(e.optimizer_bytes, rel=1e-6)
        assert c.activation_bytes == pytest.approx(e.activation_bytes, rel=0.05)
        assert c.recv_buffer_bytes == pytest.approx(e.recv_buffer_bytes - e.recv_in_activation_bytes, rel=1e-6)


def test_step_time_moves_the_right_way(tiny_cfg):
    run = _meta(tiny_cfg)
    shape = ModelShape(ModelMemory(run.meta_model, seq_len=1024))
    base = Layout(2, 1, 1, 1, 1, 1, False, "1F1B", 2, None, 1, 8, 1, False)

    def step(layout=base, gpus_per_node=8, device=KNOWN_DEVICES["H100"]):
        return predict_step_time(shape, device, layout, 1024, gpus_per_node)

    few, many = step(dataclasses.replace(base, local_batch_size=2)), step()
    assert many.bubble_share < few.bubble_share  # (p - 1) / (m + p - 1)
    tp = dataclasses.replace(base, tp=2)
    assert step(tp).tp_s > 0 and step(tp, gpus_per_node=1).tp_s > step(tp).tp_s  # NVLink beats InfiniBand
    assert step(dataclasses.replace(base, activation_checkpointing=True)).compute_s > many.compute_s
    fsdp = dataclasses.replace(base, dp_shard=2)
    assert step(fsdp).grad_sync_s > 0 and many.grad_sync_s == 0
    slow_links = dataclasses.replace(KNOWN_DEVICES["H100"], intra_node_bandwidth=1e6)
    assert step(fsdp, device=slow_links).total_s > step(fsdp).total_s
    total = many.schedule_s + many.grad_sync_s + many.optimizer_s
    assert many.total_s == pytest.approx(total)


def test_device_table_and_sharing():
    assert device_spec("NVIDIA H100 80GB HBM3").name == "H100"
    with pytest.raises(ValueError, match="--device probe"):
        device_spec("TPU v5")
    cpu = DeviceSpec("cpu", 0.1, GIB, 1e10, 1e9, 1e9, cores=2, contention=1.5,
                     piece_seconds={256: (0.1, 1.0, 2.0), 1024: (0.4, 4.0, 8.0)})
    assert cpu.sharing_factor(1) == 1.0 and cpu.sharing_factor(2) == 1.5 and cpu.sharing_factor(4) == 3.0
    assert cpu.pieces_at(512) == pytest.approx((0.2, 2.0, 4.0))
    assert KNOWN_DEVICES["H100"].sharing_factor(8) == 1.0
    assert KNOWN_DEVICES["H100"].gemm_share(8192, 8192, 8192) > KNOWN_DEVICES["H100"].gemm_share(256, 8192, 8192)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("plan_data"))


def test_nemo_pp_plan_writes_a_layout_the_recipe_plans(data_dir, tmp_path, capsys):
    from nemo_pp.cli import main

    out = tmp_path / "best.yaml"
    start = time.perf_counter()
    code = main(["plan", "--config", "llama3_1_70b_squad", "--nodes", "128", "--gpus-per-node", "8", "--device",
                 "H100", "--top", "5", "--yaml", str(out), "--dataset.path_or_dataset", data_dir])
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert code == 0 and "best layout, as a command line" in printed and "--distributed.pp_size" in printed
    assert seconds < 120, f"planning 1,024 GPUs took {seconds:.0f} s"
    cfg = load_recipe_config(out, [f"dataset.path_or_dataset={data_dir}"])
    run = plan_run(cfg, 1024, check_checkpoint=False)
    assert run.sizes.world_size == 1024 and "nemo-pp plan:" in out.read_text()
    assert main(["plan", "--config", "llama3_1_70b_squad", "--device", "TPU"]) == 2
    assert "not a known accelerator" in capsys.readouterr().err


def test_deepseek_v3_over_1024_gpus_in_seconds(data_dir):
    path, overrides = parse_cli([
        "--config", "nemo_pp/configs/llama3_1_70b_squad.yaml", "--dataset.path_or_dataset", data_dir,
        "--model.pretrained_model_name_or_path", "${nemo_pp_configs:}/models/deepseek-v3",
        "--dataset.seq_length", "4096", "--step_scheduler.global_batch_size", "8192",
        "--distributed.sequence_parallel", "false", "--distributed.tp_size", "1", "--distributed.pp_size", "4",
        "--distributed.ep_size", "64", "--distributed.pipeline.layers_per_stage", "2",
        "--dataloader.batch_size", "32"])
    start = time.perf_counter()
    result = plan_layouts(path, overrides, 128, 8, KNOWN_DEVICES["H100"], top=3)
    assert time.perf_counter() - start < 120
    assert result.best is not None and result.best.memory.total_bytes <= KNOWN_DEVICES["H100"].memory_bytes
    assert any(c.layout.ep > 1 for c in result.search_space)


def test_fit_warning_names_the_largest_microbatch_that_fits(tiny_cfg):
    from nemo_pp.planning.fit import fit_warning, layout_of_plan

    path, overrides = tiny_cfg
    cfg = load_recipe_config(path, [*overrides, "distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=4"])
    run = plan_run(cfg, 2, check_checkpoint=False)
    memory = ModelMemory(run.meta_model, seq_len=1024)
    layout = layout_of_plan(run)

    def need(mb: int) -> int:
        return max(m.total_bytes for m in memory.rank_memory(dataclasses.replace(layout, microbatch_size=mb), 1024))

    assert fit_warning(run, cfg, 1024, 10 * need(4), 0, 2) is None
    warning = fit_warning(run, cfg, 1024, (need(2) + need(4)) // 2, 0, 2)
    assert "more than the" in warning and "pp_microbatch_size 2" in warning
    assert "no layout of 2 ranks fits" in fit_warning(run, cfg, 1024, need(1) // 100, 0, 2)


def test_fit_warning_skips_what_the_memory_model_does_not_weigh(tiny_cfg):
    """A vision-language model's towers need images: no estimate, and no error that would stop the run."""
    from types import SimpleNamespace

    from nemo_pp.planning.fit import fit_warning
    from tests.tiny_models import tiny_vlm

    vlm = tiny_vlm("llava")
    assert not ModelMemory.supports(vlm) and ModelMemory.supports(_meta(tiny_cfg).meta_model)
    assert fit_warning(SimpleNamespace(meta_model=vlm), None, 1024, 1, 0, 2) is None
