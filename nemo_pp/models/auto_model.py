"""``NeMoAutoModelForCausalLM``: NeMo AutoModel's model entry point, backed by transformers."""

from __future__ import annotations

import torch

from nemo_pp.models.loading import auto_model_class

#: every dtype spelling nemo_pp accepts (also with a ``torch.`` prefix), the one table
#: behind ``model.torch_dtype``, ``distributed.pipeline.dtype`` and ``distributed.mp_policy``
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype, key: str = "model.torch_dtype") -> torch.dtype | None:
    """``"bfloat16"``/``"torch.bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None/"auto" -> None.

    Raises:
        ValueError: an unknown dtype name, naming ``key`` and the valid names.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"{key}: unknown dtype '{dtype}'; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_model_path(path: str, key: str = "model.pretrained_model_name_or_path") -> None:
    """Raise FileNotFoundError (with the command that fetches the assets) for a missing local path."""
    from nemo_pp.assets import missing_asset_message, missing_local_path

    if missing_local_path(path):
        raise FileNotFoundError(f"{key}: {missing_asset_message(path)}")


#: from_pretrained kwargs that say where the files come from (also the config's)
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
#: from_pretrained kwargs that only steer how weights are read
_LOAD_ONLY_KWARGS = ("low_cpu_mem_usage", "device_map", "max_memory", "offload_folder", "offload_state_dict",
                     "use_safetensors", "weights_only", "key_mapping", "tp_plan")


class NeMoAutoModelForCausalLM:
    """Loads Hugging Face causal LMs (hub id or local folder) with a dtype default of float32.

    ``from_pretrained(pretrained_model_name_or_path, torch_dtype=None, **kwargs)`` accepts
    the NeMo spellings ``torch_dtype: bfloat16`` and passes everything else to
    ``transformers.AutoModelForCausalLM.from_pretrained`` (``AutoModelForImageTextToText``
    for a vision-language checkpoint: :func:`auto_model_class`).
    """

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str, *args, torch_dtype=None, dtype=None, load_weights: bool = True,
        gate_bias_update_factor: float | None = None, **kwargs
    ):
        """The model of a checkpoint folder or hub id.

        With ``load_weights=False`` no weight is read: parameters are on the meta device
        (see :func:`nemo_pp.models.loading.empty_model`) for a pipeline to materialise and
        load stage by stage (:class:`nemo_pp.models.loading.SafetensorsCheckpoint`).

        ``gate_bias_update_factor`` (NeMo AutoModel's MoE key; Hugging Face configs have no
        such field) is recorded on the config: the step of DeepSeek-V3's auxiliary-loss-free
        balancing of its routing bias (:meth:`nemo_pp.models.moe.RouterLoss.update_gate_bias`).
        """
        model = NeMoAutoModelForCausalLM._from_pretrained(pretrained_model_name_or_path, *args, torch_dtype=torch_dtype,
                                                          dtype=dtype, load_weights=load_weights, **kwargs)
        if gate_bias_update_factor is not None:
            model.config.gate_bias_update_factor = float(gate_bias_update_factor)
        return model

    @staticmethod
    def _from_pretrained(pretrained_model_name_or_path: str, *args, torch_dtype=None, dtype=None,
                         load_weights: bool = True, **kwargs):
        from transformers import AutoConfig

        check_model_path(pretrained_model_name_or_path)
        resolved = resolve_dtype(dtype if dtype is not None else torch_dtype) or torch.float32
        kwargs.setdefault("attn_implementation", "sdpa")
        if not load_weights:
            from nemo_pp.models.loading import empty_model

            hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
            for k in _LOAD_ONLY_KWARGS:  # they steer a weight load, which does not happen here
                kwargs.pop(k, None)
            attn = kwargs.pop("attn_implementation")
            # as from_pretrained does: kwargs naming config fields (output_router_logits,
            # router_aux_loss_coef, ...) update the config; the rest go to the model's constructor
            config, kwargs = AutoConfig.from_pretrained(pretrained_model_name_or_path, return_unused_kwargs=True,
                                                        **hub, **kwargs)
            model = empty_model(config, resolved, attn_implementation=attn, **kwargs)  # positional model_args only matter to a load
            model.name_or_path = str(pretrained_model_name_or_path)
            return model
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path,
                                            **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        return auto_model_class(config).from_pretrained(pretrained_model_name_or_path, *args, dtype=resolved, **kwargs)

    @staticmethod
    def from_config(config, *args, torch_dtype=None, dtype=None, **kwargs):
        """A randomly initialised model of ``config`` (a ``transformers`` config), through
        ``transformers.AutoModelForCausalLM.from_config``.

        Args:
            config: the model's ``PretrainedConfig``.
            torch_dtype / dtype: parameter dtype, a ``torch.dtype`` or a name of :data:`DTYPES`
                (``dtype`` wins when both are given); None or ``"auto"``: float32.
            *args / **kwargs: passed to ``from_config`` unchanged.

        Raises:
            ValueError: an unknown dtype name.
        """
        resolved = resolve_dtype(dtype if dtype is not None else torch_dtype) or torch.float32
        return auto_model_class(config).from_config(config, *args, dtype=resolved, **kwargs)


def loads_per_stage(model_node) -> bool:
    """True when config node ``model`` builds with :meth:`NeMoAutoModelForCausalLM.from_pretrained`
    (any spelling of its ``_target_``, NeMo AutoModel's included): then the recipe builds
    the model on the meta device and each rank loads only its own stages."""
    from nemo_pp.config.targets import node_target_object

    return node_target_object(model_node) in (NeMoAutoModelForCausalLM.from_pretrained,
                                              NeMoAutoModelForImageTextToText.from_pretrained)


class NeMoAutoModelForImageTextToText(NeMoAutoModelForCausalLM):
    """NeMo AutoModel's vision-language entry point: the same loader (the auto class follows
    the checkpoint's config), under the reference's name."""
