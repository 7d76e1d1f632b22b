"""The run plan: every decision the recipe acts on, made once, before any work.

Every rank runs :func:`plan_run` on the same config and the same world size, so a bad
config fails identically everywhere, before a process group exists or a weight is read.
It builds the model's module tree on the meta device once, checks the config against it
(:mod:`nemo_pp.planning.checks`) without changing it, and returns a :class:`RunPlan`:
parallel sizes, batch arithmetic, precision, the pipeline plan, LoRA, the checkpoint to
resume, and that meta model. The recipe builds from the plan
(``AutoPipeline.from_plan``); nothing later derives any of it again. ``split: profile``
re-runs only the split (:func:`replan`) once piece times are measured.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from nemo_pp.assets import missing_asset_message, missing_local_path
from nemo_pp.config import instantiate
from nemo_pp.models.auto_model import loads_per_stage, resolve_dtype
from nemo_pp.models.loading import SafetensorsCheckpoint, empty_model
from nemo_pp.models.module_tree import text_config
from nemo_pp.models.moe import check_expert_parallel, check_gate_bias_update
from nemo_pp.models.stage_forward import validate_hf_model_for_pipeline_support
from nemo_pp.models.tp_plan import check_tensor_parallel
from nemo_pp.planning import checks
from nemo_pp.planning.cost import DEFAULT_PLANNING_SEQ_LEN, PieceCosts, flop_costs, with_fused_head
from nemo_pp.planning.dims import ParallelDims, resolve_parallel_sizes
from nemo_pp.planning.family_probe import check_model_family
from nemo_pp.planning.pipeline import PipelinePlan, StageSpec, make_pipeline_plan, moe_layers_of
from nemo_pp.planning.schedules import is_single_stage_schedule

logger = logging.getLogger(__name__)

__all__ = ["RunPlan", "plan_run", "planning_seq_len", "profile_pipeline_costs", "replan"]


@dataclass(frozen=True)
class RunPlan:
    """What the recipe derived from the config before doing any work.

    Attributes:
        sizes: the five mesh axis sizes and what follows from them (:class:`ParallelDims`).
        pipeline: stages, placement, module FQNs, microbatches and the stage spec of the
            pipeline (one stage of the whole model when ``pp_size`` is 1).
        model_path: ``model.pretrained_model_name_or_path``.
        meta_build: the model is built on the meta device and every rank loads only its
            own stages' tensors (``model._target_`` is NeMoAutoModelForCausalLM.from_pretrained).
        activation_checkpointing: decoder layers recompute their activations in backward.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` (compute dtype over fp32 master weights), or None.
        sequence_parallel: under tp > 1, activations between layers and stages are sequence shards.
        local_batch_size: samples per ``schedule.step`` on one data-parallel rank.
        grad_acc_steps: batches accumulated per optimizer step.
        num_epochs / max_steps: the step budget (``max_steps`` 0: evaluate only).
        resume_from: the checkpoint folder to resume from (checked), or None.
        peft: the ``peft:`` section (:class:`~nemo_pp._peft.lora.PeftConfig`): LoRA
            adapters on every stage, base weights frozen; None for full fine-tuning.
        lora_adapts_head: ``peft`` adapts the output projection (a tied one then no longer
            equals the embedding: the merged export unties it).
        lora_params: (adapter parameters, base model parameters with a tied embedding once)
            over the whole model; (0, 0) without ``peft``.
        cp_attention: under cp > 1 the attention over the cp group, ``"allgather"`` or
            ``"ring"`` (``distributed.cp_attention`` resolved); None without context parallelism.
        pad_seq_len_divisible: the collators pad every batch to a multiple of this
            (``dataloader.pad_seq_len_divisible``, raised under cp > 1 to a multiple of
            ``2 * cp``, times tp under sequence parallelism); None: no padding rule.
        pipeline_dtype: ``distributed.pipeline.dtype``: the model is cast to it before
            the split (the meta model already is); None: keep ``model.torch_dtype``.
        meta_model: the model the plan was made from, parameters on the meta device and
            untouched by the checks (no LoRA, no checkpointing applied); the builder
            materialises this rank's stages out of it. Not compared.
        weights: where the meta model's tensors are read from (a
            :class:`~nemo_pp.models.loading.SafetensorsCheckpoint`, names already checked),
            or None when another loader builds the model or ``check_checkpoint`` was False. Not compared.
        pipeline_kwargs: the arguments the pipeline plan was made with, for :func:`replan`.
        compile_kwargs: ``torch.compile``'s arguments for every decoder layer (the ``compile:``
            section, checked); None: eager.
        head_computes_loss: ``loss_fn`` takes hidden states (``FusedLinearCrossEntropy``,
            checked): the last stage computes it, and :func:`replan_for_fused_loss` applies.
    """

    sizes: ParallelDims
    pipeline: PipelinePlan
    model_path: str
    meta_build: bool
    activation_checkpointing: bool
    mp_policy: object | None
    local_batch_size: int
    grad_acc_steps: int
    num_epochs: int
    max_steps: int | None
    resume_from: Path | None = None
    sequence_parallel: bool = False
    peft: object | None = None
    lora_adapts_head: bool = False
    lora_params: tuple[int, int] = (0, 0)
    cp_attention: str | None = None
    pad_seq_len_divisible: int | None = None
    pipeline_dtype: torch.dtype | None = None
    meta_model: nn.Module | None = field(default=None, compare=False, repr=False)
    weights: SafetensorsCheckpoint | None = field(default=None, compare=False, repr=False)
    pipeline_kwargs: dict = field(default_factory=dict, compare=False, repr=False)
    compile_kwargs: dict | None = None
    head_computes_loss: bool = False

    def total_steps(self, batches_per_epoch: int | None) -> int:
        """Optimizer steps of the run: ``max_steps`` or what the epochs hold (None: a
        stream of no known length, ``max_steps``, which the plan requires for one).

        Raises:
            ValueError: training is asked for but the data set holds less than one step.
        """
        if batches_per_epoch is None:
            return self.max_steps
        per_epoch = batches_per_epoch // self.grad_acc_steps
        if per_epoch < 1 and self.max_steps != 0:
            raise ValueError(
                f"the data set holds {batches_per_epoch} batches per data-parallel rank, fewer than one optimizer "
                f"step needs ({self.grad_acc_steps}); lower step_scheduler.global_batch_size or use more data"
            )
        steps = per_epoch * self.num_epochs
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step over the whole data-parallel group (the global batch)."""
        return self.grad_acc_steps * self.local_batch_size * self.sizes.dp

    def _experts_per_rank(self) -> str:
        from nemo_pp.models.moe import expert_modules

        modules = expert_modules(self.meta_model) if self.meta_model is not None else []
        return f"{modules[0].num_experts // self.sizes.ep} of {modules[0].num_experts}" if modules else "1/ep of the"

    def describe(self) -> str:
        """The plan as the recipe prints it: layout, batch arithmetic, cp padding, stages."""
        s = self.sizes
        return (
            f"Parallel layout: pp {s.pp} x dp_replicate {s.dp_replicate} x dp_shard {s.dp_shard} x cp {s.cp} x tp {s.tp}"
            f" = {s.world_size} ranks; batch {self.local_batch_size} per dp rank, {self.grad_acc_steps} accumulated "
            f"per optimizer step (global batch {self.samples_per_step})\n"
            + (f"Context parallel: {s.cp} ranks per sequence (head + mirrored tail chunk each), {self.cp_attention} "
               f"attention; sequences padded to a multiple of {self.pad_seq_len_divisible}\n" if s.cp > 1 else "")
            + (f"Expert parallel: moe_mesh pp {s.pp} x ep_shard {s.ep_shard} x ep {s.ep}; each rank holds "
               f"{self._experts_per_rank()} experts per MoE layer, tokens routed to them by all-to-all"
               + (f"; FSDP2 shards them over the {s.ep_shard} ep_shard ranks that hold the same ones"
                  if s.ep_shard > 1 else "") + "\n"
               if s.ep > 1 else "")
            + self.pipeline.describe()
        )


def planning_seq_len(cfg) -> int | None:
    """Tokens per sample the plan weighs stages at: ``distributed.pipeline.pp_seq_len``,
    else the packed row length, else ``dataset.seq_length`` (None when none is set)."""
    return (cfg.distributed.pipeline.pp_seq_len or OmegaConf.select(cfg, "packed_sequence.packed_sequence_size")
            or OmegaConf.select(cfg, "dataset.seq_length"))


def profile_pipeline_costs(cfg, run_plan: RunPlan, device, is_main: bool) -> PieceCosts:
    """For ``split: profile``: time each piece once on the main rank's device (a one-layer
    random model of the config) and share the result, so every rank then plans the same
    split (:func:`replan`). The one step of planning that communicates: collective over
    the default group.

    Returns:
        :class:`~nemo_pp.planning.cost.PieceCosts` in seconds.
    """
    import torch.distributed as dist

    from nemo_pp.planning.cost import profile_costs

    costs = [None]
    if is_main:
        seq_len = planning_seq_len(cfg) or DEFAULT_PLANNING_SEQ_LEN
        costs[0] = profile_costs(run_plan.meta_model.config, run_plan.pipeline.microbatch_size, seq_len, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(costs, src=0)
    return costs[0]


def replan(plan: RunPlan, piece_costs: PieceCosts) -> RunPlan:
    """``plan`` with its layer boundaries balanced by ``piece_costs`` (``split: profile``);
    everything else, the meta model included, is kept."""
    pipeline = make_pipeline_plan(plan.meta_model, **plan.pipeline_kwargs, piece_costs=piece_costs)
    return dataclasses.replace(plan, pipeline=pipeline)


def replan_for_fused_loss(plan: RunPlan, label_share: float, profiled: PieceCosts | None = None) -> RunPlan | None:
    """``plan`` re-balanced for a loss that computes only label tokens (``FusedLinearCrossEntropy``,
    :func:`~nemo_pp.planning.cost.with_fused_head`) where the split is automatic (pp > 1, no
    explicit layers): ``split: balanced`` from the FLOP model at the plan's sequence length,
    ``split: profile`` from the ``profiled`` piece times (the head timed with a plain loss,
    scaled alike); None where nothing changes.

    Args:
        label_share: label tokens over all tokens of the training data.
        profiled: the times ``split: profile`` measured (:func:`profile_pipeline_costs`).
    """
    kw = plan.pipeline_kwargs
    if plan.sizes.pp == 1 or kw.get("layers_per_stage") is not None or kw.get("module_fqns_per_model_part") is not None:
        return None
    if kw.get("split") == "profile" and profiled is not None:
        costs = profiled
    elif kw.get("split") == "balanced":
        model = plan.meta_model
        costs = flop_costs(model.config, plan.pipeline.microbatch_size, kw.get("seq_len") or DEFAULT_PLANNING_SEQ_LEN,
                           moe_layers=moe_layers_of(model))
    else:
        return None
    return replan(plan, with_fused_head(costs, label_share))


def _check_paths(cfg, model_path) -> None:
    if model_path is None:
        raise ValueError("model.pretrained_model_name_or_path is required")
    if missing_local_path(model_path):
        raise FileNotFoundError(f"model.pretrained_model_name_or_path: {missing_asset_message(model_path)}")
    for section in ("dataset", "validation_dataset"):
        node = cfg.get(section)
        for key in ("path_or_dataset", "path_or_dataset_id"):  # SQuAD's key, the other data sets'
            path = node.get(key) if node is not None else None
            if isinstance(path, str) and missing_local_path(path):
                raise FileNotFoundError(f"{section}.{key}: {missing_asset_message(path, 'data set')}")


def _global_batch(cfg, sizes: ParallelDims) -> tuple[int, int]:
    """``(dataloader.batch_size, optimizer steps' batches)`` after the batch arithmetic checks."""
    local_bs = cfg.dataloader.batch_size
    ss = cfg.step_scheduler
    if ss.get("local_batch_size") is not None and ss.local_batch_size != local_bs:
        raise ValueError(
            f"step_scheduler.local_batch_size={ss.local_batch_size} differs from dataloader.batch_size={local_bs}; "
            "set one of them (the other follows)"
        )
    per_step = local_bs * sizes.dp
    gbs = ss.global_batch_size if ss.get("global_batch_size") is not None else per_step
    if gbs % per_step:
        raise ValueError(
            f"step_scheduler.global_batch_size={gbs} is not a multiple of dataloader.batch_size*dp = {local_bs}*{sizes.dp} "
            f"= {per_step}; pick a multiple of {per_step}"
        )
    return local_bs, gbs // per_step


def _precision(cfg, sizes: ParallelDims):
    """``(mp_policy or None, the activation dtype stages exchange or None)``."""
    d, p = cfg.distributed, cfg.distributed.pipeline
    pipeline_dtype = resolve_dtype(p.dtype, "distributed.pipeline.dtype")
    if d.mp_policy is None:
        return None, pipeline_dtype
    if not sizes.fsdp_enabled:
        raise ValueError(
            "distributed.mp_policy is FSDP2's mixed precision and needs data or context parallelism (dp*cp > 1: "
            "launch more processes than pp*tp); without it train in one dtype with model.torch_dtype: bfloat16"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = d.mp_policy
    policy = MixedPrecisionPolicy(
        param_dtype=resolve_dtype(mp.param_dtype, "distributed.mp_policy.param_dtype"),
        reduce_dtype=resolve_dtype(mp.reduce_dtype, "distributed.mp_policy.reduce_dtype"),
        output_dtype=resolve_dtype(mp.output_dtype, "distributed.mp_policy.output_dtype"),
    )
    # FSDP2 casts whatever the parameters are to its compute dtype: that is what stages send
    return policy, policy.output_dtype or policy.param_dtype


def _check_sequence_parallel(cfg, sizes: ParallelDims) -> None:
    if not sizes.sequence_parallel:
        return
    pad = cfg.dataloader.pad_seq_len_divisible
    if sizes.tp == 1:
        raise ValueError("distributed.sequence_parallel: true shards sequences over tp ranks; set distributed.tp_size > 1 "
                         "or sequence_parallel: false")
    if sizes.cp == 1 and (pad is None or pad % sizes.tp):  # under cp the padding multiple is derived
        raise ValueError(
            f"distributed.sequence_parallel: every batch's sequence length must divide by tp_size={sizes.tp}; set "
            f"dataloader.pad_seq_len_divisible to a multiple of {sizes.tp} (it is {pad})"
        )


def _microbatch_size(cfg, sizes: ParallelDims, local_bs: int) -> int:
    """Samples per microbatch. Without a pipeline, microbatches only cost (small matmuls;
    measured: 4 x [1, 256] take 1.6x as long as one [4, 256] on 2 threads): one stage of a
    single-stage schedule runs the whole batch at once; gradient accumulation is the memory
    knob there."""
    p = cfg.distributed.pipeline
    single = sizes.pp == 1 and not p.pp_schedule_csv and p.pp_schedule and is_single_stage_schedule(p.pp_schedule)
    if not single or local_bs == p.pp_microbatch_size:
        return p.pp_microbatch_size
    logger.warning("pp_size 1: the whole batch of %d runs as one microbatch (distributed.pipeline."
                   "pp_microbatch_size=%d applies to pipelines; lower dataloader.batch_size and raise "
                   "step_scheduler.global_batch_size to save activation memory)", local_bs, p.pp_microbatch_size)
    return local_bs


def _pipeline_kwargs(cfg, sizes: ParallelDims, microbatch_size: int, local_bs: int, activation_dtype) -> dict:
    """``make_pipeline_plan``'s arguments from ``distributed.pipeline`` (kept in the plan for :func:`replan`)."""
    p = cfg.distributed.pipeline
    return dict(
        pp_size=sizes.pp, pp_schedule=p.pp_schedule, pp_schedule_csv=p.pp_schedule_csv,
        pp_microbatch_size=microbatch_size, pp_batch_size=local_bs, layers_per_stage=p.layers_per_stage,
        round_virtual_stages_to_pp_multiple=p.round_virtual_stages_to_pp_multiple,
        module_fqns_per_model_part=p.module_fqns_per_model_part, split=p.split, seq_len=planning_seq_len(cfg),
        max_stage_params=p.max_stage_params, scale_grads=p.scale_grads_in_schedule,
        defer_fsdp_grad_sync=p.defer_fsdp_grad_sync, pool_recv_buffers=p.pool_recv_buffers,
        stage=StageSpec(patch_inner_model=p.patch_inner_model, patch_causal_lm_model=p.patch_causal_lm_model,
                        sequence_shards=sizes.sequence_shards, activation_dtype=activation_dtype, seq_len=p.pp_seq_len),
    )


def build_meta_model(cfg, model_path: str) -> tuple[nn.Module, bool]:
    """The model's module tree with parameters on the meta device, and whether the recipe
    builds exactly this model (``NeMoAutoModelForCausalLM.from_pretrained``: each rank then
    loads only its stages' tensors) rather than another loader's (planned from its config)."""
    from transformers import AutoConfig

    meta_build = loads_per_stage(cfg.model)
    if meta_build:
        return instantiate(cfg.model, load_weights=False), True
    return empty_model(AutoConfig.from_pretrained(str(model_path))), False


def plan_run(cfg, world_size: int, check_checkpoint: bool = True, piece_costs: PieceCosts | None = None,
             meta_model: nn.Module | None = None) -> RunPlan:
    """Validate ``cfg`` against ``world_size`` and plan the run; raise with the config key and the fix.

    Pure: it communicates nothing and does not change the meta model it plans from.

    Args:
        cfg: the typed recipe config (``load_recipe_config``).
        world_size: processes of the run.
        check_checkpoint: check the model's safetensors names against the model and the
            training checkpoint to resume (False: plan from a config folder that holds no
            weights, resuming nothing).
        piece_costs: measured piece costs for ``split: profile`` (see
            :func:`profile_pipeline_costs` and :func:`replan`); without them that split
            uses the FLOP model.
        meta_model: the meta-device model of this config's ``model:`` section, built
            before (:func:`build_meta_model`): a layout search plans many layouts of one model.

    Raises:
        ValueError: parallel sizes vs world size, batch arithmetic, schedule constraints,
            more stages than layers, a sequence length beyond the model's positions,
            refused pipeline options, a tp_size the model's heads / sizes cannot split, a
            model family outside the proven matrix whose parity probe fails.
        FileNotFoundError: missing local model or data set (names the asset command).
        CorruptCheckpointError (a ValueError): the checkpoint to resume is incomplete,
            truncated, changed on disk (checksum), unsafe, of another model, or at a data
            position this dp size cannot split.
        OSError (ENOSPC): checkpoint_dir's disk cannot hold a checkpoint and the export.
    """
    d, p = cfg.distributed, cfg.distributed.pipeline
    sizes = resolve_parallel_sizes(world_size, d.pp_size, d.dp_size, d.dp_replicate_size, d.tp_size, d.cp_size,
                                   sequence_parallel=d.sequence_parallel, ep_size=d.ep_size)
    checks.check_packing(cfg, sizes)
    checks.check_streaming(cfg)
    cp_attention, pad_divisible = checks.check_context_parallel(cfg, sizes)
    _check_sequence_parallel(cfg, sizes)
    checks.check_logger_packages(cfg)
    checks.check_evaluation(cfg)
    compile_kwargs = checks.check_compile(cfg)
    model_path = cfg.model.get("pretrained_model_name_or_path")
    _check_paths(cfg, model_path)
    local_bs, grad_acc_steps = _global_batch(cfg, sizes)
    if p.scale_grads_in_schedule:
        raise ValueError(
            "distributed.pipeline.scale_grads_in_schedule: true is refused by this recipe: it normalises gradients "
            "by the label tokens of the whole step, and torch's in-schedule scaling divides ALL gradients by the "
            "microbatch count after every batch (earlier accumulated batches again); set it to false"
        )
    checks.check_grad_sync_options(p.patch_stage_backward_maybe_with_nosync)
    mp_policy, activation_dtype = _precision(cfg, sizes)

    if meta_model is None:
        model, meta_build = build_meta_model(cfg, model_path)
    else:
        model, meta_build = meta_model, loads_per_stage(cfg.model)
    if (pipeline_dtype := resolve_dtype(p.dtype, "distributed.pipeline.dtype")) is not None:
        model = model.to(pipeline_dtype)  # meta tensors: what the builder casts to, before splitting
    text_cfg = text_config(model.config)
    checks.check_sequence_lengths(cfg, text_cfg)
    # a folder of config only (check_checkpoint False: planning a model that is not here) has no weights
    weights = SafetensorsCheckpoint.for_model(str(model_path), model) if meta_build and check_checkpoint else None
    if weights is not None:
        weights.check_covers(model)  # names only, no weight read
    microbatch_size = _microbatch_size(cfg, sizes, local_bs)
    pipeline_kwargs = _pipeline_kwargs(cfg, sizes, microbatch_size, local_bs, activation_dtype)
    pipeline = make_pipeline_plan(model, **pipeline_kwargs, piece_costs=piece_costs)
    validate_hf_model_for_pipeline_support(model, p.patch_inner_model, p.patch_causal_lm_model, pipeline.num_stages)
    if p.patch_inner_model or p.patch_causal_lm_model:  # the patched forwards: exact, or refused
        check_model_family(model)
    checks.check_vision_language(cfg, model, sizes)
    check_tensor_parallel(model, sizes.tp, sizes.ep)
    checks.check_router_loss(model, sizes)
    check_expert_parallel(model, sizes.ep)
    check_gate_bias_update(model)
    if cp_attention == "ring":
        checks.check_ring_attention(text_cfg)
    if d.activation_checkpointing:
        checks.check_activation_checkpointing(model)
    peft, lora_adapts_head, lora_params, adapted = checks.check_peft(cfg, model, sizes)
    head_computes_loss = checks.check_loss_fn(cfg, model, sizes, lora_adapts_head, peft)
    # a LoRA checkpoint holds the adapted model's trainable tensors: check against the adapted copy
    resume_from = checks.checkpoint_to_resume(cfg, adapted, sizes.dp) if check_checkpoint else None
    if check_checkpoint:
        checks.check_free_space(cfg, adapted, sizes.pp)
    return RunPlan(
        sizes=sizes, pipeline=pipeline, model_path=str(model_path), meta_build=meta_build,
        activation_checkpointing=d.activation_checkpointing, mp_policy=mp_policy, local_batch_size=local_bs,
        grad_acc_steps=grad_acc_steps, num_epochs=cfg.step_scheduler.num_epochs,
        max_steps=cfg.step_scheduler.get("max_steps"), resume_from=resume_from, sequence_parallel=d.sequence_parallel,
        peft=peft, lora_adapts_head=lora_adapts_head, lora_params=lora_params, cp_attention=cp_attention,
        pad_seq_len_divisible=pad_divisible, pipeline_dtype=pipeline_dtype, meta_model=model, weights=weights, pipeline_kwargs=pipeline_kwargs,
        compile_kwargs=compile_kwargs, head_computes_loss=head_computes_loss,
    )
