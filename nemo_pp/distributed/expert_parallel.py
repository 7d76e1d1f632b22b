"""Expert parallelism: a mixture of experts' experts sharded over the ``ep`` ranks of a
stage, each token sent to the rank that holds its expert and back by all-to-all.

The ``ep`` ranks are data-parallel ranks of a stage (the reference's moe_mesh
``(pp, ep_shard, ep)`` and torchtitan's ``ExpertParallel`` take them from there too): each
holds a different batch, so every rank routes its own tokens and the experts of a layer
see the tokens of all ``ep`` ranks. The router is an ordinary (replicated or FSDP-sharded)
parameter, so routing is exactly the unsplit model's; only where the experts run changes.

Per MoE layer, for ``N`` tokens with ``top_k`` choices each (dropless: every assignment
is computed, none is capped):

1. the ``N * top_k`` assignments are sorted by expert, so by the rank that holds it;
2. one all-to-all of the counts, then one of the token states (``[N * top_k, H]``) and one
   of each assignment's local expert index;
3. each rank runs its ``E / ep`` experts on what it received, sorted by expert: two grouped
   GEMMs where the model uses transformers' ``grouped_mm`` experts (:func:`_grouped_gemm`),
   else one matmul pair per expert; a rank whose experts received nothing still runs the
   backward all-to-alls, which every rank of the group must join;
4. the outputs go back by the reverse all-to-all and are weighted and summed on the rank
   that routed them, so the router's gradient stays local.

The token all-to-alls are ``torch.distributed.nn.functional.all_to_all_single``, which
autograd differentiates (its backward is the reverse all-to-all). The expert weights are
DTensors ``Shard(0)`` over the ep mesh: DCP saves them by global shape (a checkpoint
resumes at another ep size or without ep), ``full_tensor`` gathers them for the export, and
the grad-norm reduces them over the mesh like any other DTensor group. FSDP2 leaves them out
(``ignored_params``): at ``ep == dp`` no two ranks hold the same expert, so no gradient is
reduced.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from nemo_pp.models.moe import EXPERT_WEIGHTS, expert_modules

__all__ = ["ExpertParallel", "expert_parallel_params"]

def expert_parallel_params(model: nn.Module) -> set[nn.Parameter]:
    """The expert weights :class:`ExpertParallel` sharded (FSDP2 must leave them alone)."""
    return {p for m in model.modules() if getattr(m, "_nemo_pp_ep_group", None) is not None
            for p in m.parameters(recurse=False)}


class ExpertParallel:
    """A parallelize_fn step: shard every experts module of a stage over ``ep_mesh`` and
    route its tokens by all-to-all. Run it after the weights are loaded and before FSDP2.

    Args:
        ep_mesh: the 1-D ep mesh (this rank's data-parallel group when ``ep == dp``).
    """

    def __init__(self, ep_mesh):
        self.ep_mesh = ep_mesh

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = self.ep_mesh
        for module in expert_modules(model):
            if getattr(module, "_nemo_pp_ep_group", None) is not None:
                continue  # idempotent
            for name in EXPERT_WEIGHTS:
                p = getattr(module, name)
                # every rank holds the full tensor (loaded): each keeps its own slice, no communication
                local = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None)
                setattr(module, name, nn.Parameter(local, requires_grad=p.requires_grad))
            module._nemo_pp_ep_group = mesh.get_group()
            module._nemo_pp_ep_size = mesh.size()
            module._nemo_pp_ep_rank = mesh.get_local_rank()
            module.forward = types.MethodType(_ep_forward, module)
        return model


def _grouped_gemm(experts: nn.Module, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the local experts run as two grouped GEMMs (``torch.nn.functional.grouped_mm``
    over the rows sorted by expert) rather than one matmul pair per expert: where the model
    asks for transformers' ``grouped_mm`` experts (its default) and the kernel takes the
    shapes. torch's kernel needs every row stride a multiple of 16 bytes (hidden, intermediate
    and twice the intermediate size, in the compute dtype), as transformers checks before it
    falls back to a loop. Both give the same numbers (tested)."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if impl != "grouped_mm" or not hasattr(nn.functional, "grouped_mm"):
        return False
    size = rows.element_size()
    return all(n * size % 16 == 0 for n in (*gate_up.shape[1:], down.shape[2]))


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x``."""
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


def _ep_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The experts' forward under expert parallelism (the signature of transformers' experts
    modules: ``hidden_states: [N, H]``, ``top_k_index: [N, k]`` int64, ``top_k_weights: [N, k]``)."""
    group, ep = self._nemo_pp_ep_group, self._nemo_pp_ep_size
    n, hidden = hidden_states.shape
    k = top_k_index.shape[1]
    per_rank = self.num_experts // ep
    experts = top_k_index.reshape(-1)
    order = torch.argsort(experts, stable=True)  # by expert, hence by destination rank
    sorted_experts = experts[order]
    tokens = torch.arange(n, device=hidden_states.device).repeat_interleave(k)[order]
    send_counts = torch.bincount(sorted_experts // per_rank, minlength=ep)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    local_expert = (sorted_experts - (sorted_experts // per_rank) * per_rank).contiguous()
    recv_expert = local_expert.new_empty(sum(recv))
    dist.all_to_all_single(recv_expert, local_expert, recv, send, group=group)
    received = _all_to_all(hidden_states[tokens], recv, send, group)

    gate_up = self.gate_up_proj.to_local().to(received.dtype)
    down = self.down_proj.to_local().to(received.dtype)
    # the rows of each local expert together (they arrive grouped by source rank)
    by_expert = torch.argsort(recv_expert, stable=True)
    rows = received[by_expert]
    counts = torch.bincount(recv_expert, minlength=per_rank)
    if rows.shape[0] == 0:
        # a rank that received no row keeps ``received`` and its expert weights in the graph anyway:
        # its backward must join the two reverse all-to-alls the other ranks run (or they wait for
        # it forever), and its experts need a (zero) gradient for the grad norm's DTensor reductions
        grouped = rows * 0 + (gate_up.sum() + down.sum()) * 0
    elif _grouped_gemm(self, rows, gate_up, down):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = nn.functional.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        grouped = nn.functional.grouped_mm(self.act_fn(gate) * up, down.transpose(-2, -1), offs=offsets)
    else:
        outs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            if chunk.shape[0]:
                gate, up = nn.functional.linear(chunk, gate_up[e]).chunk(2, dim=-1)
                outs.append(nn.functional.linear(self.act_fn(gate) * up, down[e]))
        grouped = torch.cat(outs)
    out = grouped[torch.argsort(by_expert)]
    back = _all_to_all(out, send, recv, group)
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(back.dtype)
    combined = torch.zeros(n, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    return combined.index_add(0, tokens, (back * weights).to(hidden_states.dtype))
