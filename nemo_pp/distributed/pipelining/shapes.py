"""Analytic stage shapes: static metadata so no step runs a shape-inference forward.

Without it, torch infers shapes on the first ``step()`` with a real forward passed
serially from stage 0 to N-1, and keeps the recv buffers it sized then: a longer
batch later aborts gloo ("Received data size doesn't match expected size") and a
shorter one silently computes on stale buffers.
"""

from __future__ import annotations

import torch

from nemo_pp._torch_compat import mark_schedule_uninitialized, set_static_stage_meta
from nemo_pp.models.lm_head import HEAD_LOSS_ATTR


def _get_hidden_and_vocab_size(model_config) -> tuple[int, int]:
    """``(hidden_size, vocab_size)`` of a flat (LLM) or nested (``text_config``, VLM) config.

    Raises:
        ValueError: neither the config nor its ``text_config`` has both sizes.
    """
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        if cfg is None:
            continue
        hidden, vocab = getattr(cfg, "hidden_size", None), getattr(cfg, "vocab_size", None)
        if hidden is not None and vocab is not None:
            return int(hidden), int(vocab)
    raise ValueError(f"cannot find hidden_size and vocab_size in {type(model_config).__name__} or its text_config")


def _stage_float_dtype(stage, default: torch.dtype | None) -> torch.dtype:
    """dtype of the activations a stage receives and sends: ``default`` (the plan's
    ``StageSpec.activation_dtype``: FSDP2 mixed precision's compute dtype, which it casts
    whatever the parameters are, else the pipeline's dtype), else the stage's parameter dtype."""
    if default is not None:
        return default
    for p in stage.submod.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _stage_emits_logits(stage) -> bool:
    return getattr(stage.submod, "lm_head", None) is not None


def _precompute_stage_shapes(
    stages: list,
    model_config,
    microbatch_size: int,
    seq_len: int,
    tensor_dtype: torch.dtype | None = None,
    sequence_shards: int = 1,
) -> None:
    """Set static input/output metadata of every local stage, so ``step()`` runs no
    shape-inference forward and no serial point-to-point chain.

    Shapes per microbatch: first stage input ``[mb, S] int64``; other inputs and
    non-last outputs ``[mb, S, H]`` (``[mb, S/tp, H]`` under sequence parallelism); last
    output ``[mb, S, V]`` (hidden states when the stage has no ``lm_head``; ``[1]`` fp32 when it
    computes a hidden-states loss). Float tensors get ``tensor_dtype`` or the stage's
    parameter dtype.

    Args:
        stages: this rank's ``PipelineStage`` objects.
        model_config: the HF config (``hidden_size``, ``vocab_size``, maybe nested).
        microbatch_size: samples per microbatch.
        seq_len: tokens per sample of the coming batches.
        tensor_dtype: dtype of activations; None: the stage parameters' dtype.
        sequence_shards: tp under sequence parallelism (hidden states travel as
            ``[mb, S / tp, H]``), else 1.
    """
    hidden, vocab = _get_hidden_and_vocab_size(model_config)
    for stage in stages:
        dtype = _stage_float_dtype(stage, tensor_dtype)
        # sequence parallelism: hidden states travel as [mb, S/tp, H] shards (logits are gathered)
        shard_len = seq_len // sequence_shards
        if stage.is_first:
            inputs = (torch.empty(microbatch_size, seq_len, dtype=torch.int64, device="meta"),)
        else:
            inputs = (torch.empty(microbatch_size, shard_len, hidden, dtype=dtype, device="meta", requires_grad=True),)
        logits = stage.is_last and _stage_emits_logits(stage)
        if logits and getattr(stage.submod, HEAD_LOSS_ATTR, None) is not None:  # the stage returns its loss
            outputs = (torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True),)
        else:
            outputs = (torch.empty(microbatch_size, seq_len if logits else shard_len, vocab if logits else hidden,
                                   dtype=dtype, device="meta", requires_grad=True),)
        set_static_stage_meta(stage, inputs, outputs)


def reset_pp_stage_shapes(
    schedule,
    stages: list,
    model_config,
    microbatch_size: int,
    seq_len: int,
    tensor_dtype: torch.dtype | None = None,
    sequence_shards: int = 1,
) -> None:
    """Re-size the pipeline for a new sequence length without any forward pass.

    Sets new static metadata (:func:`_precompute_stage_shapes`) and marks the schedule
    uninitialised, so the next ``step()`` rebuilds recv/send buffers from it.
    Gradients accumulated so far survive (``NemoPipelineStage``).
    """
    _precompute_stage_shapes(stages, model_config, microbatch_size, seq_len, tensor_dtype, sequence_shards)
    mark_schedule_uninitialized(schedule)
