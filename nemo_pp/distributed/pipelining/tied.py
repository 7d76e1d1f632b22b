"""Tied word embeddings under pipeline parallelism (NeMo AutoModel rejects them).

When ``lm_head.weight is model.embed_tokens.weight`` (SmolLM2, Llama-3.2-1B), the
first stage holds the embedding and the last stage a copy of it as ``lm_head``.
Each copy only sees its own part of the gradient; the true gradient of the tied
parameter is their sum. :class:`TiedEmbeddingSync` sums them across the two pp
ranks (or in place when one rank holds both, as in V schedules) before the
optimizer step, so both copies receive the same update and stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _weight_of(part: nn.Module, fqn: str) -> nn.Parameter | None:
    """The parameter ``fqn`` of ``part``, through the module that owns it, so a head that
    LoRA wrapped (its weight now at ``lm_head.base_layer.weight``) is still found."""
    module_fqn, _, name = fqn.rpartition(".")
    try:
        module = part.get_submodule(module_fqn)
    except AttributeError:
        return None
    weight = getattr(module, name, None)
    return weight if isinstance(weight, nn.Parameter) else None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class TiedEmbeddingSync:
    """Sums the gradients of the two copies of a tied embedding.

    Args:
        pp_mesh_tensor: global ranks with the pp axis last, ``[..., pp]``: one pair group
            (first-stage rank, last-stage rank) is created per pp group, on every rank, as
            ``new_group`` requires.
        model_parts: this rank's stage modules.
        stage_ids: their global stage indices.
        num_stages: total stages.
        first_stage_pp_rank / last_stage_pp_rank: pp ranks holding the first and the last
            stage (from the plan: a CSV may put stage 0 anywhere); equal ranks mean no
            group, the sum is local.
        embed_fqn / head_fqn: parameter FQNs of the two copies.
    """

    def __init__(
        self,
        pp_mesh_tensor: torch.Tensor,
        model_parts: list[nn.Module],
        stage_ids: list[int],
        num_stages: int,
        first_stage_pp_rank: int,
        last_stage_pp_rank: int,
        embed_fqn: str = "model.embed_tokens.weight",
        head_fqn: str = "lm_head.weight",
    ):
        self.embed = self.head = None
        for part, sid in zip(model_parts, stage_ids):
            if sid == 0:
                self.embed = _weight_of(part, embed_fqn)
            if sid == num_stages - 1:
                self.head = _weight_of(part, head_fqn)
        # pp_mesh_tensor: [..., pp] global ranks, one row per pp group
        rows = pp_mesh_tensor.reshape(-1, pp_mesh_tensor.shape[-1])
        self.group = None
        me = dist.get_rank()
        if last_stage_pp_rank != first_stage_pp_rank:
            for row in rows.tolist():
                pair = sorted((row[first_stage_pp_rank], row[last_stage_pp_rank]))
                group = dist.new_group(pair)
                if me in pair:
                    self.group = group

    @property
    def duplicate(self) -> nn.Parameter | None:
        """The copy to leave out of a global grad norm (the tied parameter counts once)."""
        return self.head

    @property
    def frozen(self) -> bool:
        """The tied weight is not trained (LoRA freezes it on every rank alike): nothing to sum."""
        return not any(p is not None and p.requires_grad for p in (self.embed, self.head))

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Make both copies' ``.grad`` the sum of the two (call after backward, before clipping)."""
        from nemo_pp.distributed.grads import align_grad_placements

        if self.frozen:
            return
        # the copies' shards must match: a vocab-parallel embedding's grad comes out Replicate
        align_grad_placements([p for p in (self.embed, self.head) if p is not None])
        if self.embed is not None and self.head is not None:
            total = _local(self.embed.grad) + _local(self.head.grad)
            _local(self.embed.grad).copy_(total)
            _local(self.head.grad).copy_(total)
            return
        mine = self.embed if self.embed is not None else self.head
        if mine is None or self.group is None:
            return
        if mine.grad is None:
            mine.grad = torch.zeros_like(mine)
        dist.all_reduce(_local(mine.grad), op=dist.ReduceOp.SUM, group=self.group)

    @torch.no_grad()
    def max_abs_diff(self) -> float:
        """Largest |embed - lm_head| over the two copies (0.0 when in sync); collective."""
        if self.embed is not None and self.head is not None:
            return float((_local(self.embed) - _local(self.head)).abs().max())
        mine = self.embed if self.embed is not None else self.head
        if mine is None or self.group is None:
            return 0.0
        other = _local(mine).detach().clone()
        sign = 1.0 if self.embed is not None else -1.0
        other.mul_(sign)
        dist.all_reduce(other, op=dist.ReduceOp.SUM, group=self.group)  # embed - head
        return float(other.abs().max())
