"""Splitting a model into pipeline stages: stage ids, virtual stages, FQN tables, copy-and-prune.

A stage model is a copy of the whole model in which every module that belongs to
another stage is ``None`` and ``layers`` is an ``nn.ModuleDict`` keyed by the ORIGINAL
layer index, so parameter FQNs stay ``model.layers.<i>.…`` and checkpoints written
at one pp size load at another.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Sequence

import torch
from torch import nn

from .schedules import canonical_schedule_name, is_single_stage_schedule, schedule_style

logger = logging.getLogger(__name__)

#: Stage-0 modules of multimodal models (vision / audio towers and projectors).
MULTIMODAL_ENCODER_NAMES = (
    "vision_tower",
    "visual",
    "image_encoder",
    "vision_encoder",
    "audio_tower",
    "audio_encoder",
    "audio_model",
    "mm_projector",
    "multi_modal_projector",
    "multimodal_projector",
    "vision_projector",
    "audio_projector",
)


def stage_ids_this_rank(pp_rank: int, pp_size: int, num_stages: int, style: str = "loop") -> tuple[int, ...]:
    """Stage indices held by ``pp_rank``.

    ``"loop"``: rank r holds r, r+pp, r+2pp, ... (``(0, 4)`` for rank 0 of 4 with 8 stages).
    ``"v"``: exactly two stages per rank, r and 2*pp-1-r (``(0, 7)`` likewise).

    Raises:
        ValueError: ``num_stages`` not a multiple of ``pp_size``, or a V split without
            exactly two stages per rank, or an unknown style.
    """
    if num_stages % pp_size:
        raise ValueError(f"num_stages {num_stages} must be divisible by pp_size {pp_size}")
    stages_per_rank = num_stages // pp_size
    if style == "loop":
        return tuple(pp_rank + s * pp_size for s in range(stages_per_rank))
    if style == "v":
        if stages_per_rank != 2:
            raise ValueError(f"V-style placement needs exactly 2 stages per rank, got {stages_per_rank}")
        return (pp_rank, num_stages - 1 - pp_rank)
    raise ValueError(f"unknown stage placement style '{style}' (expected 'loop' or 'v')")


def calculate_virtual_stages(
    num_layers: int,
    layers_per_stage: int | None,
    pp_size: int,
    is_single_stage_schedule: bool,
    round_to_pp_multiple: str | None = None,
) -> tuple[int, int]:
    """Number of (virtual) stages and stages per rank.

    With ``layers_per_stage`` set: ``ceil(num_layers / layers_per_stage)`` stages, rounded
    ``"up"`` or ``"down"`` to a multiple of ``pp_size`` if asked (32 layers, 4 per stage,
    pp 4 -> ``(8, 2)``). Without it: one stage per rank for single-stage schedules,
    two for multi-stage ones.

    Raises:
        ValueError: stages not a multiple of pp_size without rounding, a single-stage
            schedule with several stages per rank, a multi-stage schedule with one, or
            more stages than layers.
    """
    if layers_per_stage is not None:
        if layers_per_stage < 1:
            raise ValueError(f"distributed.pipeline.layers_per_stage must be >= 1, got {layers_per_stage}")
        num_virtual = math.ceil(num_layers / layers_per_stage)
        if num_virtual % pp_size:
            if round_to_pp_multiple == "up":
                num_virtual = math.ceil(num_virtual / pp_size) * pp_size
            elif round_to_pp_multiple == "down":
                num_virtual = max(pp_size, (num_virtual // pp_size) * pp_size)
            elif round_to_pp_multiple is None:
                raise ValueError(
                    f"{num_layers} layers at layers_per_stage={layers_per_stage} give {num_virtual} stages, "
                    f"not a multiple of pp_size={pp_size}; set distributed.pipeline."
                    "round_virtual_stages_to_pp_multiple to 'up' or 'down', or change layers_per_stage"
                )
            else:
                raise ValueError(
                    f"distributed.pipeline.round_virtual_stages_to_pp_multiple must be 'up', 'down' or null, "
                    f"got '{round_to_pp_multiple}'"
                )
        stages_per_rank = num_virtual // pp_size
        if is_single_stage_schedule and stages_per_rank != 1:
            raise ValueError(
                f"layers_per_stage={layers_per_stage} gives {stages_per_rank} stages per rank, but the schedule "
                "runs one stage per rank; use a multi-stage schedule (e.g. interleaved_1f1b) or set "
                "distributed.pipeline.layers_per_stage to null"
            )
        if not is_single_stage_schedule and stages_per_rank < 2:
            raise ValueError(
                f"layers_per_stage={layers_per_stage} gives {stages_per_rank} stage per rank, but the "
                "multi-stage schedule needs at least 2; lower layers_per_stage or use 1f1b/gpipe"
            )
    else:
        stages_per_rank = 1 if is_single_stage_schedule else 2
        num_virtual = pp_size * stages_per_rank
    if num_virtual > num_layers:
        raise ValueError(
            f"{num_virtual} pipeline stages for a model of only {num_layers} layers: every stage needs at "
            "least one layer; lower distributed.pp_size or raise distributed.pipeline.layers_per_stage"
        )
    return num_virtual, stages_per_rank


def generate_hf_model_fqn_per_model_part(
    num_stages: int,
    num_layers: int,
    include_embeddings: bool = True,
    include_lm_head: bool = True,
    include_rotary_emb: bool = True,
    include_multimodal_encoders: bool = True,
    extra_module_fqns: Sequence[str] | None = None,
    fqn_prefix: str = "model.",
    lm_head_fqn: str = "lm_head",
) -> list[list[str]]:
    """Module FQNs of each stage for a Hugging Face decoder (layers spread evenly,
    the remainder going to the earliest stages).

    Stage 0 gets ``{prefix}embed_tokens`` (and multimodal encoders, ``extra_module_fqns``),
    the last stage ``{prefix}norm`` and ``lm_head_fqn``; every stage gets
    ``{prefix}rotary_emb`` when asked. 32 layers over 2 stages:
    ``[[embed_tokens, layers.0..15, rotary_emb], [layers.16..31, norm, lm_head, rotary_emb]]``.

    Raises:
        ValueError: fewer layers than stages, or a non-positive count.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages (each needs one)")
    base, extra = divmod(num_layers, num_stages)
    out: list[list[str]] = []
    start = 0
    for stage in range(num_stages):
        n = base + (1 if stage < extra else 0)
        names: list[str] = []
        if stage == 0:
            if include_embeddings:
                names.append(f"{fqn_prefix}embed_tokens")
            if include_multimodal_encoders:
                names += [f"{fqn_prefix}{m}" for m in MULTIMODAL_ENCODER_NAMES]
            names += list(extra_module_fqns or ())
        names += [f"{fqn_prefix}layers.{i}" for i in range(start, start + n)]
        start += n
        if stage == num_stages - 1:
            names.append(f"{fqn_prefix}norm")
            if include_lm_head:
                names.append(lm_head_fqn)
        if include_rotary_emb:
            names.append(f"{fqn_prefix}rotary_emb")
        out.append(names)
    return out


def _module_tree_fqns(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules() if name}


def _validate_assignment(model: nn.Module, module_names_per_stage: list[list[str]], strict: bool) -> list[list[str]]:
    """Drop absent optional FQNs (non-strict) or reject unknown ones (strict); reject
    modules that own parameters named in two stages or in none."""
    existing = _module_tree_fqns(model)
    cleaned = []
    for stage, names in enumerate(module_names_per_stage):
        missing = [n for n in names if n not in existing]
        if missing and strict:
            raise ValueError(
                f"distributed.pipeline.module_fqns_per_model_part[{stage}] names modules the model does not have: "
                f"{missing}"
            )
        cleaned.append([n for n in names if n in existing])

    owner: dict[str, int] = {}
    for stage, names in enumerate(cleaned):
        for n in names:
            if next(model.get_submodule(n).parameters(), None) is not None:
                if n in owner and owner[n] != stage:
                    raise ValueError(
                        f"module '{n}' is assigned to stages {owner[n]} and {stage}; a module with parameters "
                        "must live on exactly one stage"
                    )
                owner.setdefault(n, stage)
    covered = {f"{n}.{p}" for names in cleaned for n in names for p, _ in model.get_submodule(n).named_parameters()}
    orphans = [name for name, _ in model.named_parameters() if name not in covered]
    if orphans:
        raise ValueError(
            f"parameters are in no pipeline stage: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}; "
            "add their modules to distributed.pipeline.module_fqns_per_model_part"
        )
    return cleaned


def copy_pruned(model: nn.Module, keep: Sequence[str]) -> nn.Module:
    """Deep-copy only the modules named in ``keep`` (and their ancestors).

    Unkept modules become ``None``; a ``ModuleList`` with some kept children becomes an
    ``nn.ModuleDict`` keyed by the original indices. Unkept modules are never copied
    (``deepcopy``'s memo maps them to ``None``), so a stage costs only its own memory.
    """
    keep = set(keep)
    ancestors = {".".join(k.split(".")[:i]) for k in keep for i in range(1, len(k.split(".")))}
    memo: dict[int, object] = {}
    lists_to_convert: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            fqn = f"{prefix}{name}"
            if fqn in keep:
                continue
            if fqn in ancestors:
                if isinstance(child, nn.ModuleList):
                    lists_to_convert.append(fqn)
                visit(child, fqn + ".")
            else:
                memo[id(child)] = None

    visit(model, "")
    stage_model = copy.deepcopy(model, memo)
    for fqn in lists_to_convert:
        parent_name, _, attr = fqn.rpartition(".")
        parent = stage_model.get_submodule(parent_name) if parent_name else stage_model
        old = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleDict({k: v for k, v in old._modules.items() if v is not None}))
    return stage_model


def _hf_layout(model: nn.Module) -> tuple[str, int, str]:
    """(fqn prefix of the decoder, number of layers, lm_head fqn) of an HF causal LM."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and getattr(inner, "layers", None) is not None:
        return "model.", len(inner.layers), "lm_head"
    if getattr(model, "layers", None) is not None:
        return "", len(model.layers), "lm_head"
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; pass "
        "distributed.pipeline.module_fqns_per_model_part explicitly"
    )


def stage_module_names(
    model: nn.Module,
    pp_size: int,
    pp_schedule: str,
    module_names_per_stage: list[list[str]] | None = None,
    layers_per_stage: int | None = None,
    round_to_pp_multiple: str | None = None,
    num_stages: int | None = None,
) -> list[list[str]]:
    """The checked module FQNs of every (virtual) stage; no process group needed.

    Generated for HF decoders (absent optional modules dropped; ``num_stages`` fixes
    the count, e.g. from a CSV schedule) or taken from ``module_names_per_stage``
    (every name must exist).

    Raises:
        ValueError: see :func:`calculate_virtual_stages`; unknown, doubly assigned or
            unassigned modules; a stage count that is not a multiple of ``pp_size``.
    """
    if module_names_per_stage is None:
        prefix, num_layers, lm_head_fqn = _hf_layout(model)
        if num_stages is None:
            single = is_single_stage_schedule(pp_schedule)
            num_stages, _ = calculate_virtual_stages(num_layers, layers_per_stage, pp_size, single, round_to_pp_multiple)
        generated = generate_hf_model_fqn_per_model_part(
            num_stages, num_layers, include_lm_head=True, fqn_prefix=prefix, lm_head_fqn=lm_head_fqn
        )
        names = _validate_assignment(model, generated, strict=False)
    else:
        names = _validate_assignment(model, [list(m) for m in module_names_per_stage], strict=True)
    if len(names) % pp_size:
        raise ValueError(
            f"{len(names)} stages in distributed.pipeline.module_fqns_per_model_part is not a multiple of "
            f"pp_size {pp_size}"
        )
    return names


def split_model_into_stages(
    model: nn.Module,
    pp_mesh,
    pp_axis_name: str,
    pp_schedule: str,
    device: torch.device,
    module_names_per_stage: list[list[str]] | None = None,
    layers_per_stage: int | None = None,
    patch_inner_model: bool = True,
    patch_causal_lm_model: bool = True,
    round_to_pp_multiple: str | None = None,
    pp_schedule_csv: str | None = None,
):
    """Split ``model`` into this rank's pipeline stages.

    Args:
        model: the full model (real weights or meta tensors).
        pp_mesh: the pipeline DeviceMesh (1-D, or a mesh with ``pp_axis_name``).
        pp_axis_name: name of the pipeline axis.
        pp_schedule: schedule name; decides stages per rank and loop/V placement.
        device: device for the stage models.
        module_names_per_stage: manual FQN lists, one per (virtual) stage; else generated.
        layers_per_stage: decoder layers per virtual stage (None: automatic).
        patch_inner_model / patch_causal_lm_model: install the tensor-returning
            forwards of ``hf_utils``.
        round_to_pp_multiple: ``"up"``/``"down"``/None, see :func:`calculate_virtual_stages`.
        pp_schedule_csv: a CSV schedule; its rows fix the stage count and which stages
            each rank holds.

    Returns:
        ``(stages, models)``: this rank's ``PipelineStage`` objects and their modules.

    Raises:
        ValueError: impossible split (see :func:`calculate_virtual_stages`), modules named
            twice or never.
    """
    from ._torch_compat import NemoPipelineStage
    from .hf_utils import patch_hf_model_for_pp

    mesh = pp_mesh[pp_axis_name] if pp_mesh.mesh_dim_names and pp_axis_name in pp_mesh.mesh_dim_names and pp_mesh.ndim > 1 else pp_mesh
    pp_rank, pp_size = mesh.get_local_rank(), mesh.size()
    name = canonical_schedule_name(pp_schedule)
    csv_ids = None
    if pp_schedule_csv:
        from .schedules import csv_stage_ids, read_schedule_csv

        csv_ids = csv_stage_ids(read_schedule_csv(pp_schedule_csv))
    module_names_per_stage = stage_module_names(
        model, pp_size, name, module_names_per_stage, layers_per_stage, round_to_pp_multiple,
        num_stages=1 + max(max(ids) for ids in csv_ids) if csv_ids else None,
    )
    num_stages = len(module_names_per_stage)
    my_ids = csv_ids[pp_rank] if csv_ids else stage_ids_this_rank(pp_rank, pp_size, num_stages, schedule_style(name))

    stages, models = [], []
    for stage_idx in my_ids:
        stage_model = copy_pruned(model, module_names_per_stage[stage_idx])
        if patch_inner_model or patch_causal_lm_model:
            patch_hf_model_for_pp(stage_model, patch_inner_model, patch_causal_lm_model)
        stage_model._pp_stage_index = stage_idx
        stage_model._pp_module_fqns = list(module_names_per_stage[stage_idx])
        if not any(p.is_meta for p in stage_model.parameters()):
            stage_model.to(device)
        stages.append(NemoPipelineStage(stage_model, stage_idx, num_stages, device, group=mesh.get_group()))
        models.append(stage_model)
    logger.info("pp_rank %d holds stages %s of %d", pp_rank, [s.stage_index for s in stages], num_stages)
    return stages, models
