"""Each training step's model FLOPs, achieved TFLOP/s and MFU (:mod:`nemo_pp.planning.throughput`)."""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_pp.models.moe import moe_layer_indices, router_spec
from nemo_pp.planning.throughput import device_peak_tflops, mfu, model_flops


class FlopsMeter:
    """Model FLOPs of a step's batches and what they make of its time.

    Args:
        config: the model's Hugging Face config.
        moe_layers: indices of its routed mixture-of-experts layers (active FLOPs).
        device / dtype: one rank's device and compute dtype (what the peak is for).
        world_size: ranks doing the step (the per-rank rate divides by it).
        peak_tflops: ``logging.peak_tflops`` (None: a known device's or the CPU probe's).
    """

    def __init__(self, config, moe_layers, device: torch.device, dtype: torch.dtype, world_size: int,
                 peak_tflops: float | None = None):
        self.config, self.moe_layers, self.world_size = config, list(moe_layers), world_size
        self.peak, self.peak_source = device_peak_tflops(device, dtype, peak_tflops)

    @classmethod
    def for_model(cls, model, device: torch.device, dtype: torch.dtype, world_size: int,
                  peak_tflops: float | None = None) -> "FlopsMeter":
        """The meter of ``model`` (its config; its routed MoE layers, by its router)."""
        spec = router_spec(model)
        return cls(model.config, moe_layer_indices(model, spec) if spec is not None else [], device, dtype,
                   world_size, peak_tflops)

    def describe(self) -> str:
        """The console line saying what MFU is measured against."""
        if self.peak is None:
            return f"MFU: not reported ({self.peak_source})"
        return f"MFU against {self.peak:.3f} TFLOP/s per rank ({self.peak_source})"

    def step_metrics(self, batches: Sequence[dict], tokens: int, seconds: float) -> dict:
        """``{"model_flops", "tflops" (all ranks), "tflops_per_rank", "mfu"}`` of one step.

        Args:
            batches: this rank's batches of the step (``input_ids: [B, S] int64``).
            tokens: input tokens of the step over all data-parallel ranks (padding included).
            seconds: the step's wall time.
        """
        local_tokens = sum(b["input_ids"].numel() for b in batches)
        local = sum(model_flops(self.config, *b["input_ids"].shape, moe_layers=self.moe_layers) for b in batches)
        # the other dp ranks' batches have other padded lengths: scaled by tokens (exact at dp 1)
        flops = local * tokens / max(local_tokens, 1)
        total, per_rank, utilisation = mfu(flops, seconds, self.world_size, self.peak)
        return {"model_flops": flops, "tflops": total, "tflops_per_rank": per_rank, "mfu": utilisation}

    def run_metrics(self, flops: float, seconds: float) -> dict:
        """``{"train_tflops_per_rank", "train_mfu"}`` over a run's steps (their summed model
        FLOPs and step seconds); empty before any step."""
        if seconds <= 0:
            return {}
        _, per_rank, utilisation = mfu(flops, seconds, self.world_size, self.peak)
        return {"train_tflops_per_rank": per_rank, "train_mfu": utilisation}

    @staticmethod
    def describe_run(summary: dict) -> str:
        """``", 41.0 GFLOP/s per rank (MFU 50.0%)"`` of a summary, or ``""``."""
        if summary.get("train_tflops_per_rank") is None:
            return ""
        mfu_text = f" (MFU {100 * summary['train_mfu']:.1f}%)" if summary.get("train_mfu") is not None else ""
        return f", {1000 * summary['train_tflops_per_rank']:.1f} GFLOP/s per rank{mfu_text}"
