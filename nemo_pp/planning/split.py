"""Stage arithmetic and module tables: stage ids, virtual stages, FQN lists, copy-and-prune.

A stage model is a copy of the whole model in which every module that belongs to
another stage is ``None`` and ``layers`` is an ``nn.ModuleDict`` keyed by the ORIGINAL
layer index, so parameter FQNs stay ``model.layers.<i>.…`` and checkpoints written
at one pp size load at another.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from nemo_pp.models.module_tree import find_layer_stack, is_tied, outer_modules, tied_param_fqns
from nemo_pp.models.vlm import MULTIMODAL_SUFFIXES, is_vision_language

#: Stage-0 modules of multimodal models (vision / audio towers and projectors).
MULTIMODAL_ENCODER_NAMES = MULTIMODAL_SUFFIXES


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


def layer_counts(num_layers: int, num_stages: int) -> list[int]:
    """Decoder layers per stage, spread evenly, the remainder to the earliest stages
    (30 layers over 4 stages: ``[8, 8, 7, 7]``).

    Raises:
        ValueError: fewer layers than stages, or a non-positive count.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages (each needs one)")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


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

    Stage 0 gets ``{prefix}embed_tokens`` (and the multimodal encoders of
    :data:`~nemo_pp.models.vlm.MULTIMODAL_SUFFIXES`, beside the decoder: ``model.vision_tower``
    for ``fqn_prefix="model.language_model."``; and ``extra_module_fqns``),
    the last stage ``{prefix}norm`` and ``lm_head_fqn``; every stage gets
    ``{prefix}rotary_emb`` when asked. 32 layers over 2 stages:
    ``[[embed_tokens, layers.0..15, rotary_emb], [layers.16..31, norm, lm_head, rotary_emb]]``.

    Raises:
        ValueError: fewer layers than stages, or a non-positive count.
    """
    out: list[list[str]] = []
    start = 0
    for stage, n in enumerate(layer_counts(num_layers, num_stages)):
        names: list[str] = []
        if stage == 0:
            if include_embeddings:
                names.append(f"{fqn_prefix}embed_tokens")
            if include_multimodal_encoders:
                names += [f"{_encoder_prefix(fqn_prefix)}{m}" for m in MULTIMODAL_ENCODER_NAMES]
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


def _encoder_prefix(fqn_prefix: str) -> str:
    """Where a multimodal model keeps its encoders: beside its decoder, so
    ``model.language_model.`` (or ``model.text_model.``) -> ``model.``; other prefixes unchanged."""
    for decoder in ("language_model.", "text_model."):
        if fqn_prefix.endswith(decoder):
            return fqn_prefix[: -len(decoder)]
    return fqn_prefix


#: Names the FQN generator lists that a given model may lack (dropped, not an error).
_OPTIONAL_MODULE_NAMES = frozenset(MULTIMODAL_ENCODER_NAMES) | {"rotary_emb"}



def auto_stage_module_names(model: nn.Module, num_stages: int, counts: Sequence[int] | None = None) -> list[list[str]]:
    """Module FQNs of every stage, read from the model's module tree.

    Stage k holds ``counts[k]`` consecutive layers (default :func:`layer_counts`, the
    uniform split). Every other module that owns parameters
    goes to the first stage when it is registered before the layer stack on the path
    to it (embeddings, vision towers) and to the last stage when registered after it
    (final norm, ``lm_head``, a custom ``output_proj``); parameterless modules (rotary
    embeddings) go to every stage. For a Llama model over 2 stages:
    ``[[model.embed_tokens, model.layers.0.., model.rotary_emb], [model.layers.., model.norm, lm_head,
    model.rotary_emb]]``, as :func:`generate_hf_model_fqn_per_model_part` gives.

    Raises:
        ValueError: no layer stack (see :func:`find_layer_stack`), fewer layers than stages.
    """
    stack_fqn, stack = find_layer_stack(model)
    first, last, everywhere = outer_modules(model)
    keys = list(stack._modules.keys())
    out, start = [], 0
    counts = list(counts) if counts is not None else layer_counts(len(keys), num_stages)
    if len(counts) != num_stages or sum(counts) != len(keys) or min(counts) < 1:
        raise ValueError(f"layer counts {counts} do not split {len(keys)} layers into {num_stages} stages")
    for stage, n in enumerate(counts):
        names = list(first) if stage == 0 else []
        names += [f"{stack_fqn}.{k}" for k in keys[start:start + n]]
        start += n
        if stage == num_stages - 1:
            names += last
        out.append(names + everywhere)
    return out



def validate_stage_modules(model: nn.Module, module_names_per_stage: list[list[str]]) -> list[list[str]]:
    """Check a per-stage module table against the model; return it without absent optional names.

    Names the FQN generator adds for models that may lack them (multimodal encoders,
    ``rotary_emb``) are dropped when absent; any other unknown name is an error, and so
    is a module with parameters on two stages or a parameter on none.

    Raises:
        ValueError: naming the module and ``distributed.pipeline.module_fqns_per_model_part``.
    """
    existing = {name for name, _ in model.named_modules() if name}
    cleaned = []
    for stage, names in enumerate(module_names_per_stage):
        missing = [n for n in names if n not in existing and n.rpartition(".")[2] not in _OPTIONAL_MODULE_NAMES]
        if missing:
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
                        "must live on exactly one stage (distributed.pipeline.module_fqns_per_model_part)"
                    )
                owner.setdefault(n, stage)
    multimodal = is_vision_language(getattr(model, "config", None))
    for n, stage in owner.items():
        if stage != 0 and multimodal and any(part in MULTIMODAL_SUFFIXES for part in n.split(".")):
            raise ValueError(
                f"distributed.pipeline.module_fqns_per_model_part[{stage}] holds '{n}', a multimodal encoder: encoders "
                "and projectors run with the token embedding on the first stage (their features are merged into the "
                "embeddings there); move it to module_fqns_per_model_part[0]"
            )
    stage_of = {f"{n}.{p}": stage for stage, names in enumerate(cleaned) for n in names
                for p, _ in model.get_submodule(n).named_parameters(remove_duplicate=False)}
    all_params = list(model.named_parameters(remove_duplicate=False))
    orphans = [name for name, _ in all_params if name not in stage_of]
    if orphans:
        holders = {name.rpartition(".")[0] or "<the model itself>" for name in orphans}
        kept = {n for names in cleaned for n in names}
        direct = sorted(h for h in holders if any(k.startswith(h + ".") for k in kept) or h == "<the model itself>")
        raise ValueError(
            f"parameters are in no pipeline stage: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}; "
            + (f"they belong directly to {direct}, which is split across stages: move them into a submodule"
               if direct else "add their modules to distributed.pipeline.module_fqns_per_model_part")
        )
    _check_shared_parameters(model, all_params, stage_of)
    return cleaned


def _check_shared_parameters(model: nn.Module, all_params, stage_of: dict[str, int]) -> None:
    """Refuse a parameter shared by modules of different stages, except the input/output
    embedding tie, which ``TiedEmbeddingSync`` keeps in step."""

    by_id: dict[int, list[str]] = {}
    for name, p in all_params:
        by_id.setdefault(id(p), []).append(name)
    allowed = set(tied_param_fqns(model)) if is_tied(model) else set()
    for names in by_id.values():
        stages = {stage_of[n] for n in names}
        if len(stages) > 1 and set(names) != allowed:
            raise ValueError(
                f"parameter shared by {names} would be copied to stages {sorted(stages)} and trained apart; keep "
                "its modules on one stage (distributed.pipeline.module_fqns_per_model_part), or, for an "
                "input/output embedding tie, expose it through get_input_embeddings/get_output_embeddings"
            )



