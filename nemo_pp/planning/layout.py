"""One candidate parallel layout of a run, and the config overrides that select it."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_pp.planning.dims import ParallelDims

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Everything :mod:`nemo_pp.planning.search` chooses for a run.

    Attributes:
        pp, dp_replicate, dp_shard, cp, tp: the mesh axis sizes (their product is the world size).
        ep: expert-parallel ranks (1 for a dense model).
        sequence_parallel: activations between layers are sequence shards over tp.
        schedule: torch's schedule name (``1F1B``, ``Interleaved1F1B``, ``ZBVZeroBubble``, ...).
        num_stages: (virtual) stages over all pp ranks.
        layers_per_stage: ``distributed.pipeline.layers_per_stage`` that gives ``num_stages``
            (None: the schedule's default stage count, split by the balanced FLOP model).
        microbatch_size: samples per microbatch.
        local_batch_size: samples per ``schedule.step`` on one dp rank (``dataloader.batch_size``).
        grad_acc_steps: batches accumulated per optimizer step.
        activation_checkpointing: decoder layers recompute their activations in backward.
        pad_seq_len_divisible: the collators' padding multiple the layout needs (sequence
            parallelism: a multiple of tp), or None to keep the config's.
    """

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    sequence_parallel: bool
    schedule: str
    num_stages: int
    layers_per_stage: int | None
    microbatch_size: int
    local_batch_size: int
    grad_acc_steps: int
    activation_checkpointing: bool
    pad_seq_len_divisible: int | None = None

    @property
    def sizes(self) -> ParallelDims:
        """The mesh axis sizes as the plan holds them (``dp``, ``world_size``, ``fsdp_enabled``, ...)."""
        return ParallelDims(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp, self.sequence_parallel, self.ep)

    @property
    def stages_per_rank(self) -> int:
        """Virtual stages per pp rank."""
        return self.num_stages // self.pp

    @property
    def n_microbatches(self) -> int:
        """Microbatches per ``schedule.step``."""
        return self.local_batch_size // self.microbatch_size

    def describe(self) -> str:
        """``pp 4 (1F1B, v 1) x dp 2 (replicate 1) x cp 1 x tp 2 +SP x ep 1, mb 1 x 8, acc 1, AC``."""
        dp = f"dp {self.sizes.dp}" + (f" (replicate {self.dp_replicate})" if self.dp_replicate > 1 else "")
        return (f"pp {self.pp} ({self.schedule}, v {self.stages_per_rank}) x {dp} x cp {self.cp} x tp {self.tp}"
                + (" +SP" if self.sequence_parallel else "") + (f" x ep {self.ep}" if self.ep > 1 else "")
                + f", mb {self.microbatch_size} x {self.n_microbatches}, acc {self.grad_acc_steps}"
                + (", AC" if self.activation_checkpointing else ""))

    def overrides(self, global_batch_size: int) -> list[str]:
        """The recipe's command-line overrides that select this layout (``--key value`` pairs,
        flattened), for a run of ``world_size`` processes and ``global_batch_size`` samples
        per optimizer step."""
        pairs = {
            "distributed.pp_size": self.pp, "distributed.dp_size": self.sizes.dp,
            "distributed.dp_replicate_size": self.dp_replicate, "distributed.cp_size": self.cp,
            "distributed.tp_size": self.tp, "distributed.ep_size": self.ep,
            "distributed.sequence_parallel": str(self.sequence_parallel).lower(),
            "distributed.activation_checkpointing": str(self.activation_checkpointing).lower(),
            "distributed.pipeline.pp_schedule": self.schedule,
            "distributed.pipeline.layers_per_stage": "null" if self.layers_per_stage is None else self.layers_per_stage,
            "distributed.pipeline.pp_microbatch_size": self.microbatch_size,
            "dataloader.batch_size": self.local_batch_size, "step_scheduler.global_batch_size": global_batch_size,
        }
        if self.pad_seq_len_divisible is not None:
            pairs["dataloader.pad_seq_len_divisible"] = self.pad_seq_len_divisible
        return [part for key, value in pairs.items() for part in (f"--{key}", str(value))]
