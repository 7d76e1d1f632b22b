"""One optimizer step and the validation loss, through the pipeline at every pp size.

Loss normalisation (docs/architecture.md, "One optimizer step"): the loss function reduces by SUM, and after all
microbatches and gradient-accumulation batches every gradient is divided by the
number of label tokens of the whole step, summed over the data-parallel ranks.
That makes the step's gradient exactly the gradient of the token-mean loss of the
global batch, independent of how it was split into microbatches and batches.
Under context parallelism every cp rank of a data-parallel rank holds the same batch,
runs its own slice of each sequence and sums the loss of that slice's label tokens; the
label-token count is taken from the whole batch, so the division is the same.

The finite-step guard: the optimizer steps only when the step's loss and global gradient
norm are finite. Both are already reduced over every rank for the step's metrics and
clipping, so every rank takes the same decision with no collective of its own (the norm is
NaN or inf wherever any rank's gradient is); torchtitan checks the same before its step.
A skipped step leaves weights, optimizer state and learning rate as they were.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from nemo_pp._torch_compat import run_schedule
from nemo_pp.distributed.grads import align_grad_placements, clip_grads_with_norm, divide_grads
from nemo_pp.loss import IGNORE_INDEX
from nemo_pp.models.vlm import pipeline_inputs


def _label_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def _input_tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


def _nonpad_tokens(batch: dict) -> int:
    """Tokens before padding (``SFTCollator``'s ``num_tokens``), else all of them."""
    return int(batch["num_tokens"].sum()) if "num_tokens" in batch else batch["input_ids"].numel()


def _all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


class TrainEngine:
    """Runs forward/backward, normalisation, clipping and the optimizer for one rank's stages.

    ``pp_size`` 1 is a one-stage pipeline, so every layout takes the same path.

    Args:
        autopipeline: the built ``AutoPipeline`` (its parts, schedule, tied embedding).
        device: where batches go.
        dp_group: data-parallel process group (None: no data parallelism).
        max_grad_norm: clip threshold (None: no clipping, the norm is still reported).
        cp: the context-parallel axis (:class:`~nemo_pp.distributed.context_parallel.ContextParallel`),
            None without context parallelism: each batch is sliced along the sequence for it.
    """

    def __init__(self, autopipeline, device: torch.device, dp_group=None, max_grad_norm: float | None = 1.0,
                 cp=None):
        self.ap = autopipeline
        self.parts = list(autopipeline.parts)
        self.device = device
        self.dp_group = dp_group
        self.max_grad_norm = max_grad_norm
        self.pp_group = autopipeline.pp_group
        self.cp = cp if cp is not None and cp.size > 1 else None

    # ----------------------------------------------------------------- passes
    def _forward(self, batch: dict, train: bool) -> torch.Tensor:
        """Summed loss of one batch on this rank (0 on pp ranks without the last stage)."""
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        info = self.ap.info
        losses: list | None = [] if info.has_last_stage else None
        if self.cp is None:
            # packed rows: every stage gets its microbatch's positions (they also shape the mask)
            kwargs = {"position_ids": batch["position_ids"].to(self.device)} if "position_ids" in batch else {}
            sliced = contextlib.nullcontext((ids, labels, kwargs.get("position_ids")))
        else:
            sliced = self.cp.sharded(ids, labels)
        with sliced as (ids, labels, position_ids):
            # under cp the stages exchange this rank's slice: static P2P shapes use its length
            self.ap.update_seq_len(ids.shape[1])
            args = (ids,) if info.has_first_stage else ()
            target = labels if info.has_last_stage else None
            kwargs = {"position_ids": position_ids} if position_ids is not None else {}
            # a vision-language batch: images to the first stage, 3-D rotary positions to all
            images, chunk_dims = pipeline_inputs(self.parts[0], batch, info.has_first_stage, self.device)
            kwargs.update(images)
            if self.ap.head_computes_loss:  # the last stage's forward computes the loss (FusedLinearCrossEntropy)
                kwargs["labels"] = labels
            run_schedule(info.schedule, *args, train=train, target=target, losses=losses, chunk_dims=chunk_dims,
                         **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).sum()

    def _dp_total(self, count: int) -> torch.Tensor:
        return _all_reduce_sum(torch.tensor(float(count), device=self.device), self.dp_group)

    def _global_loss(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> float:
        # the last pp rank holds the loss; others add 0, so a sum is a broadcast; cp ranks
        # hold the losses of their slices: summed with the dp ranks' in one all-reduce
        _all_reduce_sum(loss_sum, self.dp_group if self.cp is None else self.cp.loss_group)
        _all_reduce_sum(loss_sum, self.pp_group)
        return float(loss_sum / tokens.clamp(min=1))

    # ------------------------------------------------------------------ train
    def train_step(self, batches: Sequence[dict], optimizers, lr_schedulers) -> dict:
        """One optimizer step over ``batches`` (gradient accumulation); returns metrics.

        Returns:
            ``{"loss": token-mean LM loss, "aux_loss": mean router load-balancing loss (unscaled; None
            without ``output_router_logits``, see :mod:`nemo_pp.models.moe`), "expert_tokens": None for a
            dense model, else ``[MoE layers, E]`` float64 top-k assignments of the step over all ranks,
            "grad_norm": global norm before clipping,
            "num_label_tokens": int, "tokens": int input tokens (padding included) over all dp ranks,
            "nonpad_tokens": the same without padding (the batches' ``num_tokens``), "step_time_s": seconds,
            "skipped": True when the loss or the norm was not finite and the optimizer did not step,
            "nonfinite": None, or (skipped steps) where it was: ``{"loss_stages": [...], "grad_stages": [...]}``,
            global stage indices whose loss / gradients held NaN or inf}``.
        """
        start = time.perf_counter()
        for part in self.parts:
            part.train()
        # label tokens (the loss divisor), input tokens and non-padding tokens of the whole
        # step over all dp ranks: one all-reduce, known before the first forward
        counts = _all_reduce_sum(torch.tensor(
            [float(sum(f(b) for b in batches)) for f in (_label_tokens, _input_tokens, _nonpad_tokens)],
            device=self.device), self.dp_group)
        tokens = counts[0]
        router = self.ap.router_loss
        sequences = self._sequences(batches)
        if router is not None:
            router.begin_step(float(tokens.clamp(min=1)), sequences)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # FSDP reduce-scatters once per optimizer step (after the last batch) when deferring
            self.ap.set_grad_sync(i == len(batches) - 1 or not self.ap.plan.defer_fsdp_grad_sync)
            loss_sum += self._forward(batch, train=True)
        align_grad_placements(p for part in self.parts for p in part.parameters())
        divide_grads(self.parts, float(tokens.clamp(min=1)))
        self.ap.sync_tied_grads()
        norm = self.ap.clip_grad_norm(None)  # the norm only: clipping by a NaN norm would hide where it came from
        grad_norm = float(norm)
        local_loss = loss_sum.clone()
        loss = self._global_loss(loss_sum, tokens)  # before the optimizer: the guard reads it
        aux_loss, expert_tokens = (None, None) if router is None else router.stats(
            sequences, (self.dp_group, self.pp_group))
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and (aux_loss is None or math.isfinite(aux_loss))
        nonfinite = None if finite else self._nonfinite_stages(local_loss)
        if finite:
            clip_grads_with_norm((p for part in self.parts for p in part.parameters()), self.max_grad_norm, norm)
        for opt in optimizers:
            if finite:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if finite and router is not None:
            router.update_gate_bias(expert_tokens)  # DeepSeek-V3's routing bias, after the step it routed
        if finite:
            for sched in lr_schedulers:
                sched.step()
        return {
            "loss": loss,
            "aux_loss": aux_loss,
            "expert_tokens": expert_tokens,
            "grad_norm": grad_norm,
            "skipped": not finite,
            "nonfinite": nonfinite,
            "num_label_tokens": int(tokens),
            "tokens": int(counts[1]),
            "nonpad_tokens": int(counts[2]),
            "step_time_s": time.perf_counter() - start,
        }

    def _sequences(self, batches: Sequence[dict]) -> int:
        """The step's sequences (batch rows) over all data-parallel ranks: what the router's
        auxiliary loss averages over (every dp rank's batches have the same rows)."""
        dp = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        return sum(b["input_ids"].shape[0] for b in batches) * dp

    def _nonfinite_stages(self, local_loss: torch.Tensor) -> dict:
        """Which stages held a non-finite loss or gradient: one MAX all-reduce over all
        ranks, run only on a skipped step (every rank skips it alike).

        Args:
            local_loss: this rank's summed loss before any reduction (0 off the last stage).
        """
        n = self.ap.plan.num_stages
        flags = torch.zeros(2, n, device=self.device)
        for stage, part in zip(self.ap.info.stages or [], self.parts):
            grads = [p.grad for p in part.parameters() if p.grad is not None]
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            flags[1, stage.stage_index] = float(any(not bool(torch.isfinite(g).all()) for g in local))
            if stage.is_last:
                flags[0, stage.stage_index] = float(not bool(torch.isfinite(local_loss)))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {"loss_stages": flags[0].nonzero().flatten().tolist(),
                "grad_stages": flags[1].nonzero().flatten().tolist()}

    # ------------------------------------------------------------- validation
    @torch.no_grad()
    def validation_loss(self, batches: Iterable[dict]) -> float:
        """Token-mean loss over ``batches`` (every rank must pass the same number)."""
        for part in self.parts:
            part.eval()
        loss_sum = torch.zeros((), device=self.device)
        count = 0
        for batch in batches:
            loss_sum += self._forward(batch, train=False)
            count += _label_tokens(batch)
        return self._global_loss(loss_sum, self._dp_total(count))
