"""A model's tensor-parallel plan as strings, and whether ``tp`` can split its shapes.

transformers ships one plan per family as ``config.base_model_tp_plan``
(``{"layers.*.self_attn.q_proj": "colwise", ...}``, Megatron-LM's split; Shoeybi et al.,
2019). This module reads it (or nemo_pp's Llama-style default) and checks it before any
work; :mod:`nemo_pp.distributed.tensor_parallel` maps the strings to torch's styles.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from nemo_pp.models.module_tree import text_config

__all__ = ["DEFAULT_LAYER_PLAN", "TP_STYLE_NAMES", "check_tensor_parallel", "layer_tp_plan"]

#: the plan strings nemo_pp maps to torch styles (``tensor_parallel.STYLES``)
TP_STYLE_NAMES = ("colwise", "rowwise", "colwise_gather_output", "rowwise_split_input", "replicated_with_grad_allreduce")

#: nemo_pp's plan where a model ships none: the Llama names most HF decoders share.
DEFAULT_LAYER_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


def layer_tp_plan(model: nn.Module, expert_parallel: bool = False) -> dict[str, str]:
    """The decoder's plan (patterns relative to the base model, e.g. ``layers.*.mlp.up_proj``):
    the model's ``base_model_tp_plan``, else :data:`DEFAULT_LAYER_PLAN` when the model has
    those modules. With ``expert_parallel`` the entries of a mixture of experts' experts
    (``layers.*.mlp.experts...``) are left out: expert parallelism shards those, tp only
    the attention (and any dense MLP).

    Raises:
        ValueError: no plan fits the model, or the plan uses a style nemo_pp does not map
            (the model type and the entry are named).
    """
    config = text_config(model.config)
    kind = getattr(config, "model_type", type(model).__name__)
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if expert_parallel:
        plan = {k: v for k, v in plan.items() if "experts" not in k.split(".")}
    if not plan:
        names = {name.split(".", 1)[1] if "." in name else name for name, _ in model.named_modules()}
        if any(fnmatch.fnmatch(n, pat) for n in names for pat in DEFAULT_LAYER_PLAN):
            plan = dict(DEFAULT_LAYER_PLAN)
        else:
            raise ValueError(
                f"distributed.tp_size > 1: model type '{kind}' ships no tensor-parallel plan (base_model_tp_plan) and "
                "has none of the Llama-style projections nemo_pp's plan shards; set distributed.tp_size: 1"
            )
    unknown = {k: v for k, v in plan.items() if v not in TP_STYLE_NAMES}
    if unknown:
        key, style = next(iter(unknown.items()))
        raise ValueError(
            f"distributed.tp_size > 1: model type '{kind}' asks for '{style}' at {key}, a tensor-parallel style "
            f"nemo_pp does not implement (it maps {', '.join(TP_STYLE_NAMES)}); set distributed.tp_size: 1"
        )
    return plan


def check_tensor_parallel(model: nn.Module, tp: int, ep: int = 1) -> None:
    """Refuse a ``tp`` the model's shapes cannot split evenly, naming the config field
    (``ep`` > 1: the experts are expert-parallel, :func:`layer_tp_plan`'s ``expert_parallel``).

    Raises:
        ValueError: heads, kv heads, hidden, intermediate or vocabulary size not divisible
            by ``tp``, or no usable plan (:func:`layer_tp_plan`).
    """
    if tp == 1:
        return
    config = text_config(model.config)
    for field in ("num_key_value_heads", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size"):
        value = getattr(config, field, None)
        if value is not None and value % tp:
            divisors = [d for d in range(2, value + 1) if value % d == 0][:6]
            raise ValueError(
                f"distributed.tp_size={tp} does not divide the model's {field}={value}; use a tp_size that "
                f"divides it (e.g. {', '.join(map(str, divisors))}) or distributed.tp_size: 1"
            )
    layer_tp_plan(model, expert_parallel=ep > 1)


