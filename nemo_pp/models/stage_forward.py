"""Hugging Face specifics of pipelining: stage-friendly forwards and model validation.

After splitting, a stage's ``model.layers`` is an ``nn.ModuleDict`` keyed by the
ORIGINAL layer index and modules that live on other stages are ``None``. HF's own
``forward`` slices ``self.layers[:n]`` and returns ``ModelOutput`` objects, so stages
use the forwards below, which return plain tensors:

* first stage (has ``embed_tokens``): ``input_ids [mb, S] int64 -> hidden [mb, S, H]``
* middle stages: ``hidden [mb, S, H] -> hidden [mb, S, H]``
* last stage (has ``norm`` and ``lm_head``): ``hidden -> logits [mb, S, V]``
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Callable

import torch
from torch import nn

from nemo_pp.models.lm_head import HEAD_LOSS_ATTR, head_loss, scale_logits
from nemo_pp.models.module_tree import FINAL_NORM_NAMES, iter_decoder_layers, text_config
from nemo_pp.models.moe import check_router_aux_loss
from nemo_pp.models.vlm import patch_multimodal_model, vision_family

logger = logging.getLogger(__name__)

__all__ = [
    "create_pipeline_forward_inner",
    "create_pipeline_forward_causal_lm",
    "make_stage_emit_tensor",
    "patch_hf_model_for_pp",
    "validate_hf_model_for_pipeline_support",
]



def _build_mask_mapping(config, hidden: torch.Tensor, attention_mask, position_ids) -> dict:
    """Causal masks per attention type; only shape/dtype/device of ``hidden`` are read."""
    if isinstance(attention_mask, dict):  # already a causal_mask_mapping
        return attention_mask
    from transformers.masking_utils import create_causal_mask

    kwargs = dict(
        config=config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **_no_cache(create_causal_mask),
    )
    from transformers.masking_utils import create_sliding_window_causal_mask

    layer_types = getattr(config, "layer_types", None)
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        # no per-layer types but a window (Mistral): every layer attends within it
        return {"full_attention": create_sliding_window_causal_mask(**kwargs)}
    mapping = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in (layer_types or ()):
        mapping["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return mapping


@functools.cache
def _no_cache(fn: Callable) -> dict:
    """The keyword that gives ``fn`` no KV cache, by its signature: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); older releases
    know only ``past_key_values``. Neither where ``fn`` takes neither."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return {name: None}
    return {}


@functools.cache
def _takes_layer_type(rotary_class: type) -> bool:
    return "layer_type" in inspect.signature(rotary_class.forward).parameters


def _rotary_embeddings(rotary, hidden: torch.Tensor, position_ids: torch.Tensor, layer_types) -> dict | tuple | None:
    """``rotary(hidden, position_ids)``, or one per attention type where the rotary module
    takes a ``layer_type`` (Gemma 3: local and global layers use different bases)."""
    if rotary is None:
        return None
    if _takes_layer_type(type(rotary)):
        return {t: rotary(hidden, position_ids, t) for t in dict.fromkeys(layer_types or ("full_attention",))}
    return rotary(hidden, position_ids)


def create_pipeline_forward_inner(model_class_name: str = "AutoModel", sequence_shards: int = 1) -> Callable:
    """A ``forward`` for the decoder module (``model.model``) that works on any stage.

    The returned function is bound as ``decoder.forward`` with signature
    ``(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
    causal_mask_mapping=None, **kwargs) -> hidden [mb, S, H]``. On stages without
    ``embed_tokens`` a float tensor passed as ``input_ids`` is taken as hidden states
    (that is what the previous stage sends). ``norm`` runs only where it is present.

    ``sequence_shards``: under sequence parallelism a rank's hidden states are
    ``[mb, S / sequence_shards, H]``; positions, rotary embeddings and the causal mask are
    built for the whole ``S``.
    """

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        causal_mask_mapping: dict | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        # a training stage keeps no KV cache: what an unpatched HF wrapper passes for one
        # (``past_key_values``, transformers >= 5.24's ``cache``) is dropped
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError(f"{model_class_name} stage got neither input_ids nor inputs_embeds")
            if getattr(self, "embed_tokens", None) is not None and not input_ids.is_floating_point():
                inputs_embeds = self.embed_tokens(input_ids)
                # a family's own decoder scales its embeddings here (Granite: config.embedding_multiplier)
                multiplier = getattr(self.config, "embedding_multiplier", None)
                if multiplier not in (None, 1, 1.0):
                    inputs_embeds = inputs_embeds * multiplier
            elif input_ids.is_floating_point():
                inputs_embeds = input_ids
            else:
                raise ValueError(
                    "a stage without embed_tokens received integer token ids; only the first "
                    "stage may take input_ids"
                )
        hidden = inputs_embeds
        for key in _OUTPUT_FLAGS:  # a family's multimodal forward passes these on; layers take none
            kwargs.pop(key, None)
        # under sequence parallelism a rank holds S/tp positions; masks and rotary need all S
        whole = hidden if sequence_shards == 1 else hidden[:, :1].expand(-1, hidden.shape[1] * sequence_shards, -1)
        if position_ids is None:
            position_ids = torch.arange(whole.shape[1], device=hidden.device).unsqueeze(0)
        rope_positions, position_ids = _split_multimodal_positions(position_ids)
        if causal_mask_mapping is None:
            causal_mask_mapping = _build_mask_mapping(self.config, whole, attention_mask, position_ids)
        layer_types = getattr(self.config, "layer_types", None)
        rotary = _rotary_embeddings(getattr(self, "rotary_emb", None), whole, rope_positions, layer_types)
        for idx, layer in iter_decoder_layers(getattr(self, "layers", None)):
            attn_type = layer_types[idx] if layer_types else "full_attention"
            out = layer(
                hidden,
                attention_mask=causal_mask_mapping.get(attn_type, causal_mask_mapping["full_attention"]),
                position_embeddings=rotary[attn_type] if isinstance(rotary, dict) else rotary,
                position_ids=position_ids,
                use_cache=False,
                **_no_cache(type(layer).forward),
                **kwargs,
            )
            # transformers < 5 returns a tuple from decoder layers
            hidden = out[0] if isinstance(out, tuple) else out
        norm = _final_norm(self)
        if norm is not None:
            hidden = norm(hidden)
        return hidden

    return forward


#: keyword arguments of a Hugging Face forward that only choose what it returns
_OUTPUT_FLAGS = ("return_dict", "output_attentions", "output_hidden_states")


def _split_multimodal_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rotary positions, text positions)``: the same 2-D ``[mb, S]`` tensor twice for a
    text model; for Qwen2-VL's 3-D ``[3, mb, S]`` rotary positions, no text positions (the
    mask is causal over the sequence), and for ``[4, mb, S]`` the first row is the text
    positions (``Qwen2VLTextModel.forward``'s convention for packed rows)."""
    if position_ids.ndim != 3:
        return position_ids, position_ids
    if position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    return position_ids, None


def _final_norm(decoder: nn.Module) -> nn.Module | None:
    return next((m for m in (getattr(decoder, n, None) for n in FINAL_NORM_NAMES) if m is not None), None)


def create_pipeline_forward_causal_lm() -> Callable:
    """A ``forward`` for the ``...ForCausalLM`` wrapper that returns a tensor.

    Returns logits ``[mb, S, V]`` (or the last ``logits_to_keep`` positions) where
    ``lm_head`` is present, otherwise the hidden states ``[mb, S, H]`` to send on. A last
    stage with a hidden-states loss installed (:mod:`nemo_pp.models.head_loss`) returns
    that loss ``[1]`` fp32 of ``labels: [mb, S] int64`` instead of logits, whenever
    ``labels`` are given; stages without ``lm_head`` ignore ``labels``.
    """

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        inner = getattr(self, "model", None)
        if inner is not None:
            hidden = _as_tensor(inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            ))
        else:
            hidden = inputs_embeds if inputs_embeds is not None else input_ids
        if getattr(self, "lm_head", None) is None:
            return hidden
        if labels is not None and getattr(self, HEAD_LOSS_ATTR, None) is not None:
            return head_loss(self, hidden, labels)
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:, :]
        else:
            hidden = hidden[:, logits_to_keep, :]
        return scale_logits(self.lm_head(hidden), self.config)

    return forward


@functools.cache
def _model_output_class() -> type:
    from transformers.utils import ModelOutput

    return ModelOutput


def _as_tensor(out):
    """The tensor a stage passes on: ``logits`` or ``last_hidden_state`` of a ``ModelOutput``;
    tensors and tuples unchanged."""
    if not isinstance(out, _model_output_class()):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key)
        if value is not None:
            return value
    raise TypeError(f"stage output {type(out).__name__} has neither logits nor last_hidden_state")


def make_stage_emit_tensor(stage_model: nn.Module) -> None:
    """Make a stage's ``forward`` return a tensor where it returns a ``ModelOutput``.

    torch's pipelining sends tensors between stages and reads ``.shape`` on each output:
    a ``CausalLMOutputWithPast`` becomes its ``.logits``, a ``BaseModelOutput`` its
    ``.last_hidden_state``. Tensors and tuples pass unchanged. Idempotent.
    """
    original = stage_model.forward
    if getattr(original, "_nemo_pp_emits_tensor", False):
        return

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return _as_tensor(original(*args, **kwargs))

    forward._nemo_pp_emits_tensor = True
    stage_model.forward = forward


def _return_model_output(decoder: nn.Module) -> None:
    """Wrap a patched decoder forward so it returns ``BaseModelOutputWithPast``, which an
    unpatched HF ``...ForCausalLM.forward`` reads as ``outputs.last_hidden_state``."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    tensor_forward = decoder.forward

    def forward(*args, **kwargs):
        return BaseModelOutputWithPast(last_hidden_state=tensor_forward(*args, **kwargs))

    decoder.forward = forward


def patch_hf_model_for_pp(model: nn.Module, patch_inner_model: bool = True, patch_causal_lm_model: bool = True,
                          sequence_shards: int = 1) -> None:
    """Make a (pruned) stage of an HF causal LM runnable; instance-level, in place.

    * ``patch_inner_model``: the decoder (``model.model``, else the module itself) gets
      :func:`create_pipeline_forward_inner`.
    * ``patch_causal_lm_model``: the ``...ForCausalLM`` wrapper gets
      :func:`create_pipeline_forward_causal_lm`, which also accepts an unpatched
      decoder's ``ModelOutput``.
    * ``sequence_shards``: the tp size under sequence parallelism, else 1
      (see :func:`create_pipeline_forward_inner`).
    * inner patched, wrapper NOT patched: the stage that holds ``lm_head`` keeps the
      model's own causal-LM forward (so family-specific steps there, such as logit
      soft-capping, run), fed a ``ModelOutput`` by the patched decoder; stages without
      ``lm_head`` have nothing of the wrapper to run and pass hidden states on.
    """
    if patch_inner_model and patch_multimodal_model(
            model, lambda name: create_pipeline_forward_inner(name, sequence_shards), _return_model_output):
        if patch_causal_lm_model or getattr(model, "lm_head", None) is None:
            model.forward = types.MethodType(create_pipeline_forward_causal_lm(), model)
        return
    # A wrapper stays a wrapper when pruning removed its decoder (a stage of lm_head alone).
    is_wrapper = "model" in model._modules
    inner = model._modules.get("model")
    if patch_inner_model and (inner is not None or not is_wrapper):
        target = inner if is_wrapper else model
        target.forward = types.MethodType(create_pipeline_forward_inner(type(target).__name__, sequence_shards), target)
    if not is_wrapper:
        return
    if patch_causal_lm_model or getattr(model, "lm_head", None) is None or inner is None:
        model.forward = types.MethodType(create_pipeline_forward_causal_lm(), model)
    elif patch_inner_model:
        _return_model_output(inner)


def validate_hf_model_for_pipeline_support(
    model: nn.Module, patch_inner_model: bool = True, patch_causal_lm_model: bool = True, num_stages: int = 2
) -> None:
    """Raise ``ValueError`` when the patched forwards cannot run ``model``'s stages.

    Unlike NeMo AutoModel, tied word embeddings are SUPPORTED (see
    ``nemo_pp.distributed.pipelining.tied``). Refused, naming the key to change: an
    encoder-decoder model; a model that is not a transformers ``PreTrainedModel`` with its
    decoder layers at ``model.layers`` (Llama-style) while a patch flag is on; with
    more than one stage, an unpatched HF decoder (``patch_inner_model: false``), whose own
    forward cannot run a pruned stage (it slices ``self.layers``); and an MoE model whose
    config asks for the router's load-balancing loss (``output_router_logits``) where the
    family has no recorded router or no loss (:func:`nemo_pp.models.moe.check_router_aux_loss`). Family-specific steps read from config fields (embedding
    multiplier, logit scaling and soft-capping, sliding windows, per-type rotary) are
    applied; the families proven are listed in ``tests/distributed/test_family_matrix.py``.
    """

    if not (patch_inner_model or patch_causal_lm_model):
        return
    key = "distributed.pipeline.patch_inner_model / patch_causal_lm_model"
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; pipelining supports decoder-only causal LMs")
    if config is not None and (family := vision_family(config)) is not None:
        _validate_vision_language(model, family, patch_inner_model)
    else:
        _validate_decoder(model, patch_inner_model, num_stages, key)
    if getattr(text_config(config), "output_router_logits", False):
        check_router_aux_loss(model)


def _validate_decoder(model: nn.Module, patch_inner_model: bool, num_stages: int, key: str) -> None:
    from transformers import PreTrainedModel

    inner = getattr(model, "model", model)
    if not isinstance(model, PreTrainedModel) or getattr(inner, "layers", None) is None:
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face decoder with its layers at 'model.layers', which the "
            f"patched stage forwards need; set {key} to false and give the model a stage-friendly forward "
            "(see examples/custom_model_pipeline.py)"
        )
    if num_stages > 1 and not patch_inner_model and isinstance(inner, PreTrainedModel):
        raise ValueError(
            f"distributed.pipeline.patch_inner_model: false keeps {type(inner).__name__}'s own forward, which cannot "
            f"run a stage of a {num_stages}-stage split (it slices self.layers); set it to true"
        )


def _validate_vision_language(model: nn.Module, family, patch_inner_model: bool) -> None:
    """A vision-language model's stages run the family's own multimodal forward on the
    first stage (:mod:`nemo_pp.models.vlm`); it needs the patched decoder."""
    inner = model._modules.get("model")
    if inner is None or getattr(getattr(inner, family.language_model, None), "layers", None) is None:
        raise ValueError(
            f"{type(model).__name__} ({family.name}) has no decoder layers at 'model.{family.language_model}.layers'; "
            "its transformers version lays the model out differently from the one nemo_pp supports"
        )
    if not patch_inner_model:
        raise ValueError(
            f"distributed.pipeline.patch_inner_model: false is not supported for {family.name}: its stages need "
            "nemo_pp's stage forwards of the multimodal model and the decoder; set it to true"
        )
