"""What the step-time model knows about an accelerator: peak, memory, links, GEMM efficiency.

A :class:`DeviceSpec` is either stated (:data:`KNOWN_DEVICES`, from vendors' data sheets,
for planning a cluster that is not here) or probed on the device at hand
(:func:`probe_device`: the CPU this runs on, or the CUDA device of this process). Nothing
here launches a process or needs a process group.

Sources of the stated numbers:

* dense bf16 / tf32 peaks: :data:`nemo_pp.planning.throughput.PEAK_TFLOPS` (NVIDIA's data
  sheets for H100/H200 SXM, A100 SXM, B200, L40S);
* HBM capacity and bandwidth: the same data sheets (H100 SXM 80 GB, 3.35 TB/s; H200 141 GB,
  4.8 TB/s; A100 SXM 80 GB, 2.0 TB/s; B200 180 GB, 8 TB/s; L40S 48 GB GDDR6, 864 GB/s);
* links, one direction per GPU: NVLink 4 (H100/H200) 900 GB/s bidirectional, so 450 GB/s
  (NVIDIA's Hopper architecture page); NVLink 3 (A100) 300 GB/s; NVLink 5 (B200) 900 GB/s;
  L40S has no NVLink (PCIe Gen4 x16, 32 GB/s). Between nodes one 400 Gb/s ConnectX-7 per
  GPU in a DGX H100 / H200 / B200 (NVIDIA DGX BasePOD reference architecture), 50 GB/s;
  200 Gb/s (25 GB/s) for DGX A100;
* GEMM efficiency of the GPUs (:data:`GPU_GEMM_EFFICIENCY`): a stated curve, not a
  measurement: the share of the dense peak cuBLAS reaches on a bf16 GEMM by its smallest
  dimension, rising until the GPU is full (NVIDIA, "Matrix Multiplication Background User's
  Guide": tile and wave quantisation) to about 80 % for large products;
* attention kernels: FlashAttention-2/3 reach 50-75 % of peak forward and less backward
  (Dao 2023; Shah et al. 2024): :attr:`DeviceSpec.attention_efficiency` is 0.45 for
  forward + backward;
* the CPU's links: gloo over loopback, measured on this machine (2 ranks, 16 MiB per rank:
  about 1.6 GB/s point to point, 1 GB/s ring all-reduce bus bandwidth, a third of that for
  an all-gather (46 ms against 17 ms for the all-reduce), 0.2-0.4 ms per message).
"""

from __future__ import annotations

import bisect
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch

from nemo_pp.planning.throughput import PEAK_TFLOPS, measure_gemm_tflops

__all__ = ["DeviceSpec", "GPU_GEMM_EFFICIENCY", "KNOWN_DEVICES", "device_spec", "probe_device"]

GIB = 1024**3

#: ``(smallest GEMM dimension, share of the dense peak)`` of a bf16 cuBLAS GEMM on a data-centre GPU;
#: log-linear in between (see the module docstring: stated, not measured)
GPU_GEMM_EFFICIENCY = ((64, 0.10), (128, 0.25), (256, 0.45), (512, 0.60), (1024, 0.70), (2048, 0.76),
                       (4096, 0.80), (8192, 0.82))


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or one CPU process) as the step-time and memory models see it.

    Attributes:
        name: ``"H100"``, ``"cpu"``, ...
        peak_tflops: dense peak TFLOP/s at the training's compute dtype.
        memory_bytes: memory one rank may fill (a GPU's HBM; on a CPU, host memory over the
            ranks of a node).
        memory_bandwidth: bytes/s the optimizer step and memory-bound kernels move.
        intra_node_bandwidth / inter_node_bandwidth: bytes/s one rank sends in one direction,
            to a rank of its node / of another node.
        intra_node_latency / inter_node_latency: seconds per message (or collective step).
        gemm_efficiency: ``(smallest GEMM dimension, share of peak)`` points, or None when
            ``gemm_shares`` holds measured shares by shape.
        gemm_shares: measured share of peak by ``(m, k, n)`` (a probe of this device).
        attention_efficiency: share of peak the attention kernels reach, forward + backward.
        piece_seconds: measured on this device for the model being planned
            (:func:`nemo_pp.planning.step_time.calibrate`): ``{tokens per microbatch:
            (embedding, one decoder layer, head + loss)}`` forward + backward seconds at tp 1;
            empty for a stated device (the FLOP model and the GEMM curve time it).
        optimizer_seconds_per_param: the optimizer step per local parameter, measured (0: the
            memory-bandwidth model).
        gather_share: the share of the link bandwidth all-gathers and reduce-scatters reach
            (1 for NCCL's rings; gloo's all-gather on a CPU: 0.35, measured).
        contention: how much slower a piece runs when all :attr:`cores` ranks of a node run
            it at once than alone (they share the memory bandwidth), measured; 1.0 on a GPU.
        overlap_communication: FSDP2's all-gathers are prefetched behind compute (GPUs: their
            own streams); False on a CPU, where gloo's collectives use the same cores.
        cores: CPU cores the ranks of a node share (None on a GPU): ranks beyond them slow
            each other down.
        reserved_bytes: memory of one process beyond its tensors (CUDA context and allocator
            slack; on a CPU the Python, torch and transformers of the process, about 0.7 GiB).
        source: where the numbers came from.
    """

    name: str
    peak_tflops: float
    memory_bytes: int
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency: float = 10e-6
    inter_node_latency: float = 20e-6
    gemm_efficiency: tuple[tuple[int, float], ...] | None = GPU_GEMM_EFFICIENCY
    gemm_shares: dict = field(default_factory=dict, compare=False)
    attention_efficiency: float = 0.45
    piece_seconds: dict = field(default_factory=dict, compare=False)
    optimizer_seconds_per_param: float = 0.0
    gather_share: float = 1.0
    contention: float = 1.0
    overlap_communication: bool = True
    cores: int | None = None
    reserved_bytes: int = 2 * GIB
    source: str = "stated"

    def gemm_share(self, m: int, k: int, n: int) -> float:
        """Share of :attr:`peak_tflops` a ``[m, k] x [k, n]`` product reaches (the forward's
        shape stands for the two backward products, which have the same three sizes)."""
        if (m, k, n) in self.gemm_shares:
            return self.gemm_shares[(m, k, n)]
        points = self.gemm_efficiency or GPU_GEMM_EFFICIENCY
        size = max(1, min(m, k, n))
        sizes = [p[0] for p in points]
        i = bisect.bisect_left(sizes, size)
        if i == 0:
            return points[0][1] * size / points[0][0]
        if i == len(points):
            return points[-1][1]
        (s0, e0), (s1, e1) = points[i - 1], points[i]
        return e0 + (e1 - e0) * math.log(size / s0) / math.log(s1 / s0)

    def gemm_seconds(self, m: int, k: int, n: int, passes: float = 3.0) -> float:
        """Seconds of ``passes`` products of ``[m, k] x [k, n]`` size (3: forward, and the
        input and weight gradients of the backward)."""
        return passes * 2.0 * m * k * n / (self.peak_tflops * 1e12 * self.gemm_share(m, k, n))

    def pieces_at(self, tokens: int) -> tuple[float, float, float] | None:
        """:attr:`piece_seconds` at ``tokens`` per microbatch, linear between the measured
        token counts (and beyond them, from the nearest two); None when nothing was measured."""
        if not self.piece_seconds:
            return None
        points = sorted(self.piece_seconds.items())
        if len(points) == 1:
            (m, values), = points
            return tuple(v * tokens / m for v in values)
        i = min(max(1, bisect.bisect_left([p[0] for p in points], tokens)), len(points) - 1)
        (m0, v0), (m1, v1) = points[i - 1], points[i]
        w = (tokens - m0) / (m1 - m0)
        return tuple(max(0.0, a + (b - a) * w) for a, b in zip(v0, v1))

    def sharing_factor(self, busy_ranks: float) -> float:
        """How much slower compute runs when ``busy_ranks`` ranks of a CPU node compute at once
        (on average over the step): :attr:`contention` reached linearly at :attr:`cores` busy
        ranks, then ranks beyond the cores time-share them (``busy / cores``); 1 on a GPU."""
        if not self.cores:
            return 1.0
        q = max(1.0, busy_ranks)
        shared = 1.0 + (self.contention - 1.0) * (min(q, self.cores) - 1) / max(1, self.cores - 1)
        return shared * max(1.0, q / self.cores)

    def link(self, spans_nodes: bool, gather: bool = False) -> tuple[float, float]:
        """``(bytes/s, seconds latency)`` of a group inside one node or across nodes (``gather``:
        for an all-gather or reduce-scatter, at :attr:`gather_share` of the bandwidth)."""
        bw, lat = ((self.inter_node_bandwidth, self.inter_node_latency) if spans_nodes
                   else (self.intra_node_bandwidth, self.intra_node_latency))
        return (bw * self.gather_share if gather else bw), lat


def _gpu(name: str, memory_gb: float, hbm_tb_s: float, nvlink_gb_s: float, ib_gb_s: float) -> DeviceSpec:
    return DeviceSpec(name=name, peak_tflops=PEAK_TFLOPS[name]["bf16"], memory_bytes=int(memory_gb * 1e9),
                      memory_bandwidth=hbm_tb_s * 1e12, intra_node_bandwidth=nvlink_gb_s * 1e9,
                      inter_node_bandwidth=ib_gb_s * 1e9, source=f"{name} data sheet (bf16), stated GEMM curve")


#: accelerators planned by name (``nemo-pp plan --device H100``), bf16 training
KNOWN_DEVICES: dict[str, DeviceSpec] = {
    "H100": _gpu("H100", 80, 3.35, 450, 50),
    "H200": _gpu("H200", 141, 4.8, 450, 50),
    "A100": _gpu("A100", 80, 2.0, 300, 25),
    "B200": _gpu("B200", 180, 8.0, 900, 50),
    "L40S": _gpu("L40S", 48, 0.864, 32, 25),
}

#: gloo over loopback on this kind of machine (module docstring)
CPU_LINK_BANDWIDTH = 1.0e9
CPU_LINK_LATENCY = 3e-4
CPU_GATHER_SHARE = 0.35
CPU_PROCESS_BYTES = int(0.7 * GIB)


def device_spec(name: str) -> DeviceSpec:
    """The :data:`KNOWN_DEVICES` entry whose name is in ``name`` (``"NVIDIA H100 80GB HBM3"``
    finds H100), case-insensitive.

    Raises:
        ValueError: no known device matches; the message lists them and the way to give one.
    """
    for key, spec in KNOWN_DEVICES.items():
        if key.lower() in name.lower():
            return spec
    raise ValueError(f"--device {name}: not a known accelerator ({', '.join(KNOWN_DEVICES)}); plan on the device at "
                     "hand with --device probe, or give --peak-tflops and --memory-gib")


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 64 MiB copy (read + write), best of three."""
    src = torch.empty(16 * 1024 * 1024, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def probe_device(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 ranks_per_node: int = 1) -> DeviceSpec:
    """A :class:`DeviceSpec` of the device at hand: its peak is the GEMM probe
    (:func:`~nemo_pp.planning.throughput.measure_gemm_tflops`, the same denominator MFU uses
    on a CPU; a known GPU's data sheet), its memory bandwidth a timed copy. Shapes' GEMM
    shares and the model's piece times are measured later, for the model being planned
    (:func:`nemo_pp.planning.step_time.calibrate`). Takes about a second.

    Args:
        device: ``"cpu"`` (at the current ``torch.get_num_threads()``) or a CUDA device.
        dtype: the training's compute dtype.
        ranks_per_node: processes that will share this machine: on a CPU they share its
            memory and cores.
    """
    device = torch.device(device)
    if device.type == "cuda":
        spec = device_spec(torch.cuda.get_device_name(device))
        return replace(spec, memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                       memory_bandwidth=_memory_bandwidth(device), source=f"{spec.source}; probed memory")
    peak = measure_gemm_tflops(dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    return DeviceSpec(
        name="cpu", peak_tflops=peak, memory_bytes=_host_memory_bytes() // max(1, ranks_per_node),
        memory_bandwidth=_memory_bandwidth(device), intra_node_bandwidth=CPU_LINK_BANDWIDTH,
        inter_node_bandwidth=CPU_LINK_BANDWIDTH, intra_node_latency=CPU_LINK_LATENCY,
        inter_node_latency=CPU_LINK_LATENCY, gemm_efficiency=((1024, 1.0),), attention_efficiency=1.0,
        gather_share=CPU_GATHER_SHARE,
        overlap_communication=False, cores=os.cpu_count() or 1, reserved_bytes=CPU_PROCESS_BYTES,
        source=f"probed: GEMM {peak:.3f} TFLOP/s at {torch.get_num_threads()} threads, gloo links measured once",
    )


def rank_memory_limit(device: torch.device, ranks_per_node: int) -> tuple[int, int]:
    """``(bytes one rank may fill, bytes its process needs beyond tensors)`` on ``device``: a
    CUDA device's memory (its known GPU's reserve, else 2 GiB), or on a CPU host memory over
    the ``ranks_per_node`` processes sharing it and :data:`CPU_PROCESS_BYTES`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, 2 * GIB
    return _host_memory_bytes() // max(1, ranks_per_node), CPU_PROCESS_BYTES
