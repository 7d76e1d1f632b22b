"""Vision-language models as pipeline stages: which families, how their images travel,
and the forward of the multimodal model on each stage.

A Hugging Face vision-language model (``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
``Idefics3ForConditionalGeneration``, ...) is ``lm_head`` over a multimodal model
(``model``) that holds the vision encoder and projector beside a plain decoder
(``model.language_model`` or ``model.text_model``). Under the pipeline:

* the first stage holds the encoders with the token embedding; its forward is the
  family's own multimodal forward (``type(model.model).forward``): image features,
  merged at the image-token positions by the family's own code, then this stage's
  decoder layers (the decoder gets :func:`nemo_pp.models.stage_forward.create_pipeline_forward_inner`);
* later stages run their decoder layers on the hidden states they receive; images never
  reach them and nothing image-shaped crosses a stage boundary;
* the per-microbatch split of images is torch's split along the batch axis: every image
  tensor of a batch is **batch-major** (``pixel_values: [B, I, C, H, W]`` or, for
  per-patch families, ``[B, P, D]``, zero-padded, with ``num_images: [B] int64``); the
  first stage flattens its microbatch back to the family's layout (:func:`unbatch_images`).
  Qwen2-VL's 3-D rotary position ids ``[3, B, S]`` are computed for the whole batch on
  every rank (:func:`multimodal_position_ids`) and split along axis 1.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MULTIMODAL_SUFFIXES",
    "VisionLanguageFamily",
    "batch_images",
    "create_pipeline_forward_multimodal",
    "is_vision_language",
    "multimodal_position_ids",
    "pipeline_inputs",
    "unbatch_images",
    "vision_family",
]

#: Module names (the last FQN component) of multimodal encoders and projectors: these go
#: on the first stage with the token embedding (NeMo AutoModel's ``hf_utils.MULTIMODAL_SUFFIXES``).
MULTIMODAL_SUFFIXES = (
    "vision_tower",
    "visual",
    "vision_model",
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
    "connector",
)

#: the batch keys that hold images or their metadata (batch-major, first stage only)
IMAGE_KEYS = ("pixel_values", "num_images", "image_grid_thw", "pixel_attention_mask")


@dataclass(frozen=True)
class VisionLanguageFamily:
    """How one family of vision-language models runs under the pipeline.

    Attributes:
        name: the family, as errors name it.
        language_model: the decoder's attribute on the multimodal model.
        per_patch: ``pixel_values`` rows are patches (Qwen2-VL: ``[patches, C*T*P*P]``,
            with ``image_grid_thw: [images, 3]``), not whole images.
        image_meta: per-image tensors besides ``pixel_values`` (``image_grid_thw``,
            ``pixel_attention_mask``).
        mrope: 3-D multimodal rotary positions (``get_rope_index``), needed on every stage.
        image_block_mask: image tokens attend to their whole image (Gemma 3's
            ``token_type_ids``): the mask every stage must build alike.
    """

    name: str
    language_model: str
    per_patch: bool = False
    image_meta: tuple[str, ...] = ()
    mrope: bool = False
    image_block_mask: bool = False


# the encoders' placement on the first stage comes from the module tree (MULTIMODAL_SUFFIXES)
_LLAVA = VisionLanguageFamily("LLaVA", "language_model")
_QWEN2_VL = VisionLanguageFamily("Qwen2-VL", "language_model", per_patch=True, image_meta=("image_grid_thw",),
                                 mrope=True)
_GEMMA3 = VisionLanguageFamily("Gemma 3", "language_model", image_block_mask=True)
_IDEFICS3 = VisionLanguageFamily("Idefics3 / SmolVLM", "text_model", image_meta=("pixel_attention_mask",))

#: config ``model_type`` -> family, for the families proven in tests/distributed/test_vlm.py
FAMILIES = {
    "llava": _LLAVA,
    "qwen2_vl": _QWEN2_VL,
    "gemma3": _GEMMA3,
    "idefics3": _IDEFICS3,
}

#: the language models' ``model_type`` of the families above, as proven (their text configs)
PROVEN_TEXT_MODEL_TYPES = frozenset({"llama", "qwen2_vl_text", "gemma3_text"})


def is_vision_language(config) -> bool:
    """True for a multimodal config (one with a ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None


def vision_family(config) -> VisionLanguageFamily | None:
    """The family of a vision-language ``config``; None for a text-only one.

    Raises:
        ValueError: a vision-language model whose family nemo_pp has not proven under the
            pipeline, naming it and the supported ones.
    """
    if not is_vision_language(config):
        return None
    model_type = getattr(config, "model_type", type(config).__name__)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"model.pretrained_model_name_or_path: '{model_type}' is a vision-language model whose stage "
            f"forward nemo_pp has not proven equal to the unsplit model; supported: {sorted(FAMILIES)}"
        )
    return family


def multimodal_model(model: nn.Module) -> nn.Module | None:
    """The multimodal model (``model.model``) of a vision-language model or stage, else None."""
    inner = model._modules.get("model")
    config = getattr(model, "config", None)
    if inner is None or config is None or not is_vision_language(config):
        return None
    return inner


# ------------------------------------------------------------------ images per microbatch
def _image_token_id(config) -> int | None:
    return getattr(config, "image_token_id", getattr(config, "image_token_index", None))


def batch_images(family: VisionLanguageFamily, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Batch-major image tensors of ``samples`` (each a processor's output for one sample).

    Args:
        family: the model's family.
        samples: per sample ``{"pixel_values": [I_b, ...] or [P_b, D], "image_grid_thw": [I_b, 3], ...}``;
            a sample without images has no ``pixel_values`` (or an empty one).

    Returns:
        ``{"pixel_values": [B, I, ...] (per image) or [B, P, D] (per patch), zero-padded;
        "num_images": [B] int64; each of ``family.image_meta``: [B, I, ...] zero-padded}``;
        ``{}`` when no sample has an image.
    """
    pixels = [s.get("pixel_values") for s in samples]
    counts = [0 if p is None else _images_in(family, s) for p, s in zip(pixels, samples)]
    if not any(counts):
        return {}
    ref = next(p for p in pixels if p is not None and p.shape[0])
    out = {"num_images": torch.tensor(counts, dtype=torch.int64),
           "pixel_values": _pad_stack([p if p is not None else ref[:0] for p in pixels])}
    for key in family.image_meta:
        metas = [s.get(key) for s in samples]
        like = next(m for m in metas if m is not None)
        out[key] = _pad_stack([m if m is not None else like[:0] for m in metas])
    return out


def _images_in(family: VisionLanguageFamily, sample: dict) -> int:
    if family.per_patch:
        return int(sample["image_grid_thw"].shape[0])
    return int(sample["pixel_values"].shape[0])


def _pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """``[B, max_len, ...]`` of rows ``[len_b, ...]``, zero-padded along their first axis."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def unbatch_images(family: VisionLanguageFamily, num_images: torch.Tensor | None,
                   pixel_values: torch.Tensor | None, **meta: torch.Tensor) -> dict:
    """The family's own image arguments for one microbatch of batch-major tensors
    (the inverse of :func:`batch_images`): images in sample order, padding dropped.

    Args:
        num_images: ``[mb] int64``; pixel_values: ``[mb, I, ...]`` or ``[mb, P, D]``;
        meta: ``image_grid_thw: [mb, I, 3]`` / ``pixel_attention_mask: [mb, I, H, W]``.

    Returns:
        ``{"pixel_values": [N, ...] (Idefics3: [1, N, ...]), ...meta flattened}``, or ``{}``
        when the microbatch holds no image.
    """
    if pixel_values is None or num_images is None or int(num_images.sum()) == 0:
        return {}
    counts = num_images.tolist()
    out = {key: _unpad(meta[key], counts) for key in family.image_meta}
    if family.per_patch:  # a sample's rows are its images' patches: t * h * w per image
        grids = meta["image_grid_thw"]
        counts = [int(grids[b, :n].prod(-1).sum()) for b, n in enumerate(counts)]
    out["pixel_values"] = _unpad(pixel_values, counts)
    if family is _IDEFICS3:  # Idefics3 takes [batch, images, C, H, W] and drops all-zero images itself
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    return out


def _unpad(rows: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The first ``lengths[b]`` entries of each row ``b`` of ``[B, L, ...]``, concatenated."""
    return torch.cat([rows[b, :n] for b, n in enumerate(lengths)])


def multimodal_position_ids(model: nn.Module, batch: dict) -> torch.Tensor | None:
    """Qwen2-VL's 3-D rotary positions ``[3, B, S] int64`` of a whole batch, by the family's
    own ``get_rope_index`` (it reads only the config, so any stage's copy computes it);
    None for families without them.

    Args:
        model: the model or any of its stages.
        batch: ``input_ids: [B, S] int64`` and the batch-major image tensors.
    """
    inner = multimodal_model(model)
    if inner is None:
        return None
    family = vision_family(model.config)
    if not family.mrope:
        return None
    ids = batch["input_ids"]
    image_token = _image_token_id(model.config)
    token_types = (ids == image_token).to(torch.int32)
    counts = batch.get("num_images")
    if counts is None or int(counts.sum()) == 0:
        return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1).contiguous()
    grid = _unpad(batch["image_grid_thw"], counts.tolist())
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=token_types, image_grid_thw=grid)
    return positions


def pipeline_inputs(model: nn.Module, batch: dict, has_first_stage: bool,
                    device: torch.device) -> tuple[dict, dict[str, int]]:
    """The schedule keyword arguments a vision-language batch adds, and their split axes.

    Image tensors go only to a rank holding the first stage; Qwen2-VL's 3-D positions go
    to every rank (every stage applies the rotary embedding), split along axis 1
    (``[3, B, S]``'s batch axis); Gemma 3's ``token_type_ids`` go to every rank (each stage
    builds the image-block mask).

    Returns:
        ``(kwargs, chunk_dims)``: ``chunk_dims`` maps a kwarg to its batch axis where it is not 0.
    """
    config = getattr(model, "config", None)
    family = vision_family(config) if config is not None else None
    if family is None:
        return {}, {}
    kwargs: dict[str, torch.Tensor] = {}
    if has_first_stage:
        kwargs.update({k: batch[k].to(device) for k in IMAGE_KEYS if k in batch})
    if family.mrope:
        kwargs["position_ids"] = multimodal_position_ids(model, batch).to(device)
    if family.image_block_mask and "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"].to(device)
    return kwargs, ({"position_ids": 1} if family.mrope else {})


# ------------------------------------------------------------------ the stage forward
def _image_block_masks(config, hidden: torch.Tensor, position_ids, token_type_ids) -> dict | None:
    """Gemma 3's masks: causal, with the tokens of each image attending to that whole image
    (the family's own ``create_masks_for_vision_model``); None without ``token_type_ids``."""
    if token_type_ids is None:
        return None
    from transformers.models.gemma3 import modeling_gemma3 as gemma3

    blocks = gemma3.get_block_sequence_ids_for_mask(token_type_ids, device=hidden.device)
    return gemma3.create_masks_for_vision_model(config=config.get_text_config(), inputs_embeds=hidden,
                                                attention_mask=None, cache=None, position_ids=position_ids,
                                                block_sequence_ids=blocks)


def create_pipeline_forward_multimodal(family: VisionLanguageFamily):
    """A ``forward`` for the multimodal model (``model.model``) that works on any stage.

    Signature ``(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
    num_images=None, pixel_values=None, token_type_ids=None, **image_meta) -> ModelOutput``
    whose ``last_hidden_state`` is ``[mb, S, H]``. On the stage with the token embedding,
    ``input_ids: [mb, S] int64`` and the microbatch's batch-major images run the family's own
    forward (encoders, projector, merge at the image tokens); elsewhere ``input_ids`` are the
    hidden states ``[mb, S, H]`` received, and image arguments are ignored.
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                num_images=None, pixel_values=None, token_type_ids=None, cache=None, past_key_values=None,
                use_cache=None, **kwargs):
        meta = {k: kwargs.pop(k) for k in family.image_meta if k in kwargs}
        language_model = getattr(self, family.language_model)
        first = (getattr(language_model, "embed_tokens", None) is not None and input_ids is not None
                 and not input_ids.is_floating_point())
        if first:
            images = unbatch_images(family, num_images, pixel_values, **meta)
            if family.image_block_mask:  # the family's forward builds the image-block mask itself
                kwargs["token_type_ids"] = token_type_ids
            return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False, **images, **kwargs)
        hidden = inputs_embeds if inputs_embeds is not None else input_ids
        if family.image_block_mask:
            masks = _image_block_masks(self.config, hidden, position_ids, token_type_ids)
            attention_mask = masks if masks is not None else attention_mask
        return language_model(input_ids=hidden, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    return forward


def patch_multimodal_model(model: nn.Module, inner_forward, return_model_output) -> bool:
    """Install the stage forwards on a vision-language model or stage, in place: the
    decoder gets ``inner_forward`` (wrapped by ``return_model_output`` so the family's own
    multimodal forward reads a ``ModelOutput``), the multimodal model
    :func:`create_pipeline_forward_multimodal`. Returns False (nothing done) for a text-only model."""
    inner = multimodal_model(model)
    if inner is None:
        return False
    family = vision_family(model.config)
    decoder = getattr(inner, family.language_model, None)
    if decoder is not None:
        decoder.forward = types.MethodType(inner_forward(type(decoder).__name__), decoder)
        return_model_output(decoder)
    inner.forward = types.MethodType(create_pipeline_forward_multimodal(family), inner)
    return True
