"""NeMo AutoModel's ``hf_utils`` names: the Hugging Face stage forwards, the model check and
the multimodal module suffixes placed on the first stage.

The code lives in :mod:`nemo_pp.models.stage_forward` (how a Hugging Face model runs as a
stage is a fact about the model, which planning needs too); this module keeps the
reference's import path (``...distributed.pipelining.hf_utils.patch_hf_model_for_pp``).
"""

from nemo_pp.models.stage_forward import (  # noqa: F401  (NeMo's names)
    create_pipeline_forward_causal_lm,
    create_pipeline_forward_inner,
    make_stage_emit_tensor,
    patch_hf_model_for_pp,
    validate_hf_model_for_pipeline_support,
)
from nemo_pp.models.vlm import MULTIMODAL_SUFFIXES  # noqa: F401  (NeMo's name)

__all__ = [
    "MULTIMODAL_SUFFIXES",
    "create_pipeline_forward_causal_lm",
    "create_pipeline_forward_inner",
    "make_stage_emit_tensor",
    "patch_hf_model_for_pp",
    "validate_hf_model_for_pipeline_support",
]
