"""Per-rank memory of a planned run, without hardware and without weights.

Parameters, gradients and optimizer state are counted from the meta-device model and
the plan's stage FQNs. Activations are MEASURED, not estimated by formula: each stage's
forward (and the loss on the last stage) runs once on the meta device under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for
backward (its shape and dtype; meta tensors take no memory), attention counted as the
fused kernels keep it. The schedule's action
lists then say how many microbatches each stage holds at once (1F1B: ``pp - rank`` on
rank ``rank``; GPipe: all of them), and the peak over the timeline is the activation
memory a rank needs.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemo_pp.models.lm_head import HEAD_LOSS_ATTR, install_head_loss, takes_hidden_states
from nemo_pp.models.module_tree import copy_pruned, decoder_layers, text_config
from nemo_pp.models.stage_forward import make_stage_emit_tensor, patch_hf_model_for_pp
from nemo_pp.planning.pipeline import PipelinePlan
from nemo_pp.planning.schedules import is_single_stage_schedule
from nemo_pp.planning.timeline import microbatches_in_flight


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs (one data-parallel replica; FSDP shards counted per rank).

    Attributes:
        pp_rank: the pipeline rank.
        stages: its global stage indices.
        param_bytes / optimizer_bytes: of its stages, divided by the FSDP shard count.
        grad_bytes: of its stages, unsharded (FSDP2 reduce-scatters them only at the end
            of the step; kept in the parameter dtype).
        activation_bytes: the most activation bytes it holds at once over a step.
        in_flight: ``{stage: most microbatches held at once}``.
        recv_buffer_bytes: torch's point-to-point receive buffers, kept from the first step
            on: one per microbatch for the activations a stage receives (all but the first)
            and for the gradients it receives (all but the last), each ``[mb, S, H]`` in the
            activation dtype (``torch.distributed.pipelining.stage``: ``_prepare_forward_infra``
            and ``_setup_backward_recv_info`` allocate them for every microbatch index), or
            the pooled slots of :func:`receive_buffer_slots`.
        recv_in_activation_bytes: of those, the activation buffers of the microbatches held
            at the peak: a received activation IS the stage's input, which ``activation_bytes``
            already counts (the first layer keeps it).
    """

    pp_rank: int
    stages: tuple[int, ...]
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    in_flight: dict
    recv_buffer_bytes: int = 0
    recv_in_activation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Parameter + gradient + optimizer + activation + receive-buffer bytes of this rank,
        the receive buffers that are the held microbatches' inputs counted once."""
        return (self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes
                + self.recv_buffer_bytes - self.recv_in_activation_bytes)


def _stage_module(model: nn.Module, module_fqns) -> nn.Module:
    part = copy_pruned(model, module_fqns)
    patch_hf_model_for_pp(part)
    make_stage_emit_tensor(part)
    return part.to("meta")


class _FusedAttentionMeta(torch.autograd.Function):
    """What a fused (flash / memory-efficient) SDPA kernel keeps for backward: q, k, v, the
    output and the log-sum-exp, never the [S, S] attention matrix. On the meta device
    torch decomposes SDPA into the math path, which would count that matrix; torch's CPU
    and CUDA kernels for training use the fused path (on CPU the count lands within 10%, tested)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run: the meta forward only counts
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttentionMeta.apply(query, key, value)


def _balanced_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """A fused experts module's forward under perfectly balanced routing, for the meta
    device: the ``N * k`` assignments split evenly over the ``E`` experts (``ceil(N k / E)``
    rows each), each expert's gated MLP as a batched matmul. It keeps what the eager
    per-expert loop keeps for backward (the gathered rows, the gate/up output, the activation
    and its product), which the real forward cannot show on meta: its routing is data.
    Under expert parallelism a rank receives the same ``N * k`` rows for its ``E / ep``
    experts (balanced), so the count holds there too."""
    n, hidden = hidden_states.shape
    k, experts = top_k_index.shape[1], self.num_experts
    rows = -(-n * k // experts)
    x = hidden_states.repeat_interleave(k, dim=0)
    x = F.pad(x, (0, 0, 0, experts * rows - n * k)).view(experts, rows, hidden)
    gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2)).reshape(experts * rows, hidden)
    return (out[: n * k].view(n, k, hidden) * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(1)


@contextlib.contextmanager
def _balanced_experts(part: nn.Module):
    """Run every fused experts module of ``part`` as :func:`_balanced_experts_forward`."""
    from nemo_pp.models.moe import expert_modules

    modules = expert_modules(part)
    before = [m.__dict__.get("forward") for m in modules]  # an instance forward (expert parallelism's) comes back
    for m in modules:
        m.forward = _balanced_experts_forward.__get__(m)
    try:
        yield
    finally:
        for m, forward in zip(modules, before):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def saved_activation_bytes(part: nn.Module, inputs: torch.Tensor, loss_fn=None, labels=None) -> int:
    """Bytes autograd keeps for backward after one forward of ``part`` on meta ``inputs``
    (``[mb, S] int64`` ids or ``[mb, S, H]`` hidden states), parameters excluded; a mixture
    of experts' experts counted at balanced routing (:func:`_balanced_experts_forward`)."""
    # no mask tensor: it would need data on the meta device; SDPA then runs causal
    masks = {"full_attention": None, "sliding_attention": None}
    with _counting_saved_tensors(part) as saved, _balanced_experts(part):
        if loss_fn is not None and getattr(part, HEAD_LOSS_ATTR, None) is not None:
            out = part(inputs, causal_mask_mapping=masks, labels=labels)  # the loss, from hidden states
        else:
            out = part(inputs, causal_mask_mapping=masks)
            if loss_fn is not None:
                out = loss_fn(out, labels)
        return saved.total()  # while ``out`` keeps the graph alive


def vision_activation_bytes(part: nn.Module, images: int) -> int:
    """Bytes autograd keeps after the vision encoder and projector of a vision-language
    model's first stage run on ``images`` meta images (one per sample is what the plan
    assumes); 0 for a text model and for families whose encoder forward depends on the
    images' values (Qwen2-VL's patch grids, Idefics3's padding-image filter), which the meta
    device cannot run: for those the plan counts the decoder's activations only."""
    from nemo_pp.models.vlm import multimodal_model, vision_family

    inner = multimodal_model(part)
    if inner is None or not hasattr(inner, "get_image_features"):
        return 0
    family, vision = vision_family(part.config), part.config.vision_config
    if family.per_patch or family.image_meta or not getattr(vision, "image_size", None):
        return 0
    pixels = torch.empty(images, getattr(vision, "num_channels", 3), vision.image_size, vision.image_size,
                         device="meta", requires_grad=False)
    with _counting_saved_tensors(part) as saved:
        out = inner.get_image_features(pixel_values=pixels)
        return saved.total() if out is not None else 0


class _SavedBytes:
    """The tensors autograd saved, by the tensor owning their memory. Each is held by a
    weak reference to the object autograd keeps, so what a discarded branch saved (the
    values of a top-k whose indices alone are used, say) drops out when autograd frees it,
    and a reused ``id`` cannot overwrite a live entry."""

    def __init__(self):
        self._entries: list[tuple[weakref.ref, int, int]] = []

    def add(self, t: torch.Tensor) -> None:
        self._entries.append((weakref.ref(t), _owner(t), _owner_bytes(t)))

    def total(self) -> int:
        """Bytes of the distinct owners still saved by a live graph (call it while the
        forward's output is alive)."""
        live = {owner: nbytes for ref, owner, nbytes in self._entries if ref() is not None}
        return sum(live.values())


@contextlib.contextmanager
def _counting_saved_tensors(module: nn.Module):
    """Yield a :class:`_SavedBytes` of every tensor autograd saves inside the block, the
    module's parameters (and views of them) excluded, attention counted as a fused kernel
    keeps it."""
    params = {id(p) for p in module.parameters()}
    saved = _SavedBytes()

    def pack(t: torch.Tensor):
        if _owner(t) not in params:
            saved.add(t)
        return t

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved
    finally:
        F.scaled_dot_product_attention = original


def _owner(t: torch.Tensor) -> int:
    """Identity of the tensor owning ``t``'s memory (a view such as ``weight.t()`` is its base)."""
    return id(t._base) if t._base is not None else id(t)


def _owner_bytes(t: torch.Tensor) -> int:
    base = t._base if t._base is not None else t
    return base.numel() * base.element_size()



def optimizer_states(cfg) -> int:
    """Optimizer tensors per parameter of the recipe config's ``optimizer:``: 1 for SGD (its
    momentum), else 2 (Adam / AdamW: ``exp_avg`` and ``exp_avg_sq``)."""
    return 1 if "SGD" in str(cfg.optimizer.get("_target_")) else 2


def memory_plan(
    model: nn.Module,
    plan: PipelinePlan,
    seq_len: int,
    fsdp_shards: int = 1,
    optimizer_states: int = 2,
    activation_checkpointing: bool = False,
    loss_fn=None,
    ep: int = 1,
) -> list[RankMemory]:
    """Bytes every pp rank needs for ``plan`` at sequence length ``seq_len``.

    Args:
        model: the full model on the meta device (``nemo_pp.models.loading.empty_model``).
        plan: the pipeline plan (its microbatch size and count are used).
        seq_len: tokens per sample.
        fsdp_shards: ranks FSDP shards parameters, gradients and optimizer state over
            (``dp_shard * cp``; 1 without FSDP).
        optimizer_states: tensors of optimizer state per parameter, each of the
            parameter's dtype (AdamW: 2; SGD with momentum: 1).
        activation_checkpointing: each decoder layer keeps only its input and recomputes
            the rest in backward (one layer's activations then exist at a time).
        loss_fn: run on the last stage's output (its fp32 upcast is part of the peak);
            default ``MaskedCrossEntropy``. A loss on hidden states (``FusedLinearCrossEntropy``)
            runs inside the last stage, as in training, and keeps no logits.
        ep: expert-parallel ranks. A mixture of experts' expert weights are then
            ``1 / (ep * ep_shard)`` per rank (``ep * ep_shard = fsdp_shards``), like the
            other parameters, but their gradients ``1 / ep`` before the reduce-scatter
            (each rank computes only its experts'); activations at balanced routing.

    Returns:
        one :class:`RankMemory` per pp rank.
    """
    if loss_fn is None:
        from nemo_pp.loss.masked_ce import MaskedCrossEntropy

        loss_fn = MaskedCrossEntropy()
    mb = plan.microbatch_size
    hidden = text_config(model.config).hidden_size
    dtype = next(model.parameters()).dtype
    from nemo_pp.models.moe import expert_modules

    per_stage, recompute, expert_grad_saving = [], [], []
    for stage, names in enumerate(plan.module_fqns):
        part = _stage_module(model, names)
        params = {id(p): p for p in part.parameters()}.values()
        nbytes = sum(p.numel() * p.element_size() for p in params)
        expert_bytes = sum(p.numel() * p.element_size() for m in expert_modules(part) for p in m.parameters())
        expert_grad_saving.append(expert_bytes - expert_bytes // ep)
        first, last = stage == 0, stage == plan.num_stages - 1
        x = (torch.zeros(mb, seq_len, dtype=torch.long, device="meta") if first
             else torch.empty(mb, seq_len, hidden, dtype=dtype, device="meta", requires_grad=True))
        labels = torch.zeros(mb, seq_len, dtype=torch.long, device="meta")
        if last and takes_hidden_states(loss_fn):  # the stage computes its loss from hidden states
            install_head_loss(part, loss_fn)
        act = saved_activation_bytes(part, x, loss_fn if last else None, labels)
        if first:
            act += vision_activation_bytes(part, mb)
        try:
            layers = decoder_layers(part)
        except ValueError:  # a stage without decoder layers (lm_head alone)
            layers = []
        one_layer = 0
        if activation_checkpointing and layers:
            h = torch.empty(mb, seq_len, hidden, dtype=dtype, device="meta", requires_grad=True)
            each = layer_activation_bytes(part, h)
            one_layer = max(each)
            # a checkpointed layer keeps its input; the rest is recomputed one layer at a time in backward
            act -= sum(each) - len(layers) * h.numel() * h.element_size()
        per_stage.append((nbytes, act))
        recompute.append(one_layer)

    out = []
    for rank, slots in enumerate(microbatches_in_flight(plan)):
        stages = plan.stages_of(rank)
        peak = max((sum(n * per_stage[s][1] for s, n in held.items()) for held in slots), default=0)
        peak += max((recompute[s] for s in stages), default=0)
        in_flight = {s: max((held.get(s, 0) for held in slots), default=0) for s in stages}
        full = sum(per_stage[s][0] for s in stages)
        params = full // fsdp_shards
        # FSDP2 keeps each stage's gradient unsharded until the step's reduce-scatter (and
        # across accumulated batches when deferring): a full copy, not a shard
        grads = full - sum(expert_grad_saving[s] for s in stages)  # an ep rank computes only its experts' gradients
        # [mb, S, H] receive buffers: activations in (not the first stage), gradients in (not
        # the last), one per microbatch or per pooled slot
        buffer = mb * seq_len * hidden * dtype.itemsize
        slots = receive_buffer_slots(plan)
        recv = buffer * sum((s != 0) * (slots[s][0] if slots else plan.n_microbatches)
                            + (s != plan.num_stages - 1) * (slots[s][1] if slots else plan.n_microbatches)
                            for s in stages)
        shared = buffer * sum(in_flight[s] for s in stages if s != 0)
        out.append(RankMemory(rank, stages, params, grads, optimizer_states * params, peak, in_flight, recv,
                              shared))
    return out


def receive_buffer_slots(plan: PipelinePlan) -> dict[int, tuple[int, int]] | None:
    """``{stage: (activation buffers, gradient buffers)}`` when the plan pools its receive
    buffers (``pool_recv_buffers`` under a one-stage-per-rank schedule such as 1F1B, where
    torch receives a microbatch right before its forward or backward): one more activation
    buffer than the microbatches the stage holds at once (the slot of microbatch ``i`` is
    reused by ``i + slots`` only after ``i``'s backward), two for gradients; None otherwise
    (one buffer per microbatch, as torch allocates them)."""
    if not plan.pool_recv_buffers or plan.csv_actions is not None or not plan.schedule:
        return None
    if not is_single_stage_schedule(plan.schedule):
        return None
    n = plan.n_microbatches
    out = {}
    for rank, timeline in enumerate(microbatches_in_flight(plan)):
        for stage in plan.stages_of(rank):
            held = max((slot.get(stage, 0) for slot in timeline), default=0)
            out[stage] = (min(n, held + 1), min(n, 2))
    return out


def layer_activation_bytes(part: nn.Module, hidden: torch.Tensor) -> list[int]:
    """Bytes autograd keeps for backward in each decoder layer of ``part`` run alone on
    ``hidden: [mb, S, H]`` (meta or real), one entry per layer, measured once per kind of
    layer: a dense-then-sparse stack (DeepSeek-V3's first layers, Qwen2-MoE's dense ones)
    keeps far less in a dense layer than in an MoE layer, which also keeps its ``top_k``
    copies of every token."""
    kinds: dict[str, int] = {}
    return [kinds[k] if (k := _layer_kind(layer)) in kinds else kinds.setdefault(k, _layer_bytes(part, layer, hidden))
            for layer in decoder_layers(part)]


def _layer_kind(layer: nn.Module) -> str:
    """What makes two decoder layers of one model keep different activations: their
    submodules' classes (a dense MLP or a mixture of experts, one attention kind or another)."""
    return ",".join(sorted({type(m).__name__ for m in layer.modules()}))


def _layer_bytes(part: nn.Module, layer: nn.Module, hidden: torch.Tensor) -> int:
    """Saved bytes of one decoder layer run alone on ``hidden`` (with the stage's rotary
    embedding, which every stage holds; on meta, experts at balanced routing)."""
    inner = part.model if getattr(part, "model", None) is not None else part
    rotary = getattr(inner, "rotary_emb", None)
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    embeddings = rotary(hidden, position_ids) if rotary is not None else None
    balanced = _balanced_experts(layer) if hidden.is_meta else contextlib.nullcontext()
    with _counting_saved_tensors(layer) as saved, balanced:
        out = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=position_ids)
        total = saved.total()
    del out
    return total
