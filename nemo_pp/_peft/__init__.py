"""LoRA adapters on pipeline stages (NeMo AutoModel's ``peft:`` section and module path,
so ``_target_: nemo_automodel.components._peft.lora.PeftConfig`` works unchanged)."""

from nemo_pp._peft.lora import PeftConfig, apply_lora, lora_modules, matched_linear_modules

__all__ = ["PeftConfig", "apply_lora", "lora_modules", "matched_linear_modules"]
