"""The step-time model: seconds per optimizer step of a layout, before anything runs.

One optimizer step is ``grad_acc_steps`` schedule steps, then the gradient reduction and
the optimizer. A schedule step is the schedule simulation
(:func:`nemo_pp.planning.timeline.simulated_step_seconds`) with each stage's forward +
backward of one microbatch lasting

* **compute**: the cost model's FLOPs (:func:`nemo_pp.planning.cost.flop_costs`) over tp and
  cp ranks at the device's peak times an efficiency by GEMM size
  (:meth:`~nemo_pp.planning.devices.DeviceSpec.gemm_share`: a decoder layer's products at the
  share of its MLP's ``[tokens, H] x [H, I/tp]``, an MoE layer's at one expert's
  ``[tokens k / E_local, H] x [H, I_moe]``, the head at ``[tokens, H] x [H, V/tp]``), attention at
  the device's attention efficiency; on a probed device instead the model's own pieces as
  :func:`calibrate` timed them (over tp, at the GEMM shares of the split products);
  recomputation (activation checkpointing) adds a forward;
* **tensor parallelism** (Megatron-LM, Shoeybi et al. 2019): per layer two all-reduces of the
  ``[mb, S/cp, H]`` activation forward and two backward (under sequence parallelism an
  all-gather and a reduce-scatter each, the same bytes), one forward more when recomputing;
  the head's column-parallel logits all-gathered once. Not overlapped;
* **context parallelism**: per layer an all-gather of the K and V shards forward and a
  reduce-scatter of their gradients backward (``allgather`` attention). Not overlapped;
* **expert parallelism**: the all-to-all bytes of
  :func:`~nemo_pp.planning.cost.expert_all_to_all_bytes` per MoE layer. Not overlapped;
* **FSDP2** (over ``dp_shard x cp``; a mixture's experts, already sharded over ep, over the
  ``ep_shard`` ranks left): every forward and every backward of a stage all-gathers
  its parameters (``reshard_after_forward``; once per schedule step for the split-backward
  schedules). Overlapped with compute where the device overlaps (prefetch: only the excess
  and the first layer's gather show), added in full on a CPU (gloo shares its cores).

P2P between stages (each microbatch's activation forward, its gradient backward) is a
delay on the schedule's edges between ranks. After the schedule steps: the gradients'
reduce-scatter over the FSDP group (and the all-reduce over ``dp_replicate`` under HSDP),
not overlapped (``defer_fsdp_grad_sync``: once per optimizer step, after the last backward);
the AdamW step, memory-bound: 28 bytes per local fp32 parameter (read parameter, gradient
and two moments, write three) at the memory bandwidth.

Collectives are ring algorithms (Patarasuk and Yuan, 2009; NCCL's bus bandwidth): an
all-reduce of ``S`` bytes over ``n`` ranks moves ``2 (n - 1) / n x S`` per rank, an all-gather
or reduce-scatter of ``S`` bytes in all ``(n - 1) / n x S``, each step paying the latency.
A group whose ranks span nodes runs at the inter-node bandwidth. Ranks are numbered as the
mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` lays them out, tp innermost.

On a CPU the ranks of a node share its cores and memory bandwidth: the schedule step is
slowed by :meth:`~nemo_pp.planning.devices.DeviceSpec.sharing_factor` of the ranks busy on
average (the busy seconds of all ranks over the simulated step), the optimizer by that of all
of them (they step together).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_pp.models.module_tree import text_config
from nemo_pp.planning.cost import expert_all_to_all_bytes, flop_costs
from nemo_pp.planning.devices import DeviceSpec
from nemo_pp.planning.layout import Layout
from nemo_pp.planning.layout_memory import schedule_plan
from nemo_pp.planning.timeline import simulated_step_seconds

__all__ = ["ModelShape", "StepTime", "calibrate", "predict_step_time"]

#: bytes the AdamW step moves per local parameter: read fp32 parameter, gradient, exp_avg,
#: exp_avg_sq (16), write parameter, exp_avg, exp_avg_sq (12)
ADAMW_BYTES_PER_PARAM = 28


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step and their parts.

    Attributes:
        total_s: the optimizer step.
        schedule_s: the ``grad_acc_steps`` schedule steps (compute, bubble, in-stage
            communication, P2P waits).
        compute_s: the busiest pp rank's compute of those steps (no waiting, no communication).
        bubble_share: the share of ``schedule_s`` the busiest rank is not computing or communicating.
        tp_s / cp_s / ep_s / fsdp_s / p2p_s: communication per optimizer step on the busiest
            rank (``fsdp_s``: the exposed part of the all-gathers; ``p2p_s``: per transfer x
            transfers on the critical rank, shown for scale).
        grad_sync_s: gradient reduce-scatter (and HSDP all-reduce) after the last backward.
        optimizer_s: the optimizer step.
    """

    total_s: float
    schedule_s: float
    compute_s: float
    bubble_share: float
    tp_s: float
    cp_s: float
    ep_s: float
    fsdp_s: float
    p2p_s: float
    grad_sync_s: float
    optimizer_s: float


class ModelShape:
    """What the step-time model reads of a model: its config's sizes, which layers are
    sparse, the bytes of each piece's parameters (:class:`~nemo_pp.planning.layout_memory.ModelMemory`)."""

    def __init__(self, memory):
        self.memory = memory
        self.config = text_config(memory.model.config)
        self.moe_layers = frozenset(memory.moe_layers)
        cfg = self.config
        self.hidden = cfg.hidden_size
        self.vocab = cfg.vocab_size
        heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // heads
        self.q_dim = heads * self.head_dim
        self.kv_dim = (getattr(cfg, "num_key_value_heads", None) or heads) * self.head_dim
        self.intermediate = cfg.intermediate_size
        self.experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                             if getattr(cfg, k, None)), 0)
        self.top_k = getattr(cfg, "num_experts_per_tok", None) or 1
        self.expert_intermediate = getattr(cfg, "moe_intermediate_size", None) or self.intermediate
        self.dtype_bytes = memory.dtype.itemsize
        self._flops: dict = {}
        self._layer_cache: dict = {}

    def piece_flops(self, seq_len: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
        """``(each layer's FLOPs, each layer's attention FLOPs, head FLOPs)`` of one sample,
        forward + backward (attention: the ``4 b s s_att q`` term of the cost model); cached."""
        if seq_len not in self._flops:
            self._flops[seq_len] = self._piece_flops(seq_len)
        return self._flops[seq_len]

    def _piece_flops(self, seq_len: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
        costs = flop_costs(self.memory.model.config, 1, seq_len, moe_layers=tuple(self.moe_layers))
        plain = flop_costs(self.memory.model.config, 1, 1, moe_layers=tuple(self.moe_layers))
        # attention is what grows faster than s: the layer's cost minus s times its one-token cost
        attention = tuple(max(0.0, c - p * seq_len) for c, p in zip(costs.layers, plain.layers))
        return costs.layers, attention, costs.head


def _all_reduce(nbytes: float, n: int, bw: float, lat: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def _gather(nbytes: float, n: int, bw: float, lat: float) -> float:
    """All-gather (or reduce-scatter) of ``nbytes`` in all."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes / bw + (n - 1) * lat


def _spans_nodes(stride: int, size: int, gpus_per_node: int) -> bool:
    return size > 1 and stride * size > gpus_per_node


def _layer_seconds(shape: ModelShape, device: DeviceSpec, layout: Layout, index: int, flops: float,
                   attention: float, tokens: int) -> float:
    """Compute seconds of one layer's forward + backward of one microbatch on one rank:
    measured on a calibrated device (over tp, at the GEMM shares of the tp-split and whole
    MLP products), else FLOPs at the stated GEMM curve."""
    tp = layout.tp
    if index in shape.moe_layers and shape.experts:
        rows = max(1, tokens * shape.top_k * layout.ep // max(1, shape.experts))
        whole = split = device.gemm_share(rows, shape.hidden, shape.expert_intermediate)
    else:
        whole = device.gemm_share(tokens, shape.hidden, shape.intermediate)
        split = device.gemm_share(tokens, shape.hidden, max(1, shape.intermediate // tp))
    measured = device.pieces_at(tokens)
    if measured is not None:
        return measured[1] / tp * whole / split
    peak = device.peak_tflops * 1e12
    return (flops - attention) / (tp * layout.cp) / (peak * split) + attention / (tp * layout.cp) / (
        peak * device.attention_efficiency)


def _head_seconds(shape: ModelShape, device: DeviceSpec, layout: Layout, flops: float, tokens: int) -> float:
    """The output projection and loss of one microbatch: on a calibrated device the measured
    piece, its projection over tp (column-parallel) and the loss on the gathered logits not;
    else the FLOP model."""
    tp = layout.tp
    split = device.gemm_share(tokens, shape.hidden, max(1, shape.vocab // tp))
    projection = flops / (device.peak_tflops * 1e12 * split)
    measured = device.pieces_at(tokens)
    if measured is None:
        return projection / tp
    whole = flops / (device.peak_tflops * 1e12 * device.gemm_share(tokens, shape.hidden, shape.vocab))
    return max(0.0, measured[2] - whole) + projection / tp


def _layer_compute(shape: ModelShape, device: DeviceSpec, layout: Layout, seq_len: int) -> tuple[float, ...]:
    """Every layer's compute seconds per microbatch for this layout's shape (cached on ``shape``:
    a search asks for the same shapes thousands of times)."""
    key = (id(device), seq_len, layout.microbatch_size, layout.tp, layout.cp, layout.ep,
           layout.activation_checkpointing)
    if shape._layer_cache.get("device") is not device:  # another device's numbers (ids can be reused)
        shape._layer_cache = {"device": device}
    if key not in shape._layer_cache:
        mb = layout.microbatch_size
        tokens = mb * seq_len // layout.cp
        flops, attention, _ = shape.piece_flops(seq_len)
        redo = 4 / 3 if layout.activation_checkpointing else 1.0  # recomputation: one forward more
        shape._layer_cache[key] = tuple(
            _layer_seconds(shape, device, layout, i, flops[i] * mb, attention[i] * mb, tokens) * redo
            for i in range(len(flops)))
    return shape._layer_cache[key]


def predict_step_time(shape: ModelShape, device: DeviceSpec, layout: Layout, seq_len: int,
                      gpus_per_node: int, bound_only: bool = False) -> StepTime:
    """Seconds of one optimizer step of ``layout`` at ``seq_len`` tokens per sample (see the
    module docstring for every term and its source).

    Args:
        shape: the model (:class:`ModelShape`).
        device: the accelerator (:mod:`nemo_pp.planning.devices`).
        layout: the candidate.
        seq_len: tokens per sample, padding included.
        gpus_per_node: ranks per node (which groups cross nodes).
        bound_only: skip the schedule simulation: ``total_s`` is then a lower bound (the
            busiest rank's actions back to back, no waiting, no sharing), which a search
            uses to leave out layouts that cannot beat the ones it has.

    Raises:
        ValueError: the schedule cannot run the layout's shape.
    """
    plan = schedule_plan(layout.schedule, layout.pp, layout.num_stages, layout.local_batch_size,
                         layout.microbatch_size)
    counts = shape.memory.stage_layer_counts(layout.num_stages, layout.layers_per_stage is not None)
    mb, tp, cp = layout.microbatch_size, layout.tp, layout.cp
    tokens = mb * seq_len // cp  # one rank's tokens of one microbatch
    head_flops = shape.piece_flops(seq_len)[2]
    size = shape.dtype_bytes
    activation = tokens * shape.hidden * size
    G = gpus_per_node
    tp_link = device.link(_spans_nodes(1, tp, G))
    cp_link = device.link(_spans_nodes(tp, cp, G), gather=True)
    tp_gather = device.link(_spans_nodes(1, tp, G), gather=True)
    fsdp_n = layout.dp_shard * cp
    fsdp_link = device.link(_spans_nodes(tp, fsdp_n, G), gather=True)
    ep_link = device.link(_spans_nodes(tp, layout.ep, G))
    rep_link = device.link(_spans_nodes(layout.dp_shard * cp * tp, layout.dp_replicate, G))
    pp_link = device.link(_spans_nodes(layout.sizes.dp * cp * tp, layout.pp, G))
    recompute = layout.activation_checkpointing

    tp_per_layer = _all_reduce(activation, tp, *tp_link) * (4 + 2 * recompute)
    kv = mb * seq_len * shape.kv_dim // tp * 2 * size  # K and V of the whole sequence, gathered
    cp_per_layer = _gather(kv, cp, *cp_link) * (2 + recompute)
    ep_per_layer = 0.0
    if layout.ep > 1:
        sent = expert_all_to_all_bytes(shape.memory.model.config, mb, seq_len // cp, layout.ep, size, recompute)
        ep_per_layer = sent / ep_link[0] + 2 * (layout.ep - 1) * ep_link[1] * (3 + 3 * recompute) / 3
    starts = [sum(counts[:k]) for k in range(len(counts))]
    stage_seconds, stage_compute, stage_comm, stage_fsdp, stage_params = [], [], [], [], []
    per_layer = _layer_compute(shape, device, layout, seq_len)
    for k, n in enumerate(counts):
        idx = range(starts[k], starts[k] + n)
        compute = sum(per_layer[starts[k]:starts[k] + n])
        comm = n * (tp_per_layer + cp_per_layer) + sum(ep_per_layer for i in idx if i in shape.moe_layers)
        experts = sum(shape.memory.layer_expert_bytes[i] for i in idx)
        dense = (sum(shape.memory.layer_bytes[i] for i in idx) - experts) / tp
        # expert parallelism shards the experts over ep (not tp), FSDP2 the rest over ep_shard
        experts = experts / layout.ep if layout.ep > 1 else experts / tp
        if k == 0:
            measured = device.pieces_at(tokens)
            compute += measured[0] if measured is not None else 0.0
            dense += shape.memory.embedding_bytes / tp
        if k == len(counts) - 1:
            compute += _head_seconds(shape, device, layout, head_flops * mb / cp, tokens)
            comm += _gather(tokens * shape.vocab * size, tp, *tp_gather)
            dense += shape.memory.head_bytes / tp
        fsdp = 0.0
        if fsdp_n > 1:  # one stage's parameters, all-gathered
            gather = _gather(dense, fsdp_n, *fsdp_link) + _gather(experts, fsdp_n // layout.ep, *fsdp_link)
            passes = 2 / layout.n_microbatches if plan.split_backward else 2  # per microbatch
            if device.overlap_communication:
                first = gather / max(1, n)  # nothing hides the first layer's gather
                fsdp = passes * (first + max(0.0, gather - first - compute / 2))
            else:
                fsdp = passes * gather
        stage_seconds.append(compute + comm + fsdp)
        stage_compute.append(compute)
        stage_comm.append(comm)
        stage_fsdp.append(fsdp)
        stage_params.append((dense, experts))
    p2p = activation // (tp if layout.sequence_parallel else 1) / pp_link[0] + pp_link[1] if layout.pp > 1 else 0.0
    ranks = plan.stage_ids
    busiest = max(range(layout.pp), key=lambda r: sum(stage_seconds[s] for s in ranks[r]))
    if bound_only:
        one_step = layout.n_microbatches * sum(stage_seconds[s] for s in ranks[busiest])
    else:
        one_step = simulated_step_seconds(plan, stage_seconds, transfer_seconds=p2p)
    acc = layout.grad_acc_steps
    # ranks of a CPU node share its cores and memory bandwidth: by how many are busy on average
    node_ranks = min(layout.sizes.world_size, G)
    busy_ranks = node_ranks / layout.pp * layout.n_microbatches * sum(stage_seconds) / max(one_step, 1e-12)
    schedule = one_step * acc * (1.0 if bound_only else device.sharing_factor(busy_ranks))
    per_mb = layout.n_microbatches * acc

    def on_busiest(values) -> float:
        return per_mb * sum(values[s] for s in ranks[busiest])

    compute_s = on_busiest(stage_compute)
    busy = on_busiest(stage_seconds)
    dense, experts = max(([sum(stage_params[s][i] for s in ids) for i in (0, 1)] for ids in ranks), key=sum)
    shard = max(1, fsdp_n // layout.ep)
    local = dense / fsdp_n + experts / shard  # bytes of parameters this rank keeps
    grad_sync = (_gather(dense, fsdp_n, *fsdp_link) + _gather(experts, shard, *fsdp_link)
                 + _all_reduce(local, layout.dp_replicate, *rep_link))
    local_params = local / size
    per_param = device.optimizer_seconds_per_param or ADAMW_BYTES_PER_PARAM / device.memory_bandwidth
    optimizer = local_params * per_param * device.sharing_factor(node_ranks)
    tp_s = per_mb * sum(counts[s] * tp_per_layer for s in ranks[busiest])
    cp_s = per_mb * sum(counts[s] * cp_per_layer for s in ranks[busiest])
    ep_s = on_busiest(stage_comm) - tp_s - cp_s
    return StepTime(
        total_s=schedule + grad_sync + optimizer, schedule_s=schedule, compute_s=compute_s,
        bubble_share=max(0.0, 1 - busy / (one_step * acc)) if one_step else 0.0, tp_s=tp_s, cp_s=cp_s, ep_s=max(0.0, ep_s),
        fsdp_s=on_busiest(stage_fsdp), p2p_s=p2p * 2 * per_mb * len(ranks[busiest]) if layout.pp > 1 else 0.0,
        grad_sync_s=grad_sync, optimizer_s=optimizer,
    )


#: most token counts :func:`calibrate` times (the rest are interpolated)
CALIBRATION_POINTS = 3


def calibrate(device: DeviceSpec, shape: ModelShape, token_counts, tps=(1,), eps=(1,)) -> DeviceSpec:
    """``device`` (a probed CPU) with what the model's own pieces measure on it, at one
    thread (torchrun's ``OMP_NUM_THREADS=1``).

    * ``piece_seconds``: at each token count (at most :data:`CALIBRATION_POINTS` of them:
      the smallest, the largest, one between; the others interpolated) one decoder layer
      alone (:func:`~nemo_pp.planning.cost.profile_costs`), the embedding alone, and a copy
      of the model cut to one layer (random weights, the run's dtype, the training loss),
      whose time less the two is the head with its loss. Timed inside a whole model, the
      memory-bound parts (the loss's softmax over the vocabulary, a tied embedding's two
      gradients) cost what they cost in training, which timing the head alone misses by up
      to a third on this CPU.
    * ``gemm_shares``: the share of the probe's peak each tp-split product reaches.
    * ``optimizer_seconds_per_param``: one AdamW step over the model's parameters.
    * ``contention``: the one-layer model timed in as many processes at once as the machine
      has cores, over its time alone (the node's ranks share the memory bandwidth).

    A stated GPU is returned unchanged (its GEMM curve is stated). Seconds to a minute on a CPU.
    """
    import dataclasses

    from transformers import AutoModelForCausalLM

    from nemo_pp.planning.cost import one_layer_config, profile_costs
    from nemo_pp.planning.throughput import measure_gemm_shape_tflops

    if device.cores is None:
        return device
    known = sorted(device.piece_seconds)
    counts = [c for c in sorted(set(token_counts)) if not (known and known[0] <= c <= known[-1])]
    if len(counts) > CALIBRATION_POINTS:
        counts = [counts[0], counts[len(counts) // 2], counts[-1]]
    shares = dict(device.gemm_shares)
    for tokens in sorted(set(token_counts)):
        for tp in tps:
            for k, n in ((shape.hidden, max(1, shape.intermediate // tp)), (shape.hidden, max(1, shape.vocab // tp))):
                if (tokens, k, n) not in shares:
                    shares[(tokens, k, n)] = min(1.0, measure_gemm_shape_tflops(tokens, k, n, repeats=2)
                                                 / device.peak_tflops)
        for ep in eps:
            if shape.experts:
                rows = max(1, tokens * shape.top_k * ep // shape.experts)
                key = (rows, shape.hidden, shape.expert_intermediate)
                if key not in shares:
                    shares[key] = min(1.0, measure_gemm_shape_tflops(*key, repeats=2) / device.peak_tflops)
    seq = shape.memory.seq_len
    model = AutoModelForCausalLM.from_config(one_layer_config(shape.config), dtype=shape.memory.dtype)
    pieces, whole = dict(device.piece_seconds), {}
    for tokens in counts:
        mb, s = max(1, tokens // seq), min(tokens, seq)
        whole[tokens], embedding = _whole_model_seconds(model, shape.memory.loss_fn, mb, s)
        layer = profile_costs(shape.memory.model.config, mb, s, repeats=2).layers[0]
        pieces[mb * s] = (embedding, layer, max(0.0, whole[tokens] - layer - embedding))
    contention = device.contention
    if not known and (device.cores or 1) > 1:
        middle = counts[len(counts) // 2]
        together = _concurrent_seconds(shape, max(1, middle // seq), min(middle, seq), device.cores)
        contention = max(1.0, together / whole[middle])
    return dataclasses.replace(device, gemm_shares=shares, piece_seconds=pieces, contention=contention,
                               optimizer_seconds_per_param=device.optimizer_seconds_per_param
                               or _optimizer_seconds_per_param(model),
                               source=device.source + ("" if known else "; this model's pieces timed"))


def _whole_model_seconds(model, loss_fn, microbatch_size: int, seq_len: int) -> tuple[float, float]:
    """Forward + backward seconds of ``model`` (the one-layer copy, :func:`~nemo_pp.planning.cost.one_layer_config`)
    and of its embedding alone, on one random ``[microbatch_size, seq_len]`` microbatch."""
    import time

    import torch

    ids = torch.randint(0, model.config.vocab_size, (microbatch_size, seq_len))

    def seconds(step) -> float:  # the median of three after a warm-up (the allocator's first pages)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return sorted(times[1:])[1]

    def whole():
        loss_fn(model(input_ids=ids).logits, ids).backward()

    def embedding():
        hidden = model.get_input_embeddings()(ids)
        hidden.backward(torch.ones_like(hidden))

    return seconds(whole), seconds(embedding)


def concurrent_probe_main() -> None:
    """One process of :func:`_concurrent_seconds`: reads ``{"config", "dtype", "mb", "seq"}``
    as JSON on stdin, prints the one-layer model's forward + backward seconds."""
    import json
    import sys

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_pp.loss.masked_ce import MaskedCrossEntropy

    torch.set_num_threads(1)
    job = json.load(sys.stdin)
    config = AutoConfig.for_model(**job["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, job["dtype"]))
    print(_whole_model_seconds(model, MaskedCrossEntropy(), job["mb"], job["seq"])[0])


def _concurrent_seconds(shape: ModelShape, microbatch_size: int, seq_len: int, processes: int) -> float:
    """Mean seconds of the one-layer model's forward + backward when ``processes`` fresh
    Python processes run it at the same time."""
    import json
    import subprocess
    import sys

    from nemo_pp.planning.cost import one_layer_config

    job = json.dumps({"config": one_layer_config(shape.config).to_dict(),
                      "dtype": str(shape.memory.dtype).removeprefix("torch."), "mb": microbatch_size, "seq": seq_len})
    code = "from nemo_pp.planning.step_time import concurrent_probe_main; concurrent_probe_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    times = [float(p.communicate(job)[0].strip().splitlines()[-1]) for p in procs]
    return sum(times) / len(times)


def _optimizer_seconds_per_param(model) -> float:
    """Seconds of one AdamW step per parameter (torch's default implementation for the device),
    timed over ``model`` (the one-layer copy: its embedding-sized and layer-sized tensors)."""
    import time

    import torch

    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5)
    opt.step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - start)
    for p in params:
        p.grad = None
    return best / sum(p.numel() for p in params)
