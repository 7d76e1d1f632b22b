"""Checks of a whole recipe config that need no weights and no communication, and the
run plan they produce.

Every rank runs :func:`preflight_check` on the same config and the same world size, so
a bad config fails identically everywhere, before a process group exists or a weight
is read. Its :class:`RunPlan` (parallel sizes, batch arithmetic, and the
:class:`~nemo_pp.distributed.pipelining.plan.PipelinePlan` made from a meta-device
model) is what the recipe builds from; nothing later derives any of it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_pp.distributed.mesh import ParallelSizes, resolve_parallel_sizes
from nemo_pp.distributed.pipelining.plan import PipelinePlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What the recipe derived from the config before doing any work.

    Attributes:
        sizes: the five mesh axis sizes.
        pipeline: stages, placement, module FQNs and microbatches of the pipeline
            (one stage of the whole model when ``pp_size`` is 1).
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
    """

    sizes: ParallelSizes
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

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps`` or what the epochs hold.

        Raises:
            ValueError: training is asked for but the data set holds less than one step.
        """
        per_epoch = batches_per_epoch // self.grad_acc_steps
        if per_epoch < 1 and self.max_steps != 0:
            raise ValueError(
                f"the data set holds {batches_per_epoch} batches per data-parallel rank, fewer than one optimizer "
                f"step needs ({self.grad_acc_steps}); lower step_scheduler.global_batch_size or use more data"
            )
        steps = per_epoch * self.num_epochs
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def parallelize_fn(self, mesh):
        """Per stage: LoRA adapters when ``peft`` is set, tensor parallelism when tp > 1,
        the context-parallel attention when cp > 1, activation checkpointing when asked,
        then FSDP2 over the data-parallel and cp ranks when there are several; None when
        nothing applies."""
        from nemo_pp._peft.lora import LoraParallelizer
        from nemo_pp.distributed.context_parallel import ContextParallelizer
        from nemo_pp.distributed.parallelize import (
            ActivationCheckpointing,
            ComposedParallelizer,
            FSDP2Parallelizer,
            TensorParallelizer,
        )

        if self.sizes.dp * self.sizes.cp > 1:
            rest = FSDP2Parallelizer(mesh, not self.pipeline.split_backward, self.activation_checkpointing, self.mp_policy)
        else:
            rest = ActivationCheckpointing() if self.activation_checkpointing else None
        tp = TensorParallelizer(mesh, self.sequence_parallel) if self.sizes.tp > 1 else None
        cp = ContextParallelizer(mesh, self.cp_attention) if self.sizes.cp > 1 else None
        lora = LoraParallelizer(self.peft) if self.peft is not None else None
        steps = [s for s in (lora, tp, cp, rest) if s is not None]
        return None if not steps else steps[0] if len(steps) == 1 else ComposedParallelizer(*steps)

    def describe(self) -> str:
        s = self.sizes
        return (
            f"Parallel layout: pp {s.pp} x dp_replicate {s.dp_replicate} x dp_shard {s.dp_shard} x cp {s.cp} x tp {s.tp}"
            f" = {s.world_size} ranks; batch {self.local_batch_size} per dp rank, {self.grad_acc_steps} accumulated "
            f"per optimizer step (global batch {self.local_batch_size * s.dp * self.grad_acc_steps})\n"
            + (f"Context parallel: {s.cp} ranks per sequence (head + mirrored tail chunk each), {self.cp_attention} "
               f"attention; sequences padded to a multiple of {self.pad_seq_len_divisible}\n" if s.cp > 1 else "")
            + self.pipeline.describe()
        )


def _on_cpu(device) -> bool:
    return device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())


def _check_sequence_lengths(cfg, text_cfg) -> None:
    limit = getattr(text_cfg, "max_position_embeddings", None)
    if limit is None:
        return
    for key in ("dataset.seq_length", "validation_dataset.seq_length", "distributed.pipeline.pp_seq_len"):
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) > int(limit):
            raise ValueError(
                f"{key}={value} exceeds the model's max_position_embeddings={limit}; "
                f"set {key} to at most {limit}"
            )


def planning_seq_len(cfg) -> int | None:
    """Tokens per sample the plan weighs stages at: ``distributed.pipeline.pp_seq_len``,
    else the packed row length, else ``dataset.seq_length`` (None when none is set)."""
    return (cfg.distributed.pipeline.pp_seq_len or OmegaConf.select(cfg, "packed_sequence.packed_sequence_size")
            or OmegaConf.select(cfg, "dataset.seq_length"))


def profile_pipeline_costs(cfg, run_plan: RunPlan, device, is_main: bool):
    """For ``split: profile``: time each piece once on the main rank's device (a one-layer
    random model of the config) and share the result, so every rank then plans the same
    split (``preflight_check(..., piece_costs=...)``). Collective over the default group.

    Returns:
        :class:`~nemo_pp.distributed.pipelining.cost.PieceCosts` in seconds.
    """
    import torch.distributed as dist
    from transformers import AutoConfig

    from nemo_pp.distributed.pipelining.cost import profile_costs

    costs = [None]
    if is_main:
        config = AutoConfig.from_pretrained(run_plan.model_path)
        costs[0] = profile_costs(config, run_plan.pipeline.microbatch_size, planning_seq_len(cfg) or 1024, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(costs, src=0)
    return costs[0]


def preflight_check(cfg, world_size: int, check_checkpoint: bool = True, piece_costs=None) -> RunPlan:
    """Validate ``cfg`` against ``world_size`` and plan the run; raise with the config key and the fix.

    Args:
        cfg: the typed recipe config (``load_recipe_config``).
        world_size: processes of the run.
        check_checkpoint: check the model's safetensors names against the model and the
            training checkpoint to resume (False: plan from a config folder that holds no
            weights, resuming nothing).
        piece_costs: measured piece costs for ``split: profile`` (see
            :func:`profile_pipeline_costs`); without them that split uses the FLOP model.

    Raises:
        ValueError: parallel sizes vs world size, batch arithmetic, schedule constraints,
            more stages than layers, a sequence length beyond the model's positions,
            refused pipeline options, a tp_size the model's heads / sizes cannot split.
        FileNotFoundError: missing local model or data set (names the asset command).
        CorruptCheckpointError (a ValueError): the checkpoint to resume is incomplete,
            truncated, unsafe, of another model, or at a data position this dp size cannot split.
    """
    from transformers import AutoConfig

    from nemo_pp.assets import missing_asset_message, missing_local_path
    from nemo_pp.config import instantiate
    from nemo_pp.distributed.parallelize import checkpoint_decoder_layers
    from nemo_pp.distributed.tensor_parallel import check_tensor_parallel
    from nemo_pp.distributed.pipelining.functional import check_grad_sync_options
    from nemo_pp.distributed.pipelining.hf_utils import validate_hf_model_for_pipeline_support
    from nemo_pp.distributed.pipelining.plan import make_pipeline_plan
    from nemo_pp.distributed.pipelining.schedules import is_single_stage_schedule
    from nemo_pp.models.auto_model import loads_per_stage, resolve_dtype
    from nemo_pp.models.loading import SafetensorsCheckpoint, empty_model
    from nemo_pp.training.loggers import check_logger_packages

    d = cfg.distributed
    sizes = resolve_parallel_sizes(world_size, d.pp_size, d.dp_size, d.dp_replicate_size, d.tp_size, d.cp_size)
    _check_packing(cfg, sizes)
    cp_attention, pad_divisible = _check_context_parallel(cfg, sizes)
    if d.sequence_parallel:
        pad = cfg.dataloader.pad_seq_len_divisible
        if sizes.tp == 1:
            raise ValueError("distributed.sequence_parallel: true shards sequences over tp ranks; set distributed.tp_size > 1 "
                             "or sequence_parallel: false")
        if sizes.cp == 1 and (pad is None or pad % sizes.tp):  # under cp the padding multiple is derived
            raise ValueError(
                f"distributed.sequence_parallel: every batch's sequence length must divide by tp_size={sizes.tp}; set "
                f"dataloader.pad_seq_len_divisible to a multiple of {sizes.tp} (it is {pad})"
            )

    check_logger_packages(cfg)
    model_path = cfg.model.get("pretrained_model_name_or_path")
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

    p = d.pipeline
    if p.scale_grads_in_schedule:
        raise ValueError(
            "distributed.pipeline.scale_grads_in_schedule: true is refused by this recipe: it normalises gradients "
            "by the label tokens of the whole step, and torch's in-schedule scaling divides ALL gradients by the "
            "microbatch count after every batch (earlier accumulated batches again); set it to false"
        )
    check_grad_sync_options(p.patch_stage_backward_maybe_with_nosync)
    resolve_dtype(p.dtype, "distributed.pipeline.dtype")
    mp_policy = None
    if d.mp_policy is not None:
        if sizes.dp * sizes.cp == 1:
            raise ValueError(
                "distributed.mp_policy is FSDP2's mixed precision and needs data or context parallelism (dp*cp > 1: "
                "launch more processes than pp*tp); without it train in one dtype with model.torch_dtype: bfloat16"
            )
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = d.mp_policy
        mp_policy = MixedPrecisionPolicy(
            param_dtype=resolve_dtype(mp.param_dtype, "distributed.mp_policy.param_dtype"),
            reduce_dtype=resolve_dtype(mp.reduce_dtype, "distributed.mp_policy.reduce_dtype"),
            output_dtype=resolve_dtype(mp.output_dtype, "distributed.mp_policy.output_dtype"),
        )

    meta_build = loads_per_stage(cfg.model)
    if meta_build:  # the very model the recipe builds, parameters on the meta device
        model = instantiate(cfg.model, load_weights=False)
    else:  # another loader: its config's module tree (AutoPipeline.build checks the plan against the real model)
        model = empty_model(AutoConfig.from_pretrained(str(model_path)))
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _check_sequence_lengths(cfg, text_cfg)
    if meta_build and check_checkpoint:
        SafetensorsCheckpoint.for_model(str(model_path), model).check_covers(model)  # names only, no weight read
    # Without a pipeline, microbatches only cost (small matmuls; measured: 4 x [1, 256] take
    # 1.6x as long as one [4, 256] on 2 threads): one stage of a single-stage schedule runs
    # the whole batch at once; gradient accumulation is the memory knob there.
    single = sizes.pp == 1 and not p.pp_schedule_csv and p.pp_schedule and is_single_stage_schedule(p.pp_schedule)
    microbatch_size = local_bs if single else p.pp_microbatch_size
    if microbatch_size != p.pp_microbatch_size:
        logger.warning("pp_size 1: the whole batch of %d runs as one microbatch (distributed.pipeline."
                       "pp_microbatch_size=%d applies to pipelines; lower dataloader.batch_size and raise "
                       "step_scheduler.global_batch_size to save activation memory)", local_bs, p.pp_microbatch_size)
    pipeline = make_pipeline_plan(
        model, pp_size=sizes.pp, pp_schedule=p.pp_schedule, pp_schedule_csv=p.pp_schedule_csv,
        pp_microbatch_size=microbatch_size, pp_batch_size=local_bs, layers_per_stage=p.layers_per_stage,
        round_virtual_stages_to_pp_multiple=p.round_virtual_stages_to_pp_multiple,
        module_fqns_per_model_part=p.module_fqns_per_model_part, split=p.split, seq_len=planning_seq_len(cfg),
        piece_costs=piece_costs, max_stage_params=p.max_stage_params,
    )
    validate_hf_model_for_pipeline_support(model, p.patch_inner_model, p.patch_causal_lm_model, pipeline.num_stages)
    check_tensor_parallel(model, sizes.tp)
    if cp_attention == "ring":
        _check_ring_attention(text_cfg)
    if d.activation_checkpointing:
        checkpoint_decoder_layers(model)  # a throwaway meta model: raises, naming the key, without layers
    # adapts the meta model: the checkpoint check expects its adapters
    peft, lora_adapts_head, lora_params = _check_peft(cfg, model, sizes)
    resume_from = _checkpoint_to_resume(cfg, model, sizes.dp) if check_checkpoint else None
    return RunPlan(
        sizes=sizes, pipeline=pipeline, model_path=str(model_path), meta_build=meta_build,
        activation_checkpointing=d.activation_checkpointing, mp_policy=mp_policy, local_batch_size=local_bs,
        grad_acc_steps=gbs // per_step, num_epochs=ss.num_epochs, max_steps=ss.get("max_steps"),
        resume_from=resume_from, sequence_parallel=d.sequence_parallel, peft=peft, lora_adapts_head=lora_adapts_head,
        lora_params=lora_params, cp_attention=cp_attention, pad_seq_len_divisible=pad_divisible,
    )


def _check_context_parallel(cfg, sizes) -> tuple[str | None, int | None]:
    """The resolved ``cp_attention`` (None at cp 1) and the collators' padding multiple.

    Under cp > 1 every sequence is cut into ``2 * cp`` chunks (and each rank's slice into tp
    shards under sequence parallelism), so batches are padded to a multiple of that: the
    least common multiple with ``dataloader.pad_seq_len_divisible``.

    Raises:
        ValueError: ``cp_attention: ring`` without CUDA; packed sequences with cp > 1.
    """
    import math

    from nemo_pp.distributed.context_parallel import resolve_cp_attention

    pad = cfg.dataloader.pad_seq_len_divisible
    if sizes.cp == 1:
        return None, pad
    attention = resolve_cp_attention(cfg.distributed.cp_attention, on_cuda=not _on_cpu(cfg.dist_env.device))
    if cfg.packed_sequence.packed_sequence_size:
        raise ValueError(
            "packed_sequence with distributed.cp_size > 1 is not supported yet: a packed row's per-sample positions "
            "and block-causal mask are not split over the cp ranks; set packed_sequence.packed_sequence_size: 0 or "
            "distributed.cp_size: 1"
        )
    multiple = 2 * sizes.cp * (sizes.tp if cfg.distributed.sequence_parallel else 1)
    return attention, math.lcm(pad or 1, multiple)


def _check_ring_attention(text_cfg) -> None:
    """torch's ring attention is plain causal SDPA: refuse attention it cannot compute.

    Raises:
        ValueError: sliding-window or soft-capped attention, naming ``distributed.cp_attention``.
    """
    layer_types = getattr(text_cfg, "layer_types", None) or ()
    window = getattr(text_cfg, "sliding_window", None) and getattr(text_cfg, "use_sliding_window", True)
    if "sliding_attention" in layer_types or (window and not layer_types):
        raise ValueError("distributed.cp_attention: ring computes plain causal attention, but this model uses a "
                         "sliding window; set distributed.cp_attention: allgather")
    if getattr(text_cfg, "attn_logit_softcapping", None):
        raise ValueError("distributed.cp_attention: ring cannot soft-cap attention logits "
                         "(attn_logit_softcapping); set distributed.cp_attention: allgather")


def _checkpoint_to_resume(cfg, model, dp: int) -> Path | None:
    """``checkpoint.restore_from`` resolved (null: the latest complete checkpoint when
    checkpointing is enabled) and checked against ``model`` (meta tensors) and the data-parallel size.

    Raises:
        CorruptCheckpointError: an incomplete, truncated or unsafe checkpoint, one of
            another model, or a data position this dp size cannot resume.
    """
    from nemo_pp.checkpoint.checkpointer import check_checkpoint
    from nemo_pp.checkpoint.layout import CorruptCheckpointError, resolve_restore_from

    ck = cfg.checkpoint
    if ck.restore_from is None and not ck.enabled:
        return None
    path = resolve_restore_from(ck.checkpoint_dir, ck.restore_from)
    if path is None:
        return None
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    saved = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in frozen}  # LoRA: adapters only
    state = check_checkpoint(path, saved)
    samples = int(state.get("samples_in_epoch", 0))
    if samples % dp:
        raise CorruptCheckpointError(
            f"{path} stopped {samples} samples into epoch {state['epoch']}, which {dp} data-parallel ranks cannot "
            "split evenly; resume with a data-parallel size that divides it"
        )
    return path


def _check_peft(cfg, model, sizes):
    """The ``peft:`` section built and checked against ``model`` (meta tensors), which it
    then adapts; whether it adapts the output projection; (adapter, base) parameter counts.
    (None, False, (0, 0)) without the section.

    Raises:
        ValueError: the section is not a PeftConfig, matches no linear module (the
            model's linear module names listed), or adapts the output projection under tp > 1.
    """
    from nemo_pp._peft.lora import PeftConfig, apply_lora, matched_linear_modules
    from nemo_pp.config import instantiate

    if cfg.get("peft") is None:
        return None, False, (0, 0)
    peft = instantiate(cfg.peft)
    if not isinstance(peft, PeftConfig):
        raise ValueError(f"peft._target_ must build a nemo_pp._peft.lora.PeftConfig, not a {type(peft).__name__}")
    matched = matched_linear_modules(model, peft)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    adapts_head = head is not None and names.get(id(head)) in matched
    if sizes.tp > 1 and adapts_head:
        raise ValueError(
            f"peft with distributed.tp_size > 1 cannot adapt the output projection '{names[id(head)]}' (its logits are "
            "gathered over tp; nemo_pp has no adapter plan for that); leave it out (e.g. peft.target_modules: "
            "['*_proj'] instead of match_all_linear) or set distributed.tp_size: 1"
        )
    if not matched:
        names = sorted({fqn.rsplit(".", 1)[-1] for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"peft: target_modules={peft.target_modules} exclude_modules={peft.exclude_modules} match no linear module "
            f"of the model; its linear modules are named {names} (patterns may use *, e.g. '*.layers.0.*.q_proj')"
        )
    base = sum(p.numel() for p in model.parameters())
    apply_lora(model, peft)
    return peft, adapts_head, (sum(p.numel() for p in model.parameters() if p.requires_grad), base)


def _check_packing(cfg, sizes) -> None:
    """Refuse packed sequences where they cannot work (before any data is read).

    Raises:
        ValueError: rows shorter than a sample may be, split samples, or sequence parallelism.
    """
    pk = cfg.packed_sequence
    if not pk.packed_sequence_size:
        return
    seq = OmegaConf.select(cfg, "dataset.seq_length")
    if seq is not None and pk.packed_sequence_size < seq:
        raise ValueError(
            f"packed_sequence.packed_sequence_size={pk.packed_sequence_size} is shorter than a sample may be "
            f"(dataset.seq_length={seq}); set it to at least {seq}, typically a few samples' worth"
        )
    if pk.split_across_pack:
        raise ValueError("packed_sequence.split_across_pack: true is not supported (the second part of a sample "
                         "could not attend to its first); set it to false")
    if cfg.distributed.sequence_parallel:
        raise ValueError("packed_sequence with distributed.sequence_parallel is not supported yet: the per-sample "
                         "positions are not sharded with the sequence; set one of them off")
