"""Pipeline parallelism for Hugging Face causal LMs (``AutoPipeline`` and the functional API)."""

from nemo_pp.distributed.pipelining.autopipeline import AutoPipeline, PipelineInfo

__all__ = ["AutoPipeline", "PipelineInfo"]
