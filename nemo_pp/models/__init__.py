from nemo_pp.models.auto_model import (
    NeMoAutoModelForCausalLM,
    NeMoAutoModelForImageTextToText,
    check_model_path,
    resolve_dtype,
)

__all__ = ["NeMoAutoModelForCausalLM", "NeMoAutoModelForImageTextToText", "check_model_path", "resolve_dtype"]
