"""The fine-tuning recipe's config schema: every section it reads, typed, with defaults and checks.

Each section is a dataclass whose docstring says what each key means in code; the typed
checking (types, bounds, choices, `_target_` sections, unknown keys) is
:mod:`nemo_pp.config.typed`. The free-form `_target_` sections are `model`, `loss_fn`,
`dataset`, `validation_dataset`, `optimizer` and `peft`. Checks that need the world size
or the model (divisibility, schedule constraints) are
:func:`nemo_pp.planning.run_plan.plan_run`'s.

    cfg = load_recipe_config(path, overrides)   # typed: cfg.step_scheduler.max_steps is an int
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import DictConfig

from nemo_pp.config import load_config, validate_targets
from nemo_pp.config.typed import Rule, schema_defaults, setting
from nemo_pp.config.typed import validate_config as _validate
from nemo_pp.models.auto_model import DTYPES

__all__ = [
    "CheckpointConfig",
    "ClipGradNormConfig",
    "DataloaderConfig",
    "DistEnvConfig",
    "DistributedConfig",
    "EvaluationConfig",
    "FinetuneConfig",
    "LRSchedulerConfig",
    "LoggingConfig",
    "CompileConfig",
    "MixedPrecisionConfig",
    "PackedSequenceConfig",
    "PipelineConfig",
    "Rule",
    "StepSchedulerConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "load_recipe_config",
    "schema_defaults",
    "setting",
    "validate_config",
]


# every spelling of models.auto_model.DTYPES (with or without "torch."), stored as torch's own name
_DTYPES = {spelling: str(dtype).removeprefix("torch.") for name, dtype in DTYPES.items()
           for spelling in (name, f"torch.{name}")}


@dataclass
class DistEnvConfig:
    """``dist_env``: the process group (``nemo_pp.distributed.init.initialize_distributed``).

    Attributes:
        device: ``cuda`` (nccl, one GPU per local rank), ``cpu`` (gloo), or ``auto`` (cuda when available).
        timeout_minutes: every process group's collective timeout: a hang fails after this many minutes.
    """

    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    timeout_minutes: float = setting(10.0, gt=0)


@dataclass
class PipelineConfig:
    """``distributed.pipeline``: NeMo AutoModel's ``AutoPipeline`` keys, which the plan reads
    (``nemo_pp.planning.pipeline.make_pipeline_plan``).

    Attributes:
        _target_: kept for NeMo's YAML; the recipe builds with ``AutoPipeline.from_plan``.
        pp_schedule: torch's schedule, any accepted spelling (``1f1b``, ``gpipe``,
            ``interleaved_1f1b``, ``zbv``, ...).
        pp_schedule_csv: a compute-only CSV schedule; its rows fix stages and placement.
        pp_microbatch_size: samples per microbatch (``batch_size`` / this = microbatches per step).
        layers_per_stage: decoder layers per virtual stage; null: automatic.
        round_virtual_stages_to_pp_multiple: round the virtual stage count up or down to a
            multiple of pp_size.
        module_fqns_per_model_part: a manual split, one FQN list per stage.
        patch_inner_model / patch_causal_lm_model: install nemo_pp's stage forwards on the
            decoder / the causal-LM wrapper (``models.stage_forward``).
        patch_stage_backward_maybe_with_nosync: refused when true (torch already defers FSDP
            gradient sync to the step's last microbatch).
        defer_fsdp_grad_sync: FSDP2 reduce-scatters once per optimizer step, not per accumulated batch.
        pool_recv_buffers: under 1F1B, microbatches share the receive buffers (as many as a stage
            holds microbatches, plus one) instead of one each.
        scale_grads_in_schedule: refused when true (the recipe normalises by label tokens).
        pp_seq_len: static stage shapes set at build for this length; also the length the split is weighed at.
        dtype: cast the model to this dtype before splitting; null: ``model.torch_dtype``.
        split: how layer boundaries are placed: ``balanced`` (FLOP model incl. the head and
            loss), ``profile`` (timed on rank 0's device) or ``uniform``.
        max_stage_params: cap on any stage's parameters for the balanced split.
    """

    _target_: str = "nemo_pp.distributed.pipelining.AutoPipeline"
    pp_schedule: Optional[str] = "1f1b"
    pp_schedule_csv: Optional[str] = None
    pp_microbatch_size: int = setting(1, ge=1)
    layers_per_stage: Optional[int] = setting(None, ge=1)
    round_virtual_stages_to_pp_multiple: Optional[str] = setting(None, choices=("up", "down"))
    module_fqns_per_model_part: Optional[List[List[str]]] = None
    patch_inner_model: bool = True
    patch_causal_lm_model: bool = True
    patch_stage_backward_maybe_with_nosync: bool = False
    defer_fsdp_grad_sync: bool = True
    pool_recv_buffers: bool = True
    scale_grads_in_schedule: bool = False
    pp_seq_len: Optional[int] = setting(None, ge=1)
    dtype: Optional[str] = setting(None, choices=_DTYPES)
    split: str = setting("balanced", choices=("balanced", "uniform", "profile"))
    max_stage_params: Optional[int] = setting(None, ge=1, hint="null: no cap")


@dataclass
class MixedPrecisionConfig:
    """``distributed.mp_policy``: FSDP2's ``MixedPrecisionPolicy``: compute in ``param_dtype``
    on fp32 master weights.

    Attributes:
        param_dtype: the dtype parameters are cast to for forward and backward (and the
            dtype stages exchange).
        reduce_dtype: the dtype gradients are reduce-scattered in.
        output_dtype: the dtype of each FSDP unit's outputs; null: ``param_dtype``.
    """

    param_dtype: Optional[str] = setting("bfloat16", choices=_DTYPES)
    reduce_dtype: Optional[str] = setting("float32", choices=_DTYPES)
    output_dtype: Optional[str] = setting(None, choices=_DTYPES)


@dataclass
class DistributedConfig:
    """``distributed``: the mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` and how each stage is
    parallelized (``nemo_pp.planning.dims.resolve_parallel_sizes``, ``distributed.parallelize``).

    Attributes:
        strategy: data parallelism's implementation; only ``fsdp2`` (torch's ``fully_shard``).
        dp_size: data-parallel ranks; null: world size / (pp_size * cp_size * tp_size).
        dp_replicate_size: HSDP's replica groups (parameters sharded within each, replicated
            across); 1: plain FSDP2.
        tp_size: tensor-parallel ranks per stage (the model's ``base_model_tp_plan``).
        cp_size: context-parallel ranks: each holds ``S / cp`` tokens of every sequence.
        cp_attention: the attention over the cp group under cp > 1.
        ep_size: expert-parallel ranks: a mixture of experts' experts sharded over the
            data-parallel x cp ranks of each stage, tokens routed to them by all-to-all; it
            divides their number, and the ``dp * cp / ep`` ranks left (``ep_shard``)
            FSDP2-shard the experts they share.
        pp_size: pipeline stages' ranks (1: one stage of the whole model, same code path).
        sequence_parallel: under tp > 1, hidden states between layers and stages are
            ``[B, S / tp, H]`` sequence shards (Korthikanti et al., 2022).
        activation_checkpointing: decoder layers recompute their activations in backward.
        mp_policy: FSDP2 mixed precision (needs dp * cp > 1); null: one dtype throughout.
        pipeline: the pipeline's settings (:class:`PipelineConfig`).
    """

    strategy: str = setting("fsdp2", choices=("fsdp2",))
    dp_size: Optional[int] = setting(None, ge=1, hint="null: world_size / (pp_size * cp_size * tp_size)")
    dp_replicate_size: int = setting(1, ge=1)
    tp_size: int = setting(1, ge=1)
    cp_size: int = setting(1, ge=1)
    cp_attention: str = setting("auto", choices=("auto", "ring", "allgather"),
                                hint="auto: ring (torch's context_parallel) on CUDA, allgather elsewhere")
    ep_size: int = setting(1, ge=1)
    pp_size: int = setting(1, ge=1)
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    mp_policy: Optional[MixedPrecisionConfig] = None
    pipeline: PipelineConfig = setting(factory=PipelineConfig)


@dataclass
class DataloaderConfig:
    """``dataloader``: how samples become batches (``nemo_pp.training.data.build_dataloader``).

    Attributes:
        batch_size: samples per ``schedule.step`` on one data-parallel rank (the pipeline's
            ``pp_batch_size``).
        shuffle: a seeded permutation per epoch (the same on every rank).
        num_workers: DataLoader worker processes for the training set.
        pad_seq_len_divisible: pad every batch's length to a multiple of this (raised under
            cp > 1 to a multiple of ``2 * cp``); null: pad to the longest sample only.
    """

    batch_size: int = setting(1, ge=1)
    shuffle: bool = True
    num_workers: int = setting(0, ge=0)
    pad_seq_len_divisible: Optional[int] = setting(None, ge=1)


@dataclass
class StepSchedulerConfig:
    """``step_scheduler``: optimizer steps, accumulation, validation and checkpoint cadence.

    Attributes:
        global_batch_size: samples per optimizer step over all data-parallel ranks; a multiple of
            ``batch_size * dp`` (the quotient is the gradient-accumulation count); null: ``batch_size * dp``.
        local_batch_size: NeMo's spelling of ``dataloader.batch_size`` (must equal it when set).
        num_epochs: passes over the training set.
        max_steps: stop after this many optimizer steps (0: validate and export only).
        val_every_steps: validation loss every N steps (it always runs before and after training).
        ckpt_every_steps: a checkpoint every N steps (also at the end and on SIGTERM).
        max_consecutive_skipped_steps: a step whose loss or gradient norm is NaN or inf is
            skipped (no weight, optimizer or LR change); this many in a row stop the run
            (exit code 3), nothing non-finite written.
    """

    global_batch_size: Optional[int] = setting(None, ge=1)
    local_batch_size: Optional[int] = setting(None, ge=1)
    num_epochs: int = setting(1, ge=1)
    max_steps: Optional[int] = setting(None, ge=0, hint="0 evaluates only; null: as many as the epochs hold")
    val_every_steps: Optional[int] = setting(None, ge=1)
    ckpt_every_steps: Optional[int] = setting(None, ge=1, hint="null: a checkpoint at the end only")
    max_consecutive_skipped_steps: int = setting(3, ge=1, hint="1: stop at the first non-finite step")


@dataclass
class LRSchedulerConfig:
    """``lr_scheduler``: the learning rate per optimizer step (``nemo_pp.training.lr_scheduler``).

    Attributes:
        lr_warmup_steps: linear warm-up from 0 to the optimizer's ``lr`` over this many steps.
        lr_decay_style: the decay to ``min_lr`` over the remaining steps.
        min_lr: the learning rate at the last step.
    """

    lr_warmup_steps: int = setting(0, ge=0)
    lr_decay_style: str = setting("cosine", choices=("cosine", "linear", "constant"))
    min_lr: float = setting(0.0, ge=0)


@dataclass
class ClipGradNormConfig:
    """``clip_grad_norm``: clip by the global gradient norm over every stage (``distributed.grads``).

    Attributes:
        max_norm: the L2 norm threshold; null: no clipping (the norm is still reported).
    """

    max_norm: Optional[float] = setting(1.0, gt=0, hint="null: no clipping")


@dataclass
class LoggingConfig:
    """``logging``: the console.

    Attributes:
        log_every_steps: print a step's metrics line every N steps (every step goes to metrics.jsonl).
        expert_load_every_steps: a mixture of experts writes the tokens each expert received,
            per MoE layer and summed over the last N steps, with each layer's max/mean
            imbalance, to the metric sinks every N steps (an ``expert_load`` record).
        peak_tflops: one rank's peak TFLOP/s that MFU is measured against; null: a known
            accelerator's data-sheet peak, or on a CPU a GEMM probe at the run's thread count
            (:mod:`nemo_pp.planning.throughput`).
    """

    log_every_steps: int = setting(1, ge=1)
    expert_load_every_steps: int = setting(10, ge=1)
    peak_tflops: Optional[float] = setting(None, gt=0)


@dataclass
class CompileConfig:
    """``compile``: regional ``torch.compile`` of every decoder layer (NeMo AutoModel's and
    torchtitan's key names; :mod:`nemo_pp.distributed.compile`).

    Attributes:
        enabled: compile each decoder layer's forward.
        backend: ``torch.compile``'s backend (``inductor``: C++ kernels on CPU, Triton on CUDA).
        mode: ``torch.compile``'s mode (``default``, ``reduce-overhead``, ``max-autotune``,
            ``max-autotune-no-cudagraphs``); null: default.
        fullgraph: refuse graph breaks inside a layer.
        dynamic: null: static first, symbolic sequence length from the second length on
            (one recompile); true: symbolic from the start; false: one compile per length.
    """

    enabled: bool = False
    backend: str = "inductor"
    mode: Optional[str] = setting(None, choices=("default", "reduce-overhead", "max-autotune",
                                                 "max-autotune-no-cudagraphs"))
    fullgraph: bool = False
    dynamic: Optional[bool] = None


_CONSOLIDATED = {"final": "final", "every": "every", "True": "final", "true": "final", "False": "false", "false": "false"}


@dataclass
class CheckpointConfig:
    """``checkpoint``: NeMo AutoModel's checkpoint keys (docs/architecture.md, "Checkpoints").

    Attributes:
        enabled: write resumable DCP checkpoints (and resume from the latest on a rerun).
        checkpoint_dir: the run's folder: config.yaml, metrics, checkpoints, exports.
        model_save_format: DCP's own files or Hugging Face safetensors for the model state.
        save_consolidated: a Hugging Face folder ``hf_model/`` (LoRA: ``hf_adapter/``) at the
            end (``final``), in every checkpoint too (``every``), or never.
        is_async: write in a background thread while training goes on (``dcp.async_save``).
        restore_from: a checkpoint folder to resume from, or ``LATEST`` (an error when none); null: the latest
            complete one in checkpoint_dir when enabled.
        max_recent_checkpoints: keep only the newest N complete checkpoints.
        save_merged_model: a LoRA run also exports the base weights with the adapters merged.
        verify_checksums: before resuming, read every file of the checkpoint and compare its
            checksum with the manifest's (xxh3-128, about 0.1 s per GB); false checks sizes only.
        check_free_space: before training, refuse a checkpoint_dir whose disk has less free
            space than one checkpoint (and the export) of this run needs.
    """

    enabled: bool = False
    checkpoint_dir: str = "outputs/finetune"
    model_save_format: str = setting("torch_save", choices=("torch_save", "safetensors"))
    save_consolidated: Optional[str] = setting(
        "final", choices=_CONSOLIDATED, hint="final: a Hugging Face folder at the end; every: in each checkpoint too"
    )
    is_async: bool = False
    restore_from: Optional[str] = setting(None, hint="null: the latest complete checkpoint in checkpoint_dir, if any")
    max_recent_checkpoints: Optional[int] = setting(None, ge=1, hint="null: keep all")
    save_merged_model: bool = False
    verify_checksums: bool = True
    check_free_space: bool = True


@dataclass
class PackedSequenceConfig:
    """``packed_sequence``: NeMo AutoModel's packing keys (nemo_pp.datasets.packed_sequence).

    Attributes:
        packed_sequence_size: tokens per packed row of several samples (position ids restart
            per sample: block-causal attention); 0: no packing.
        split_across_pack: refused when true (a sample's second part could not attend to its first).
    """

    packed_sequence_size: int = setting(0, ge=0, hint="0: no packing; else tokens per packed row")
    split_across_pack: bool = False


@dataclass
class EvaluationConfig:
    """``evaluation``: a task metric by generation, before and after training
    (:mod:`nemo_pp.training.evaluation`): greedy answers to the ``validation_dataset``
    prompts by the pretrained model and by the exported one, scored with SQuAD's exact
    match and F1 (``torchmetrics``).

    Attributes:
        metric: ``squad``: exact match and token F1 with the official SQuAD v1.1 normalisation.
        max_new_tokens: tokens generated per answer at most (generation stops at eos).
        num_samples: the first N validation prompts; null: all of them.
        batch_size: prompts generated together on each rank (left-padded).
        before_training: also score the pretrained model (``model.pretrained_model_name_or_path``).
    """

    metric: str = setting("squad", choices=("squad",))
    max_new_tokens: int = setting(32, ge=1)
    num_samples: Optional[int] = setting(None, ge=1, hint="null: every validation prompt")
    batch_size: int = setting(8, ge=1)
    before_training: bool = True


@dataclass
class TensorBoardConfig:
    """``tensorboard``: TensorBoard event files (nemo_pp.training.loggers).

    Attributes:
        log_dir: where the event files go.
    """

    log_dir: Optional[str] = setting(None, hint="null: <checkpoint.checkpoint_dir>/tensorboard")


@dataclass
class WandbConfig:
    """``wandb``: a Weights & Biases run (NeMo AutoModel's keys, plus mode).

    Attributes:
        project / entity / name: the run's W&B project, team and display name.
        save_dir: where the run's files go.
        mode: ``offline`` writes locally (no network), ``online`` syncs, ``disabled`` does nothing.
    """

    project: str = "nemo_pp"
    entity: Optional[str] = None
    name: Optional[str] = None
    save_dir: Optional[str] = setting(None, hint="null: checkpoint.checkpoint_dir")
    mode: str = setting("offline", choices=("offline", "online", "disabled"))


@dataclass
class FinetuneConfig:
    """Everything `recipes/finetune.py` reads; `load_recipe_config` loads a YAML into it.

    Attributes:
        seed: python and torch seed of every rank (and the data order's).
        dist_env / distributed: see :class:`DistEnvConfig`, :class:`DistributedConfig`.
        model: the model's ``_target_`` and kwargs (``nemo_pp.NeMoAutoModelForCausalLM.from_pretrained``:
            meta build, each rank reads only its stages).
        loss_fn: ``loss_fn(logits [mb, S, V], labels [mb, S] int64) -> summed loss``.
        dataset / validation_dataset: data set ``_target_`` and kwargs (yield input_ids and aligned labels).
        dataloader / step_scheduler / lr_scheduler / clip_grad_norm: see their classes.
        logging / compile / checkpoint / packed_sequence / tensorboard / wandb / evaluation: see their
            classes (tensorboard, wandb and evaluation are on when present).
        optimizer: a torch optimizer ``_target_`` and kwargs, one per model part.
        peft: LoRA (``nemo_pp._peft.lora.PeftConfig``); null: full fine-tuning.
    """

    seed: int = 42
    dist_env: DistEnvConfig = setting(factory=DistEnvConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    model: Any = setting(None, target=True)
    loss_fn: Any = setting(factory=lambda: {"_target_": "nemo_pp.loss.masked_ce.MaskedCrossEntropy"}, target=True)
    dataset: Any = setting(None, target=True)
    validation_dataset: Optional[Any] = setting(None, target=True)
    dataloader: DataloaderConfig = setting(factory=DataloaderConfig)
    step_scheduler: StepSchedulerConfig = setting(factory=StepSchedulerConfig)
    optimizer: Any = setting(
        factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 1.0e-5, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0},
        target=True,
        kwargs={"lr": Rule(ge=0)},
    )
    lr_scheduler: LRSchedulerConfig = setting(factory=LRSchedulerConfig)
    clip_grad_norm: ClipGradNormConfig = setting(factory=ClipGradNormConfig)
    logging: LoggingConfig = setting(factory=LoggingConfig)
    compile: CompileConfig = setting(factory=CompileConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig)
    peft: Optional[Any] = setting(None, target=True, default_target="nemo_pp._peft.lora.PeftConfig")
    packed_sequence: PackedSequenceConfig = setting(factory=PackedSequenceConfig)
    tensorboard: Optional[TensorBoardConfig] = None
    wandb: Optional[WandbConfig] = None
    evaluation: Optional[EvaluationConfig] = None


def validate_config(cfg: DictConfig, schema: type = FinetuneConfig) -> DictConfig:
    """:func:`nemo_pp.config.typed.validate_config` against the recipe's schema by default.

    Raises:
        ConfigError: see :func:`nemo_pp.config.typed.validate_config`.
    """
    return _validate(cfg, schema)


def load_recipe_config(config_path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a fine-tuning YAML: the schema's defaults under it, overrides on top, validated
    (types, ranges, sections) and every ``_target_`` allowlisted and importable.

    Args:
        config_path: the YAML file.
        overrides: e.g. the list :func:`nemo_pp.config.parse_cli` returns.

    Returns:
        The config resolved and typed: `cfg.step_scheduler.max_steps` is an int or None,
        `cfg.optimizer.lr` whatever the YAML gave, `cfg.dist_env.timeout_minutes` a float.

    Raises:
        ConfigError: anything :func:`nemo_pp.config.load_config` or
            :func:`validate_config` refuses.
    """
    cfg = validate_config(load_config(config_path, overrides, defaults=schema_defaults(FinetuneConfig)))
    validate_targets(cfg)
    return cfg
