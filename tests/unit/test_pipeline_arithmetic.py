"""Stage ids, FQN tables, virtual stages, schedule names and constraints: pure arithmetic."""

import pytest

from nemo_pp.distributed.pipelining.functional import (
    calculate_virtual_stages,
    canonical_schedule_name,
    check_schedule_constraints,
    generate_hf_model_fqn_per_model_part,
    schedule_style,
    stage_ids_this_rank,
)
from nemo_pp.planning.dims import resolve_parallel_sizes
from nemo_pp.planning.split import MULTIMODAL_ENCODER_NAMES


def test_stage_ids_loop_and_v_match_the_guide():
    assert stage_ids_this_rank(0, 4, 8, "loop") == (0, 4)
    assert stage_ids_this_rank(0, 4, 8, "v") == (0, 7)
    assert stage_ids_this_rank(3, 4, 8, "v") == (3, 4)
    assert stage_ids_this_rank(1, 2, 2, "loop") == (1,)
    with pytest.raises(ValueError, match="exactly 2"):
        stage_ids_this_rank(0, 2, 6, "v")
    with pytest.raises(ValueError, match="divisible"):
        stage_ids_this_rank(0, 4, 6)


def _layers(names):
    return [n for n in names if ".layers." in n]


def test_fqn_table_32_layers_over_2_and_4_stages():
    two = generate_hf_model_fqn_per_model_part(2, 32)
    assert two[0] == ["model.embed_tokens"] + [f"model.{m}" for m in MULTIMODAL_ENCODER_NAMES] + [
        f"model.layers.{i}" for i in range(16)] + ["model.rotary_emb"]
    assert two[1] == [f"model.layers.{i}" for i in range(16, 32)] + ["model.norm", "lm_head", "model.rotary_emb"]
    four = generate_hf_model_fqn_per_model_part(4, 32, include_multimodal_encoders=False)
    assert [len(_layers(s)) for s in four] == [8, 8, 8, 8]
    assert four[0][0] == "model.embed_tokens" and four[3][-3:] == ["model.norm", "lm_head", "model.rotary_emb"]
    assert four[1] == [f"model.layers.{i}" for i in range(8, 16)] + ["model.rotary_emb"]


def test_fqn_remainder_goes_to_earliest_stages_and_prefix_options():
    parts = generate_hf_model_fqn_per_model_part(4, 30, include_multimodal_encoders=False, include_rotary_emb=False, fqn_prefix="")
    assert [len([n for n in s if n.startswith("layers.")]) for s in parts] == [8, 8, 7, 7]
    assert parts[0][0] == "embed_tokens" and parts[-1][-2:] == ["norm", "lm_head"]
    with pytest.raises(ValueError):
        generate_hf_model_fqn_per_model_part(5, 4)


def test_virtual_stages_examples_and_errors():
    assert calculate_virtual_stages(32, 4, 4, False, "up") == (8, 2)
    assert calculate_virtual_stages(32, None, 4, True) == (4, 1)
    assert calculate_virtual_stages(32, None, 4, False) == (8, 2)
    assert calculate_virtual_stages(30, 4, 4, False, "up") == (8, 2)  # ceil(30/4)=8
    assert calculate_virtual_stages(30, 3, 4, False, "down") == (8, 2)  # 10 -> 8
    assert calculate_virtual_stages(30, 3, 4, False, "up") == (12, 3)
    with pytest.raises(ValueError, match="round_virtual_stages_to_pp_multiple"):
        calculate_virtual_stages(30, 3, 4, False, None)
    with pytest.raises(ValueError, match="one stage per rank"):
        calculate_virtual_stages(32, 4, 4, True)
    with pytest.raises(ValueError, match="at least 2"):
        calculate_virtual_stages(32, 8, 4, False)
    with pytest.raises(ValueError, match="only 4 layers"):
        calculate_virtual_stages(4, None, 8, True)


def test_schedule_names_aliases_and_unknown():
    assert canonical_schedule_name("1f1b") == "1F1B"
    assert canonical_schedule_name("interleaved_1f1b") == "Interleaved1F1B"
    assert canonical_schedule_name("looped_bfs") == "LoopedBFS"
    assert canonical_schedule_name("zbv") == "ZBVZeroBubble"
    assert canonical_schedule_name("zero_bubble") == "InterleavedZeroBubble"
    assert canonical_schedule_name("dualpipev") == "DualPipeV"
    assert schedule_style("zbv") == "v" and schedule_style("1f1b") == "loop"
    with pytest.raises(ValueError, match="GPipe, 1F1B, Interleaved1F1B"):
        canonical_schedule_name("2f2b")


def test_schedule_constraints_name_the_key():
    assert check_schedule_constraints("1f1b", 2, 2, 4, 1).n_microbatches == 4
    with pytest.raises(ValueError, match="pp_microbatch_size"):
        check_schedule_constraints("1f1b", 2, 2, 5, 2)
    with pytest.raises(ValueError, match="at least as many microbatches as stages"):
        check_schedule_constraints("1f1b", 4, 4, 2, 1)
    with pytest.raises(ValueError, match="at least 2 stages per rank"):
        check_schedule_constraints("interleaved_1f1b", 2, 2, 4, 1)
    with pytest.raises(ValueError, match="exactly one stage per rank"):
        check_schedule_constraints("gpipe", 2, 4, 4, 1)


def test_mesh_sizes_arithmetic():
    s = resolve_parallel_sizes(8, pp_size=2, tp_size=2)
    assert (s.pp, s.dp_replicate, s.dp_shard, s.cp, s.tp, s.dp) == (2, 1, 2, 1, 2, 2)
    s = resolve_parallel_sizes(8, pp_size=2, dp_replicate_size=2)
    assert (s.dp_replicate, s.dp_shard) == (2, 2)
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by pp_size\*cp_size\*tp_size = 2\*1\*1 = 2"):
        resolve_parallel_sizes(3, pp_size=2)
    with pytest.raises(ValueError, match=r"= 2\*2\*1\*1 = 4 but the world size is 2"):
        resolve_parallel_sizes(2, pp_size=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_replicate_size"):
        resolve_parallel_sizes(6, pp_size=2, dp_replicate_size=2)


def test_grad_sync_switches_torch_already_covers_are_refused_with_the_reason():
    from nemo_pp.distributed.pipelining.functional import check_grad_sync_options

    check_grad_sync_options()  # the defaults are what torch does
    with pytest.raises(ValueError, match="REDUCE_GRAD"):
        check_grad_sync_options(patch_stage_backward_maybe_with_nosync=True)
    with pytest.raises(ValueError, match="reduce_grad_per_microbatch"):
        check_grad_sync_options(reduce_grad_per_microbatch=True)


def test_plan_of_a_csv_schedule_reads_placement_from_the_file(tmp_path):
    from nemo_pp.planning.pipeline import make_pipeline_plan

    plan = make_pipeline_plan(None, 2, None, "configs/schedules/1f1b_pp2_mb4_swapped.csv", 1, 4)
    assert (plan.placement, plan.stage_ids, plan.owner(0), plan.n_microbatches) == ("csv", ((1,), (0,)), 1, 4)
    with pytest.raises(ValueError, match="schedules microbatches \\[0, 1, 2, 3\\] but the batch splits into 2"):
        make_pipeline_plan(None, 2, None, "configs/schedules/1f1b_pp2_mb4_swapped.csv", 1, 2)
    gap = tmp_path / "gap.csv"
    gap.write_text("0F0,0B0\n2F0,2B0\n")
    with pytest.raises(ValueError, match="must run every stage 0..2 on exactly one pp rank"):
        make_pipeline_plan(None, 2, None, str(gap), 1, 1)


def test_csv_plan_knows_split_backward_from_its_actions(tmp_path):
    from nemo_pp.planning.pipeline import make_pipeline_plan

    zb = tmp_path / "zb.csv"
    zb.write_text("0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1W0,1F1,1I1,1W1\n")
    plan = make_pipeline_plan(None, 2, "1f1b", str(zb), 1, 2)  # 1f1b: the recipe default, not a runtime
    assert plan.split_backward and plan.schedule is None
    assert not make_pipeline_plan(None, 2, "1f1b", "configs/schedules/1f1b_pp2_mb4.csv", 1, 4).split_backward
