"""The recipe's checks that need the world size or the model's module tree: each refuses
a config it cannot honour, naming the key and the fix, before any work.

All of them are pure: they read the config, the meta-device model and files on disk
(the checkpoint to resume), and communicate nothing, so every rank fails alike.
:func:`nemo_pp.planning.run_plan.plan_run` runs them in order.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_pp._peft.lora import PeftConfig, apply_lora, matched_linear_modules
from nemo_pp.checkpoint.checkpointer import check_checkpoint
from nemo_pp.checkpoint.layout import CorruptCheckpointError, complete_checkpoints, resolve_restore_from
from nemo_pp.config import instantiate
from nemo_pp.models.lm_head import check_head_loss, takes_hidden_states
from nemo_pp.models.module_tree import decoder_layers, text_config

CP_ATTENTIONS = ("auto", "ring", "allgather")


def resolve_cp_attention(cp_attention: str, on_cuda: bool) -> str:
    """``auto`` -> ``ring`` on CUDA, ``allgather`` elsewhere; other values unchanged.

    Raises:
        ValueError: ``ring`` without CUDA, or an unknown value (names ``distributed.cp_attention``).
    """
    if cp_attention not in CP_ATTENTIONS:
        raise ValueError(f"distributed.cp_attention must be one of {CP_ATTENTIONS}, got {cp_attention!r}")
    if cp_attention == "auto":
        return "ring" if on_cuda else "allgather"
    if cp_attention == "ring" and not on_cuda:
        raise ValueError(
            "distributed.cp_attention: ring is torch's context_parallel (ring attention over SDPA), which has no CPU "
            "implementation; set distributed.cp_attention: allgather (or auto) or run on CUDA"
        )
    return cp_attention


def on_cpu(device) -> bool:
    """True when ``dist_env.device`` means the CPU: ``"cpu"``, or None/``"auto"`` without CUDA."""
    return device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())


def check_sequence_lengths(cfg, text_cfg) -> None:
    """Refuse sequence lengths (tokens) the model's positions cannot reach.

    Args:
        cfg: the recipe config; reads ``dataset.seq_length``, ``validation_dataset.seq_length``
            and ``distributed.pipeline.pp_seq_len`` (None: not checked).
        text_cfg: the model's text config; no ``max_position_embeddings``: nothing checked.

    Raises:
        ValueError: one of them exceeds ``max_position_embeddings``.
    """
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


def check_context_parallel(cfg, sizes) -> tuple[str | None, int | None]:
    """The resolved ``cp_attention`` (None at cp 1) and the collators' padding multiple.

    Under cp > 1 every sequence is cut into ``2 * cp`` chunks (and each rank's slice into tp
    shards under sequence parallelism), so batches are padded to a multiple of that: the
    least common multiple with ``dataloader.pad_seq_len_divisible``.

    Raises:
        ValueError: ``cp_attention: ring`` without CUDA; packed sequences with cp > 1.
    """
    pad = cfg.dataloader.pad_seq_len_divisible
    if sizes.cp == 1:
        return None, pad
    attention = resolve_cp_attention(cfg.distributed.cp_attention, on_cuda=not on_cpu(cfg.dist_env.device))
    if cfg.packed_sequence.packed_sequence_size:
        raise ValueError(
            "packed_sequence with distributed.cp_size > 1 is not supported yet: a packed row's per-sample positions "
            "and block-causal mask are not split over the cp ranks; set packed_sequence.packed_sequence_size: 0 or "
            "distributed.cp_size: 1"
        )
    return attention, math.lcm(pad or 1, sizes.seq_len_divisor)


def check_router_loss(model, sizes) -> None:
    """Refuse the router's load-balancing loss where it would not be exact.

    Under context parallelism a cp rank routes only its slice of each sequence, while the
    loss is a product of per-microbatch means over the whole sequence (the tokens each expert
    got, the mean router probability), so each rank's loss would be of another batch.

    Raises:
        ValueError: ``output_router_logits`` with ``distributed.cp_size`` > 1 (names both keys).
    """
    if sizes.cp > 1 and getattr(text_config(model.config), "output_router_logits", False):
        raise ValueError(
            f"model.output_router_logits: true with distributed.cp_size={sizes.cp} is not supported: the router's "
            "load-balancing loss is a product of means over each whole microbatch, and a cp rank routes only its "
            "slice of the sequence; set distributed.cp_size: 1 or model.output_router_logits: false")


def check_ring_attention(text_cfg) -> None:
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


def checkpoint_to_resume(cfg, model, dp: int) -> Path | None:
    """``checkpoint.restore_from`` resolved (null: the latest complete checkpoint when
    checkpointing is enabled) and checked against ``model`` (meta tensors) and the data-parallel size.

    Raises:
        CorruptCheckpointError: an incomplete, truncated or unsafe checkpoint, one of
            another model, or a data position this dp size cannot resume.
    """
    ck = cfg.checkpoint
    if ck.restore_from is None and not ck.enabled:
        return None
    path = resolve_restore_from(ck.checkpoint_dir, ck.restore_from)
    if path is None:
        return None
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    saved = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in frozen}  # LoRA: adapters only
    try:
        state = check_checkpoint(path, saved, checksums=ck.verify_checksums)
    except CorruptCheckpointError as exc:
        older = [ref.path for ref in complete_checkpoints(ck.checkpoint_dir) if ref.path != path]
        if ck.restore_from is not None or not older:
            raise
        raise CorruptCheckpointError(
            f"{exc}. The previous complete checkpoint is {older[-1]}: resume from it with "
            f"checkpoint.restore_from={older[-1]}"
        ) from None
    check_stream_resume(cfg, state, path, dp)
    samples = int(state.get("samples_in_epoch", 0))
    if samples % dp:
        raise CorruptCheckpointError(
            f"{path} stopped {samples} samples into epoch {state['epoch']}, which {dp} data-parallel ranks cannot "
            "split evenly; resume with a data-parallel size that divides it"
        )
    return path


# the trainer-state key of a streamed data set's per-rank positions (nemo_pp.datasets.streaming)
STREAM_STATE_KEY = "data_stream"


def is_streaming(node) -> bool:
    """Whether data set config ``node`` streams: ``streaming: true``, or a ``_target_`` that
    always streams (``ColumnMappedTextInstructionIterableDataset``)."""
    from nemo_pp.config.targets import node_target_object

    if node is None:
        return False
    return bool(node.get("streaming")) or bool(getattr(node_target_object(node), "always_streams", False))


def check_streaming(cfg) -> bool:
    """Refuse what a streamed training set cannot do exactly, before any row or weight is
    read; returns whether ``dataset`` streams.

    Raises:
        ValueError: naming the key and the fix: a data set class that cannot stream
            (``dataset.streaming``), a streamed ``validation_dataset``, no
            ``step_scheduler.max_steps`` (a stream has no length), ``dataloader.shuffle: true``
            (``datasets``' shuffle buffer is not restored on resume), ``dataloader.num_workers``
            > 0 (workers would read ahead of the saved position), a sliced ``dataset.split``,
            ``dataset.repeat_on_exhaustion: false`` (the recipe always starts the next pass).
    """
    from nemo_pp.config.targets import node_target_object

    val = cfg.get("validation_dataset")
    if is_streaming(val):
        raise ValueError("validation_dataset.streaming: true is not supported: validation reads its whole set at "
                         "every validation (its batches and mean need a length); set validation_dataset.streaming: "
                         "false and keep it small with validation_dataset.limit_dataset_samples")
    node = cfg.get("dataset")
    if not is_streaming(node):
        return False
    target = node_target_object(node)
    if not getattr(target, "can_stream", False):
        name = node.get("_target_")
        raise ValueError(
            f"dataset.streaming: true, but {name} cannot stream (it needs its whole split: vision-language rows, "
            "chats checked row by row, text cut into blocks); streaming data sets are nemo_pp.datasets.llm.squad.SQuAD "
            "and nemo_pp.datasets.llm.column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset; set "
            "dataset.streaming: false")
    if cfg.step_scheduler.get("max_steps") is None:
        raise ValueError("dataset.streaming: true: a stream has no length, so the run needs step_scheduler.max_steps "
                         "(optimizer steps; the stream starts again at its end)")
    if node.get("repeat_on_exhaustion") is False:
        raise ValueError("dataset.repeat_on_exhaustion: false: the recipe starts a stream again at its end and runs "
                         "step_scheduler.max_steps steps; remove the key, or set max_steps to the steps one pass holds")
    if cfg.dataloader.shuffle:
        raise ValueError(
            "dataloader.shuffle: true cannot resume a streamed data set exactly (datasets' shuffle buffer is lost "
            "on resume); set dataloader.shuffle: false and shuffle the rows once before training (e.g. "
            "datasets.load_dataset(...).shuffle(seed=0).to_json(...)), or set dataset.streaming: false")
    if cfg.dataloader.num_workers:
        raise ValueError(f"dataloader.num_workers={cfg.dataloader.num_workers}: a streamed data set is read in the "
                         "training process (workers would read ahead of the position a checkpoint saves); set "
                         "dataloader.num_workers: 0")
    if "[" in str(node.get("split", "")):
        raise ValueError(f"dataset.split={node.get('split')!r}: a streamed split cannot be sliced; give the split "
                         "name alone and dataset.limit_dataset_samples for the first N rows, or set "
                         "dataset.streaming: false")
    return True


def check_stream_resume(cfg, state: dict, path, dp: int) -> None:
    """Refuse a checkpoint whose data position this run's data cannot continue exactly.

    A streamed run records ``{"dp_size", "packed_sequence_size", "ranks": [position per dp
    rank]}`` under :data:`STREAM_STATE_KEY`. Unpacked, the global sample count positions
    the stream at any dp size. Packed, each rank packed its own share of the rows, so its
    position holds only at the dp size and row length that made it.

    Raises:
        CorruptCheckpointError: the checkpoint streamed and this run does not, or the
            reverse; a different ``packed_sequence.packed_sequence_size``; a packed stream
            resumed at another ``distributed.dp_size``.
    """
    saved = state.get(STREAM_STATE_KEY)
    streaming = is_streaming(cfg.get("dataset"))
    if saved is None and not streaming:
        return
    if (saved is not None) != streaming:
        was, now = ("a map-style", "streams") if saved is None else ("a streamed", "does not stream")
        raise CorruptCheckpointError(
            f"{path} holds the position of {was} data set and this run {now} (dataset.streaming): the two read rows "
            "in different orders; resume with the checkpoint's dataset.streaming, or start a new run in another "
            "checkpoint.checkpoint_dir")
    pack = cfg.packed_sequence.packed_sequence_size
    if int(saved.get("packed_sequence_size", 0)) != pack:
        raise CorruptCheckpointError(
            f"{path} streamed with packed_sequence.packed_sequence_size={saved.get('packed_sequence_size', 0)} and "
            f"this run sets {pack}: its data position counts rows of those packs; resume with "
            f"packed_sequence.packed_sequence_size={saved.get('packed_sequence_size', 0)}")
    if pack and int(saved["dp_size"]) != dp:
        raise CorruptCheckpointError(
            f"{path} packed its stream at distributed.dp_size={saved['dp_size']} and this run has {dp} data-parallel "
            "ranks: each rank packed its own share of the rows, and those positions do not map onto another dp size "
            f"(without packing they would); resume with distributed.dp_size={saved['dp_size']}")


def check_compile(cfg) -> dict | None:
    """``torch.compile``'s arguments of the ``compile:`` section, or None when it is off.

    Inductor builds C++ kernels on a CPU (a C++ compiler: ``$CXX``, ``g++``, ``clang++`` or
    ``c++`` on the PATH) and Triton kernels on CUDA (the ``triton`` package).

    Raises:
        ValueError: naming ``compile.enabled``, when inductor cannot build on this machine.
    """
    c = cfg.compile
    if not c.enabled:
        return None
    if c.backend == "inductor":
        cuda = cfg.dist_env.device == "cuda" or (cfg.dist_env.device == "auto" and torch.cuda.is_available())
        if cuda and importlib.util.find_spec("triton") is None:
            raise ValueError("compile.enabled: true with backend inductor on CUDA needs the triton package "
                             "(pip install triton); or set compile.enabled: false")
        names = [n for n in (os.environ.get("CXX"), "g++", "clang++", "c++") if n]
        if not any(shutil.which(n) for n in names):
            raise ValueError(f"compile.enabled: true with backend inductor needs a C++ compiler, and none of "
                             f"{names} is on the PATH: install one (apt install g++) or set compile.enabled: false")
    return dict(backend=c.backend, mode=c.mode, fullgraph=bool(c.fullgraph), dynamic=c.dynamic)


def check_loss_fn(cfg, model, sizes, lora_adapts_head: bool, peft) -> bool:
    """Whether ``loss_fn`` takes hidden states (``FusedLinearCrossEntropy``: the last stage then
    computes it); such a loss is refused where it cannot be exact
    (:func:`nemo_pp.models.lm_head.check_head_loss`), before any weight is read.

    Raises:
        ValueError: naming ``loss_fn`` and the fix.
    """
    if not takes_hidden_states(instantiate(cfg.loss_fn)):
        return False
    check_head_loss(model, sizes.tp, lora_adapts_head, peft.dropout if peft is not None else 0.0,
                    cfg.distributed.pipeline.patch_causal_lm_model)
    return True


def check_peft(cfg, model, sizes):
    """The ``peft:`` section built and checked against ``model`` (meta tensors); whether it
    adapts the output projection; (adapter, base) parameter counts; and an adapted copy of
    ``model`` (meta tensors, ``model`` itself left as it is) whose trainable tensors are what
    a LoRA checkpoint holds. (None, False, (0, 0), model) without the section.

    Raises:
        ValueError: the section is not a PeftConfig, matches no linear module (the
            model's linear module names listed), or adapts the output projection under tp > 1.
    """
    if cfg.get("peft") is None:
        return None, False, (0, 0), model
    peft = instantiate(cfg.peft)
    if not isinstance(peft, PeftConfig):
        raise ValueError(f"peft._target_ must build a nemo_pp._peft.lora.PeftConfig, not a {type(peft).__name__}")
    matched = matched_linear_modules(model, peft)
    _refuse_non_linear_targets(model, peft)
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
    adapted = copy.deepcopy(model)  # meta tensors: the copy costs no memory
    apply_lora(adapted, peft)
    return peft, adapts_head, (sum(p.numel() for p in adapted.parameters() if p.requires_grad), base), adapted


def _refuse_non_linear_targets(model, peft) -> None:
    """An explicit ``target_modules`` pattern naming a module that holds weights but is no
    ``nn.Linear`` (a mixture of experts' fused experts ``experts.gate_up_proj: [E, 2I, H]``,
    its router) would silently adapt nothing there: refuse it with the reason."""
    if peft.match_all_linear or not peft.target_modules:
        return
    probe = torch.nn.Linear(1, 1, device="meta")  # name matching alone, whatever the module's type
    for fqn, module in model.named_modules():
        if not fqn or isinstance(module, torch.nn.Linear) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if peft.matches(fqn.rsplit(".", 1)[-1], fqn, probe):
            raise ValueError(
                f"peft.target_modules={peft.target_modules} names '{fqn}', a {type(module).__name__}, not an "
                "nn.Linear: LoRA here adapts linear layers only, and a mixture of experts' experts are fused 3-D "
                "parameters (its router is no nn.Linear either); adapt the attention projections (e.g. "
                "target_modules: ['*_proj']) and the experts stay frozen")


def check_packing(cfg, sizes) -> None:
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


def check_grad_sync_options(
    patch_stage_backward_maybe_with_nosync: bool = False,
    reduce_grad_per_microbatch: bool = False,
) -> None:
    """Refuse the reference's gradient-sync switches that torch's own PipelineStage makes moot.

    torch's ``PipelineStage`` (read and measured on 2.13) already runs every microbatch's backward without FSDP
    gradient sync and reduces once per step in its ``REDUCE_GRAD`` action
    (``PipelineStage.backward_maybe_with_nosync`` / ``perform_reduce_grad``), which is
    what the reference's patch adds. (``defer_fsdp_grad_sync`` goes further, across the
    batches of one optimizer step: see ``AutoPipeline.set_grad_sync``.)

    Raises:
        ValueError: a non-default value, naming the key and the reason.
    """
    key = "distributed.pipeline"
    if patch_stage_backward_maybe_with_nosync:
        raise ValueError(
            f"{key}.patch_stage_backward_maybe_with_nosync: true is not needed: torch's PipelineStage already skips "
            "FSDP gradient sync on all but the step's last backward and reduces once (REDUCE_GRAD); remove it or set false"
        )
    if reduce_grad_per_microbatch:
        raise ValueError(
            "reduce_grad_per_microbatch=True is not supported: gradients are reduced once per step after the last "
            "microbatch (torch's REDUCE_GRAD); per-microbatch reduction would only add communication"
        )


def check_logger_packages(cfg) -> None:
    """Raise before any work when a configured logger's package is missing.

    Raises:
        ValueError: names the section and the package to install.
    """
    for section, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if cfg.get(section) is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"{section}: the {package} package is not installed; pip install {package} "
                             f"(or nemo_pp[loggers]), or remove the {section} section")


def check_evaluation(cfg) -> None:
    """Refuse an ``evaluation`` section the run cannot honour (before any data is read).

    Raises:
        ValueError: no ``validation_dataset`` (its prompts and answers are what is scored),
            or no export to generate with after training (``checkpoint.save_consolidated``).
    """
    if cfg.get("evaluation") is None:
        return
    if cfg.get("validation_dataset") is None:
        raise ValueError("evaluation scores generations on the validation_dataset's prompts, and there is none: "
                         "add a validation_dataset section (e.g. SQuAD's validation split) or remove evaluation")
    if cfg.checkpoint.save_consolidated not in ("final", "every"):
        raise ValueError(f"evaluation generates with the exported Hugging Face folder after training, and "
                         f"checkpoint.save_consolidated={cfg.checkpoint.save_consolidated} exports none: set it to "
                         "final, or remove evaluation")


def check_activation_checkpointing(model) -> None:
    """Activation checkpointing wraps the decoder layers: refuse a model without a layer stack.

    Raises:
        ValueError: no decoder layer stack, naming ``distributed.activation_checkpointing``.
    """
    try:
        decoder_layers(model)
    except ValueError as exc:
        raise ValueError(f"distributed.activation_checkpointing: {exc}") from None


def checkpoint_bytes(model, optimizer_states: int = 2, pp: int = 1) -> int:
    """Bytes one training checkpoint of ``model`` (meta tensors; LoRA: the adapted copy)
    takes on disk: its trainable tensors (all of them for full fine-tuning) and
    ``optimizer_states`` optimizer tensors of each (AdamW: 2). A tied embedding counts once
    at ``pp`` 1 and twice under a pipeline (the first and the last stage each save theirs)."""
    trainable = [p for _, p in model.named_parameters(remove_duplicate=pp == 1) if p.requires_grad]
    return (1 + optimizer_states) * sum(p.numel() * p.element_size() for p in trainable)


def check_free_space(cfg, model, pp: int = 1) -> int:
    """Refuse a run whose ``checkpoint.checkpoint_dir`` disk cannot hold one checkpoint
    (when checkpointing) and the end-of-run export of the whole model (a LoRA run's only with
    ``save_merged_model``: its adapter folder is small); returns the bytes needed.

    The nearest existing folder of ``checkpoint_dir`` is measured (``shutil.disk_usage``).

    Raises:
        OSError (ENOSPC): naming ``checkpoint.checkpoint_dir``, the bytes needed and free.
    """
    import errno
    import shutil

    ck = cfg.checkpoint
    need = checkpoint_bytes(model, pp=pp) if ck.enabled else 0
    if ck.save_consolidated in ("final", "every") and (cfg.get("peft") is None or ck.save_merged_model):
        need += sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if not ck.check_free_space or need == 0:
        return need
    folder = Path(ck.checkpoint_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"checkpoint.checkpoint_dir={ck.checkpoint_dir}: its disk has {free / 2**30:.2f} GiB free, and one checkpoint"
            f" and the export of this run need about {need / 2**30:.2f} GiB; free space, point checkpoint_dir at a "
            "larger disk, or skip this check with checkpoint.check_free_space=false",
        )
    return need


def _takes_images(node) -> bool | None:
    """Whether data set config ``node``'s ``_target_`` is an image + text data set (its
    ``image_text`` attribute); None when there is no such node or its target cannot be read."""
    from nemo_pp.config.targets import node_target_object

    target = node_target_object(node)
    return None if target is None else bool(getattr(target, "image_text", False))


def check_vision_language(cfg, model, sizes) -> None:
    """Refuse what a vision-language run cannot do, before any weight or row is read: a
    vision-language model with a text-only data set and the reverse, and the axes its
    stages are not proven under (tp, cp, packed sequences).

    Raises:
        ValueError: naming the key and the fix.
    """
    from nemo_pp.models.vlm import is_vision_language, vision_family

    vlm = is_vision_language(model.config)
    for key in ("dataset", "validation_dataset"):
        images = _takes_images(cfg.get(key))
        if images is None:
            continue
        if vlm and not images:
            raise ValueError(
                f"{key}._target_: {cfg[key]['_target_']} is a text-only data set but the model is the vision-language "
                f"{type(model).__name__}; use nemo_pp.datasets.vlm.datasets.make_vlm_dataset (image + conversation "
                "rows), or a text model")
        if images and not vlm:
            raise ValueError(
                f"{key}._target_: {cfg[key]['_target_']} is an image data set but the model "
                f"({type(model).__name__}) has no vision encoder; use a vision-language model or a text data set")
    if not vlm:
        return
    family = vision_family(model.config)
    for size, key in ((sizes.tp, "distributed.tp_size"), (sizes.cp, "distributed.cp_size")):
        if size > 1:
            raise ValueError(f"{key}={size} is not supported for vision-language models ({family.name}) yet: their "
                             "stages are proven at tp 1 and cp 1; set it to 1 and use pp / dp")
    if cfg.packed_sequence.packed_sequence_size:
        raise ValueError("packed_sequence.packed_sequence_size is not supported for vision-language models: rows "
                         "carry their own images; set it to 0")
