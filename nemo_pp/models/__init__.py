from nemo_pp.models.auto_model import NeMoAutoModelForCausalLM, check_model_path, resolve_dtype

__all__ = ["NeMoAutoModelForCausalLM", "check_model_path", "resolve_dtype"]
