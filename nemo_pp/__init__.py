"""nemo_pp: config-driven fine-tuning of Hugging Face causal LMs with pipeline parallelism."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import nemo_pp.config` does not pull in transformers.
    if name in ("NeMoAutoModelForCausalLM", "NeMoAutoModelForImageTextToText"):
        import nemo_pp.models

        return getattr(nemo_pp.models, name)
    raise AttributeError(f"module 'nemo_pp' has no attribute {name!r}")
