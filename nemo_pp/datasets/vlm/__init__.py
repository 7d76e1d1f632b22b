"""Image + conversation data sets for vision-language models (NeMo AutoModel's
``datasets.vlm`` package): rows rendered by the model's processor, loss on assistant turns."""

from nemo_pp.datasets.vlm.collate_fns import VLMCollator  # noqa: F401
from nemo_pp.datasets.vlm.datasets import VLMChatDataset, make_vlm_dataset  # noqa: F401

__all__ = ["VLMChatDataset", "VLMCollator", "make_vlm_dataset"]
