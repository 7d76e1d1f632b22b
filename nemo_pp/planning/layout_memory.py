"""Per-rank memory of many candidate layouts from one set of meta-device measurements.

:func:`nemo_pp.planning.memory.memory_plan` runs every stage's forward on the meta device:
exact for one plan, about a second for a 70B model, too slow for the thousands of layouts a
search weighs. :class:`ModelMemory` measures each piece once per microbatch shape instead
(the embedding, one decoder layer of each kind, the head with its loss, by the same
saved-tensor count) and composes a layout's stages from them, with the same microbatches
in flight (the schedule simulation), receive buffers and FSDP2 rules as ``memory_plan``.

What it adds for the layouts ``memory_plan`` is not asked about (stated, not measured):

* tensor parallelism: a layer's parameters and saved activations over ``tp`` under sequence
  parallelism; without it the two norms' inputs stay whole on every tp rank (Korthikanti et
  al., "Reducing Activation Recomputation in Large Transformer Models", 2022, section 4.2);
  the head's logits are counted whole (conservative);
* FSDP2's unsharded working set: with ``reshard_after_forward`` (every schedule but the
  split-backward ones) two layers' full parameters at a time (the one running and the one
  prefetched); without it the whole stage's;
* the process itself (:attr:`~nemo_pp.planning.devices.DeviceSpec.reserved_bytes`);
* one backward per optimizer step (one microbatch, no accumulation): FSDP2 reduce-scatters
  each layer's gradients during it, so a rank keeps their shards and one layer's whole ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from nemo_pp.models.module_tree import find_layer_stack, outer_modules, stage_parameters, text_config
from nemo_pp.planning.cost import balanced_layer_counts, flop_costs
from nemo_pp.planning.layout import Layout
from nemo_pp.planning.memory import (
    _layer_kind,
    _stage_module,
    layer_activation_bytes,
    receive_buffer_slots,
    saved_activation_bytes,
)
from nemo_pp.planning.pipeline import PipelinePlan, make_pipeline_plan, moe_layers_of
from nemo_pp.planning.split import layer_counts
from nemo_pp.planning.timeline import microbatches_in_flight

__all__ = ["LayoutMemory", "ModelMemory", "schedule_plan", "stage_layer_counts"]


@dataclass(frozen=True)
class LayoutMemory:
    """Bytes the fullest pp rank of a layout needs, and what they are.

    Attributes:
        pp_rank: that rank.
        param_bytes, grad_bytes, optimizer_bytes, activation_bytes, recv_buffer_bytes: as
            :class:`~nemo_pp.planning.memory.RankMemory` counts them, per tp and FSDP shard.
        unsharded_bytes: FSDP2's all-gathered parameters at the peak.
        reserved_bytes: the process beyond its tensors.
    """

    pp_rank: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    recv_buffer_bytes: int
    unsharded_bytes: int
    reserved_bytes: int

    @property
    def total_bytes(self) -> int:
        """Everything above, summed."""
        return (self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes
                + self.recv_buffer_bytes + self.unsharded_bytes + self.reserved_bytes)


@functools.lru_cache(maxsize=4096)
def schedule_plan(schedule: str, pp: int, num_stages: int, local_batch_size: int, microbatch_size: int) -> PipelinePlan:
    """The pipeline plan of a schedule alone (no model): stage placement and microbatches.

    Raises:
        ValueError: the schedule cannot run this shape (:func:`~nemo_pp.planning.schedules.check_schedule_constraints`).
    """
    return make_pipeline_plan(None, pp, schedule, pp_microbatch_size=microbatch_size, pp_batch_size=local_batch_size,
                              num_stages=num_stages)


@functools.lru_cache(maxsize=4096)
def _in_flight(plan: PipelinePlan) -> tuple:
    """Per rank, the states ``((stage, microbatches held), ...)`` of its timeline that no other
    state holds at least as much of on every stage (the peak is always one of them)."""
    out = []
    for rank in microbatches_in_flight(plan):
        states = {tuple(sorted(slot.items())) for slot in rank}
        as_dicts = [dict(st) for st in states]
        out.append(tuple(st for st, d in zip(states, as_dicts) if not any(
            o is not d and o != d and all(o.get(k, 0) >= v for k, v in d.items()) for o in as_dicts)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _receive_slots(plan: PipelinePlan):
    return receive_buffer_slots(plan)


class ModelMemory:
    """Piece sizes of one model, measured on the meta device and cached by microbatch shape.

    Args:
        model: the full model on the meta device (``RunPlan.meta_model``), not changed.
        loss_fn: the training loss (the head's piece runs it); default ``MaskedCrossEntropy``.
        optimizer_states: optimizer tensors per parameter (AdamW: 2).
        seq_len: tokens per sample the stages are weighed at (the balanced split).
        split: ``distributed.pipeline.split`` (``uniform`` spreads layers evenly).
    """

    def __init__(self, model: nn.Module, loss_fn=None, optimizer_states: int = 2, seq_len: int = 1024,
                 split: str = "balanced"):
        from nemo_pp.loss.masked_ce import MaskedCrossEntropy
        from nemo_pp.models.moe import expert_modules

        self.model, self.loss_fn = model, loss_fn if loss_fn is not None else MaskedCrossEntropy()
        self.optimizer_states, self.seq_len, self.split = optimizer_states, seq_len, split
        self.config = text_config(model.config)
        self.hidden = self.config.hidden_size
        self.dtype = next(model.parameters()).dtype
        first, last, everywhere = outer_modules(model)
        self._first, self._last = first + everywhere, last + everywhere
        prefix, stack = find_layer_stack(model)
        self._layer_names = [f"{prefix}.{i}" for i in range(len(stack))]
        size = self.dtype.itemsize

        def nbytes(module_fqns) -> int:
            return sum(p.numel() for p in stage_parameters(model, module_fqns)) * size

        self.embedding_bytes, self.head_bytes = nbytes(first), nbytes(last)
        self.layer_bytes = [sum(p.numel() for p in layer.parameters()) * size for layer in stack]
        self.layer_expert_bytes = [sum(p.numel() for m in expert_modules(layer) for p in m.parameters()) * size
                                   for layer in stack]
        self.moe_layers = moe_layers_of(model)
        self._activations: dict = {}
        self._counts: dict = {}
        self._parts = None

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the pieces of ``model`` can be weighed: text decoders, not yet the vision
        towers of a vision-language model (their stage forward needs images)."""
        from nemo_pp.models.vlm import is_vision_language

        return not is_vision_language(model.config)

    @classmethod
    def for_config(cls, model: nn.Module, cfg, seq_len: int) -> ModelMemory:
        """The pieces of ``model`` under the recipe config's loss, optimizer and split."""
        from nemo_pp.config import instantiate
        from nemo_pp.planning.memory import optimizer_states

        return cls(model, instantiate(cfg.loss_fn), optimizer_states(cfg), seq_len, cfg.distributed.pipeline.split)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        return len(self.layer_bytes)

    def activations(self, microbatch_size: int, seq_len: int) -> tuple[int, tuple[int, ...], int]:
        """``(embedding piece, each layer, head + loss piece)`` saved bytes of one microbatch
        of ``[microbatch_size, seq_len]`` (one rank's share of a sequence under cp); cached."""
        key = (microbatch_size, seq_len)
        if key not in self._activations:
            self._activations[key] = self._measure(microbatch_size, seq_len)
        return self._activations[key]

    def _measure(self, mb: int, s: int) -> tuple[int, tuple[int, ...], int]:
        if self._parts is None:  # one layer of each kind stands for all of that kind (meta copies, made once)
            kinds = {}
            for name, layer in zip(self._layer_names, find_layer_stack(self.model)[1]):
                kinds.setdefault(_layer_kind(layer), name)
            self._kind_of = [_layer_kind(layer) for layer in find_layer_stack(self.model)[1]]
            names = list(dict.fromkeys(self._first + list(kinds.values()) + self._last))
            self._parts = (_stage_module(self.model, names), _stage_module(self.model, self._last), list(kinds))
        part, head_part, kinds = self._parts
        hidden = torch.empty(mb, s, self.hidden, dtype=self.dtype, device="meta", requires_grad=True)
        by_kind = dict(zip(kinds, layer_activation_bytes(part, hidden)))
        ids = torch.zeros(mb, s, dtype=torch.long, device="meta")
        head = saved_activation_bytes(head_part, hidden, self.loss_fn, ids)
        return mb * s * 8, tuple(by_kind[k] for k in self._kind_of), head  # the embedding keeps its int64 indices

    def stage_layer_counts(self, num_stages: int, uniform: bool) -> tuple[int, ...]:
        """Layers per stage as the plan splits them (:func:`stage_layer_counts`); cached."""
        key = (num_stages, uniform)
        if key not in self._counts:
            self._counts[key] = stage_layer_counts(self.model.config, self.num_layers, num_stages,
                                                   uniform or self.split == "uniform", self.seq_len,
                                                   tuple(self.moe_layers))
        return self._counts[key]

    def rank_memory(self, layout: Layout, seq_len: int, reserved_bytes: int = 0) -> list[LayoutMemory]:
        """One :class:`LayoutMemory` per pp rank of ``layout`` at ``seq_len`` tokens per sample.

        Raises:
            ValueError: the schedule cannot run the layout's shape.
        """
        plan = schedule_plan(layout.schedule, layout.pp, layout.num_stages, layout.local_batch_size,
                             layout.microbatch_size)
        counts = self.stage_layer_counts(layout.num_stages, layout.layers_per_stage is not None)
        tp, sp, mb = layout.tp, layout.sequence_parallel, layout.microbatch_size
        local = seq_len // layout.cp
        emb_act, layer_act, head_act = self.activations(mb, local)
        x = mb * local * self.hidden * self.dtype.itemsize  # one [mb, S/cp, H] activation
        if tp > 1:
            # sequence parallel: all of a layer over tp; else its two norms' inputs stay whole
            layer_act = tuple(a // tp if sp else (a - 2 * x) // tp + 2 * x for a in layer_act)
        kept = x // tp if sp else x  # what a checkpointed layer keeps: its input
        starts = [sum(counts[:k]) for k in range(len(counts))]
        stage_act, stage_params, stage_expert, recompute, largest = [], [], [], [], []
        for k, n in enumerate(counts):
            idx = range(starts[k], starts[k] + n)
            acts = [layer_act[i] for i in idx]
            act = len(acts) * kept if layout.activation_checkpointing else sum(acts)
            params = sum(self.layer_bytes[i] for i in idx)
            experts = sum(self.layer_expert_bytes[i] for i in idx)
            if k == 0:
                act, params = act + emb_act, params + self.embedding_bytes
            if k == len(counts) - 1:
                act, params = act + head_act, params + self.head_bytes
            stage_act.append(act)
            stage_params.append(params / tp)
            stage_expert.append(experts / tp)
            recompute.append(max(acts) if layout.activation_checkpointing and acts else 0)
            # what FSDP2 all-gathers of a layer: its dense part, and only this ep rank's experts
            largest.append(max((self.layer_bytes[i] - self.layer_expert_bytes[i] * (1 - 1 / layout.ep)
                                for i in idx), default=0) / tp)
        shards = layout.dp_shard * layout.cp if layout.sizes.fsdp_enabled else 1
        buffer = mb * local * self.hidden * self.dtype.itemsize // (tp if sp else 1)
        slots = _receive_slots(plan)
        out = []
        for rank, timeline in enumerate(_in_flight(plan)):
            stages = plan.stages_of(rank)
            peak = max((sum(n * stage_act[s] for s, n in held) for held in timeline), default=0)
            peak += max((recompute[s] for s in stages), default=0)
            held = {s: max((dict(h).get(s, 0) for h in timeline), default=0) for s in stages}
            full = sum(stage_params[s] for s in stages)
            params = full / shards
            experts = sum(stage_expert[s] for s in stages)
            grads = full - (experts - experts / layout.ep)  # an ep rank computes only its experts' gradients
            if shards > 1 and layout.n_microbatches * layout.grad_acc_steps == 1:
                # one backward per step: FSDP2 reduce-scatters each layer's gradients as it goes
                grads = grads / shards + max(largest[s] for s in stages)
            recv = buffer * sum((s != 0) * (slots[s][0] if slots else plan.n_microbatches)
                                + (s != plan.num_stages - 1) * (slots[s][1] if slots else plan.n_microbatches)
                                for s in stages)
            recv -= buffer * sum(held[s] for s in stages if s != 0)  # a held input is its receive buffer
            unsharded = 0.0
            if shards > 1:
                unsharded = full if plan.split_backward else 2 * max(largest[s] for s in stages)
            out.append(LayoutMemory(rank, int(params), int(grads), int(self.optimizer_states * params), int(peak),
                                    int(max(0, recv)), int(unsharded), int(reserved_bytes)))
        return out


def stage_layer_counts(config, num_layers: int, num_stages: int, uniform: bool, seq_len: int,
                       moe_layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Layers per stage: even counts (``layers_per_stage`` set, or ``split: uniform``), else
    the balanced split of the FLOP model at one sample per microbatch (the plan's split
    at the layout's microbatch size weighs the same pieces in the same proportions).

    Raises:
        ValueError: fewer layers than stages.
    """
    if uniform:
        return tuple(layer_counts(num_layers, num_stages))
    return tuple(balanced_layer_counts(flop_costs(config, 1, seq_len, moe_layers=moe_layers), num_stages))
