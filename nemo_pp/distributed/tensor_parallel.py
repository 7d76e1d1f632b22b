"""Tensor parallelism of one pipeline stage with torch's ``parallelize_module`` (DTensor).

The plan of a decoder layer comes from the model: transformers ships one per family as
``config.base_model_tp_plan`` (``{"layers.*.self_attn.q_proj": "colwise", ...}``, Megatron-LM's
split: q/k/v and gate/up column-wise, o/down row-wise; Shoeybi et al., 2019). Its
strings map to torch's styles (:data:`STYLES`). On top of it nemo_pp shards the input
embedding over the vocabulary (``RowwiseParallel``: each rank looks up its vocabulary
slice, the partial sums are all-reduced) and ``lm_head`` column-wise with the logits
gathered (``ColwiseParallel(output_layouts=Replicate())``), so any loss function sees
ordinary ``[B, S, V]`` logits.

Attention needs no change: HF reshapes q/k/v with ``view(..., -1, head_dim)``, so a rank
holding ``heads / tp`` heads computes them locally. Norms stay replicated; their inputs are
whole on every rank, so their gradients are equal everywhere.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from nemo_pp._peft.lora import ADAPTER_NAME
from nemo_pp.models.module_tree import is_tied, tied_param_fqns
from nemo_pp.models.tp_plan import TP_STYLE_NAMES, layer_tp_plan

__all__ = ["SEQUENCE_PARALLEL_PLAN", "STYLES", "tensor_parallelize"]

#: transformers' plan strings -> torch parallel styles (local tensors in and out).
STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    # a per-head norm after a column-wise projection (Qwen3's and Gemma 3's q_norm / k_norm): each
    # rank normalises its own heads with the whole weight, whose gradient is then a partial sum
    # over the tp ranks. SequenceParallel is that style: it replicates the weight and reads the
    # local input as a shard; dim 0 (batch) is named because it is never the normalised last dim,
    # whichever of heads or sequence comes first in the family's layout
    "replicated_with_grad_allreduce": lambda: SequenceParallel(sequence_dim=0, use_local_output=True),
}
assert set(STYLES) == set(TP_STYLE_NAMES)  # the model-side check accepts exactly what is mapped here


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or ""
    return f"{prefix}." if prefix and getattr(model, prefix, None) is not None else ""


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    try:  # a pipeline stage may have dropped the module, or the base model it lives in
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


#: Sequence parallelism (Korthikanti et al., 2022): what runs on [B, S/tp, H] shards.
#: Norms compute on their sequence shard; attention and MLP all-gather their input; the
#: row-wise projections reduce-scatter their output back to sequence shards.
SEQUENCE_PARALLEL_PLAN = {
    "layers.*.input_layernorm": lambda: SequenceParallel(),
    "layers.*.post_attention_layernorm": lambda: SequenceParallel(),
    "norm": lambda: SequenceParallel(),
    # HF's decoder layer calls self_attn(hidden_states=...) and mlp(hidden_states)
    "layers.*.self_attn": lambda: PrepareModuleInput(
        input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
    ),
    "layers.*.mlp": lambda: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
}


def _lora_plan(name: str, module: nn.Module, style: str, sp: bool) -> dict:
    """Styles for a LoRA-wrapped projection (``peft.tuners.lora.Linear``): the base layer
    as the plan says, the adapter so that ``B @ A @ x`` leaves each rank in the base
    output's layout.

    Column-wise (output features sharded): ``lora_A`` stays whole on every rank (under
    sequence parallelism its replicated DTensor input is made local) and ``lora_B`` is
    column-wise; ``lora_B``'s input conversion all-reduces the gradient flowing back into
    ``A``'s output, so ``A``'s gradient is whole and equal everywhere.
    Row-wise (input features sharded): ``lora_A`` is row-wise (its rank-r output
    all-reduced, or reduce-scattered to sequence shards under sequence parallelism) and
    ``lora_B`` whole; under sequence parallelism ``lora_B`` runs on sequence shards as a
    replicated DTensor, so its partial gradient is summed with the other replicated
    parameters' (``grads.align_grad_placements``).

    Raises:
        ValueError: a style other than colwise/rowwise (nemo_pp has no adapter plan for it).
    """
    a, b = f"{name}.lora_A.{ADAPTER_NAME}", f"{name}.lora_B.{ADAPTER_NAME}"
    if style == "colwise":
        plan = {f"{name}.base_layer": ColwiseParallel(), b: ColwiseParallel()}
        if sp:  # the attention/MLP input arrives as a replicated DTensor: A computes on its local copy
            plan[a] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
        return plan
    if style == "rowwise":
        seq_out = {"output_layouts": Shard(1)} if sp else {}
        plan = {f"{name}.base_layer": RowwiseParallel(**seq_out), a: RowwiseParallel(**seq_out)}
        if sp:
            plan[b] = SequenceParallel(use_local_output=True)
        return plan
    raise ValueError(f"peft with distributed.tp_size > 1: {name} is '{style}' in the model's plan, for which nemo_pp "
                     "has no adapter plan; exclude it with peft.exclude_modules or set distributed.tp_size: 1")


def tensor_parallelize(model: nn.Module, tp_mesh, sequence_parallel: bool = False,
                       expert_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a whole model or one pipeline stage) over the 1D ``tp_mesh``.

    Decoder projections follow :func:`layer_tp_plan`, the input embedding is vocab-parallel,
    ``lm_head`` column-wise with gathered logits. A tied embedding held by this stage
    stays one parameter (both styles shard the vocabulary dimension).

    With ``sequence_parallel`` the hidden states between layers and between pipeline
    stages are ``[B, S/tp, H]`` sequence shards (:data:`SEQUENCE_PARALLEL_PLAN`); the
    stage's forward and static shapes must then be built for ``tp`` sequence shards
    (``StageSpec.sequence_shards``, which the plan sets), so positions, the causal mask and
    the shapes use the whole length.

    With ``expert_parallel`` a mixture of experts' experts are left to expert parallelism
    (:func:`layer_tp_plan`): their input, the attention block's all-reduced output, is whole
    and equal on every tp rank, so each tp rank routes and dispatches the same tokens within
    its own ep group and their gradients come out equal.
    """
    tied = is_tied(model)
    tied_fqns = tied_param_fqns(model) if tied else None
    prefix = _base_prefix(model)
    sp = sequence_parallel
    seq_out = {"output_layouts": Shard(1)} if sp else {}
    plan = {}
    patterns = layer_tp_plan(model, expert_parallel)
    for name, module in model.named_modules():
        rel = name[len(prefix):] if prefix and name.startswith(prefix) else name
        style = next((s for pat, s in patterns.items() if fnmatch.fnmatchcase(rel, pat)), None)
        if style == "replicated_with_grad_allreduce":
            plan[name] = STYLES[style]()
        elif style is not None and isinstance(module, nn.Linear):
            plan[name] = RowwiseParallel(**seq_out) if sp and style == "rowwise" else STYLES[style]()
        elif style is not None and isinstance(getattr(module, "base_layer", None), nn.Linear):
            plan.update(_lora_plan(name, module, style, sp))
        if sp:
            sp_style = next((s for pat, s in SEQUENCE_PARALLEL_PLAN.items() if fnmatch.fnmatchcase(rel, pat)), None)
            if sp_style is not None:
                plan[name] = sp_style()
    emb, head = _embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings")
    names = {id(m): n for n, m in model.named_modules()}
    if emb is not None and id(emb) in names:
        plan[names[id(emb)]] = RowwiseParallel(input_layouts=Replicate(), **seq_out)
    if head is not None and id(head) in names:
        plan[names[id(head)]] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan)
    for n, p in model.named_parameters():  # SequenceParallel re-creates norm weights as trainable Parameters
        if n in frozen:
            p.requires_grad_(False)
    if tied:  # each style registered its own Parameter: make the head use the embedding's again
        embed_owner, _, embed_name = tied_fqns[0].rpartition(".")
        head_owner, _, head_name = tied_fqns[1].rpartition(".")
        setattr(model.get_submodule(head_owner), head_name, getattr(model.get_submodule(embed_owner), embed_name))
    return model
