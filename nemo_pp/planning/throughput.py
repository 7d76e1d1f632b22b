"""Achieved model FLOP/s and model FLOPs utilisation (MFU) of a run.

Model FLOPs are the cost model's (:func:`nemo_pp.planning.cost.flop_costs`: forward +
backward of every decoder layer at its active expert FLOPs, and of the output projection;
the embedding lookup counts none), with no recomputation counted: activation
checkpointing and the fused loss's logit recomputation are work the hardware does
beyond the model's, which is why MFU, as defined by Chowdhery et al. ("PaLM", 2022,
appendix B), leaves them out. MFU is achieved model FLOP/s over the peak of the devices
doing it.

The peak is, in order: the ``logging.peak_tflops`` a user gives; the dense peak of a known
accelerator by its device name and compute dtype (:data:`PEAK_TFLOPS`, from the vendors'
data sheets); on a CPU, the rate of a square GEMM measured at the run's thread count
(:func:`measure_gemm_tflops`), since CPU data sheets do not state one.
"""

from __future__ import annotations

import time

import torch

from nemo_pp.planning.cost import flop_costs

__all__ = ["PEAK_TFLOPS", "device_peak_tflops", "measure_gemm_shape_tflops", "measure_gemm_tflops", "model_flops", "mfu"]

#: dense (no 2:4 sparsity) peak TFLOP/s by device-name fragment and compute dtype, from
#: NVIDIA's data sheets (H100/H200 SXM, A100 SXM, B200, L40S; "fp32" is the non-tensor-core
#: rate; with TF32 allowed torch's fp32 matmuls reach the "tf32" row)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def model_flops(config, batch_size: int, seq_len: int, moe_layers=()) -> float:
    """Model FLOPs of one forward + backward over ``batch_size`` samples of ``seq_len``
    tokens (the cost model's pieces summed; no recomputation).

    Args:
        config: a Hugging Face decoder config (or one with a ``text_config``).
        batch_size: samples (b); seq_len: tokens per sample (s), padding included.
        moe_layers: indices of the routed mixture-of-experts layers.
    """
    costs = flop_costs(config, batch_size, seq_len, moe_layers=moe_layers)
    return sum(costs.layers) + costs.head + costs.embedding


def measure_gemm_tflops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                        device: torch.device | str = "cpu") -> float:
    """TFLOP/s of a ``[size, size] @ [size, size]`` matrix product (``2 size^3`` FLOPs), the
    best of ``repeats`` after a warm-up, at the current ``torch.get_num_threads()``: on a CPU
    the practical peak training GEMMs reach (about 0.1 s at 1024 on one core here).
    """
    return measure_gemm_shape_tflops(size, size, size, dtype, repeats, device)


def measure_gemm_shape_tflops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 5,
                              device: torch.device | str = "cpu") -> float:
    """TFLOP/s of one ``[m, k] @ [k, n]`` matrix product (``2 m k n`` FLOPs), the best of
    ``repeats`` after a warm-up, at the current thread count."""
    device = torch.device(device)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e12


def device_peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float | None, str]:
    """``(peak TFLOP/s of one device, where it came from)``: ``override``; the
    :data:`PEAK_TFLOPS` row of a CUDA device's name (``fp32`` read as ``tf32`` where torch
    allows TF32 matmuls); a GEMM probe on a CPU; ``(None, reason)`` for an unknown accelerator
    (MFU is then not reported; give ``logging.peak_tflops``).
    """
    if override is not None:
        return float(override), "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = _DTYPE_NAMES.get(dtype, "fp32")
        if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        for fragment, peaks in PEAK_TFLOPS.items():
            if fragment in name:
                return peaks[key], f"{fragment} {key} data sheet"
        return None, f"no peak known for {name}: set logging.peak_tflops"
    if device.type == "cpu":
        return measure_gemm_tflops(dtype if dtype in _DTYPE_NAMES else torch.float32), (
            f"GEMM probe at {torch.get_num_threads()} threads")
    return None, f"no peak known for {device.type}: set logging.peak_tflops"


def mfu(flops: float, seconds: float, devices: int, peak_tflops: float | None) -> tuple[float, float, float | None]:
    """``(total TFLOP/s, TFLOP/s per device, MFU)`` of ``flops`` model FLOPs done by
    ``devices`` devices in ``seconds``; MFU None without a peak."""
    total = flops / seconds / 1e12
    per_device = total / devices
    return total, per_device, (per_device / peak_tflops if peak_tflops else None)
