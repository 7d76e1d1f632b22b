"""LoRA under the pipeline: the adapters' losses, gradients and weights after AdamW steps
equal a single-process ``peft`` model trained on the same global batches; the base weights
(both copies of a tied embedding included) stay frozen; the adapter folder reloads with
``peft.PeftModel.from_pretrained`` and the merged export with transformers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_ranks
from tests.helpers import LR, MAX_NORM, full_tensor, reference_training, sum_ce, training_batches
from tests.tiny_models import tiny_model

PEFT_PREFIX = "base_model.model."


def reference_peft_model(arch: str, tied: bool, peft_cfg):
    """A tiny model, its untouched copy, and the single-process PEFT model of it with
    nonzero ``lora_B`` (peft starts B at zero, which would leave A without gradient)."""
    from peft import get_peft_model

    from nemo_pp._peft.lora import matched_linear_modules

    base = tiny_model(arch, tied, layers=4)
    pristine = copy.deepcopy(base)
    targets = matched_linear_modules(base, peft_cfg)
    ref = get_peft_model(base, peft_cfg.lora_config(targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pristine, ref


class CopyAdapters:
    """A parallelize_fn step between LoRA and FSDP2: the reference's adapter values."""

    def __init__(self, ref):
        self.values = {n[len(PEFT_PREFIX):]: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}

    def __call__(self, model, world_mesh=None, moe_mesh=None, **_):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(self.values[name])
        return model


@dataclass(frozen=True)
class Case:
    """A mesh, a tiny model, a schedule and the LoRA settings (``PeftConfig`` keyword arguments)."""

    world: int
    pp: int
    schedule: str
    arch: str
    tied: bool
    peft: dict
    tp: int = 1
    sequence_parallel: bool = False


def _run(rank, world, case: Case, out_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemo_pp._peft.lora import LoraParallelizer, PeftConfig, matched_linear_modules
    from nemo_pp.checkpoint.hf_export import save_consolidated_hf
    from nemo_pp.checkpoint.peft_export import save_peft_adapter
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.parallelize import ComposedParallelizer, FSDP2Parallelizer, TensorParallelizer
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    pp, tp, sp, tied = case.pp, case.tp, case.sequence_parallel, case.tied
    cfg = PeftConfig(**case.peft)
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp, tp_size=tp))
    dp, dp_rank = mesh.sizes.dp, mesh.dp_rank
    pristine, ref = reference_peft_model(case.arch, tied, cfg)
    model = copy.deepcopy(pristine)
    steps = training_batches(2, 2, dp, 4, (16, 24), pristine.config.vocab_size)
    # by hand, not parallelize_chain: CopyAdapters must run between LoRA and TP
    chain = ComposedParallelizer(LoraParallelizer(cfg), CopyAdapters(ref), TensorParallelizer(mesh, sp) if tp > 1 else None,
                                 FSDP2Parallelizer(mesh) if dp > 1 else None)
    expected = reference_training(ref, steps)

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule=case.schedule, pp_batch_size=4,
                      device=torch.device("cpu"), sequence_shards=tp if sp else 1).build(model, loss_fn=sum_ce, parallelize_fn=chain)
    trainable = {n for part in ap.parts for n, p in part.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
    if tp > 1:  # base weights and adapters really sharded: o_proj's lora_A row-wise, q_proj's lora_B column-wise
        placements = {n: getattr(p, "placements", None) for part in ap.parts for n, p in part.named_parameters()}
        assert any(n.endswith("o_proj.lora_A.default.weight") and pl and pl[-1].is_shard(1) for n, pl in placements.items())
        assert any(n.endswith("q_proj.lora_B.default.weight") and pl and pl[-1].is_shard(0) for n, pl in placements.items())
        assert any(n.endswith("q_proj.base_layer.weight") and pl and pl[-1].is_shard(0) for n, pl in placements.items())
    frozen_before = {n: full_tensor(p).detach().clone() for part in ap.parts for n, p in part.named_parameters()
                     if not p.requires_grad}
    opts = [torch.optim.AdamW([{"params": [p for p in part.parameters() if p.requires_grad]}], lr=LR, weight_decay=0.1)
            for part in ap.parts]
    engine = TrainEngine(ap, torch.device("cpu"), dp_group=mesh.dp.get_group() if dp > 1 else None, max_grad_norm=MAX_NORM)
    for step, per_dp in enumerate(steps):
        out = engine.train_step(per_dp[dp_rank], [], [])  # no optimizer: the grads stay to be compared
        want = expected[step]
        assert abs(out["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"])), (step, out["loss"], want["loss"])
        assert abs(out["grad_norm"] - want["norm"]) <= 1e-5 * max(1.0, want["norm"]), (out["grad_norm"], want["norm"])
        for part in ap.parts:
            for name, p in part.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(full_tensor(p.grad), want["grads"][PEFT_PREFIX + name], rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{name}: {m}")
                else:
                    assert p.grad is None, name  # frozen: no gradient computed, none communicated
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for part in ap.parts:
        for name, p in part.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(full_tensor(p).detach(), ref_params[PEFT_PREFIX + name].detach(), atol=2e-5,
                                           rtol=1e-4, msg=lambda m: f"{name}: {m}")
            else:
                assert torch.equal(full_tensor(p).detach(), frozen_before[name]), f"frozen {name} changed"

    adapter_dir, merged_dir = f"{out_dir}/adapter", f"{out_dir}/merged"
    save_peft_adapter(adapter_dir, ap.parts, cfg, is_writer=mesh.writes_stage_files)
    head_adapted = "lm_head" in matched_linear_modules(pristine, cfg)  # an adapted head no longer equals the embedding
    save_consolidated_hf(merged_dir, ap.parts, pristine.config, tied=tied and not head_adapted, pp_rank=mesh.pp_rank,
                         pp_size=pp, is_writer=mesh.writes_stage_files)
    if rank == 0:
        ids = steps[0][0][0]["input_ids"]
        with torch.no_grad():
            want = ref(input_ids=ids).logits
            reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), adapter_dir)
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
            torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
    dist.barrier()
    return True


CASES = {
    "pp2-1f1b-tied-proj": Case(world=2, pp=2, schedule="1f1b", arch="llama", tied=True,
                               peft={"target_modules": ["*_proj"], "dim": 4, "alpha": 8}),
    # the tied output projection adapted too: its frozen copies stay equal, the merged export unties
    "pp2-gpipe-all-linear": Case(world=2, pp=2, schedule="gpipe", arch="llama", tied=True,
                                 peft={"match_all_linear": True, "dim": 4, "alpha": 16}),
    # a V schedule: stages 0 and 3 on one rank; some stages adapt nothing but the attention
    "pp2-zbv-exclude": Case(world=2, pp=2, schedule="zbv", arch="qwen2", tied=False,
                            peft={"exclude_modules": ["lm_head", "*.mlp.*"], "dim": 2, "alpha": 4}),
    # FSDP2 over 2 dp ranks with frozen and trainable parameters in one layer
    "pp2-dp2-fsdp2": Case(world=4, pp=2, schedule="1f1b", arch="llama", tied=True,
                          peft={"target_modules": ["q_proj", "v_proj"], "dim": 4, "alpha": 8}),
    # tensor parallelism: adapters of column- and row-wise projections sharded to match their base layer
    "pp2-tp2": Case(world=4, pp=2, schedule="1f1b", arch="llama", tied=True,
                    peft={"target_modules": ["*_proj"], "dim": 4, "alpha": 8}, tp=2),
    # a mixture of experts: the attention adapted, the experts (3-D parameters, no nn.Linear) and
    # the routers frozen; the merged export in transformers' per-expert layout
    "pp2-mixtral-attention": Case(world=2, pp=2, schedule="1f1b", arch="mixtral", tied=False,
                                  peft={"target_modules": ["*_proj"], "dim": 4, "alpha": 8}),
    "tp2-sp": Case(world=2, pp=1, schedule="gpipe", arch="qwen2", tied=False,
                   peft={"target_modules": ["*_proj"], "dim": 4, "alpha": 8}, tp=2, sequence_parallel=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_single_process_peft(tmp_path, case):
    run_ranks(_run, CASES[case].world, CASES[case], str(tmp_path), timeout=300)
