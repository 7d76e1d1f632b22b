"""The parallel layout's sizes: the five mesh axes resolved from the config and the world size."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ParallelDims", "resolve_parallel_sizes"]


@dataclass(frozen=True)
class ParallelDims:
    """The five mesh axis sizes of a run and what follows from them (torchtitan's
    ``ParallelDims`` is the model): the flattened views the mesh builds, which
    parallelisms are on, and the sequence-length multiple they need.

    Attributes:
        pp, dp_replicate, dp_shard, cp, tp: the axis sizes of ``(pp, dp_replicate,
            dp_shard, cp, tp)``; their product is the world size.
        sequence_parallel: under tp > 1, activations between layers and stages are
            ``[B, S / tp, H]`` sequence shards (Korthikanti et al., 2022).
        ep: expert-parallel ranks: a mixture of experts' experts are sharded over this many
            data-parallel ranks of a stage (``nemo_pp.distributed.expert_parallel``); not a
            mesh axis of its own (the moe_mesh ``(pp, ep_shard, ep)`` views the same ranks).
    """

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    sequence_parallel: bool = False
    ep: int = 1

    @property
    def ep_shard(self) -> int:
        """Data-parallel ranks of a stage that hold the same experts: ``dp_shard * cp / ep``."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel ranks (dp_replicate x dp_shard): each reads its own batch shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        """Total ranks: pp x dp x cp x tp."""
        return self.pp * self.dp * self.cp * self.tp

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 shards over ``dp_shard_cp`` (HSDP: ``(dp_replicate, dp_shard_cp)``) when
        there are several data-parallel or cp ranks: cp ranks hold the same parameters."""
        return self.dp * self.cp > 1

    @property
    def hsdp(self) -> bool:
        """Parameters replicated over ``dp_replicate`` and sharded within each replica."""
        return self.dp_replicate > 1

    @property
    def sequence_shards(self) -> int:
        """Pieces one rank's sequence is cut into between layers: tp under sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def seq_len_divisor(self) -> int:
        """Every batch's sequence length must be a multiple of this: ``2 * cp`` zig-zag chunks
        under context parallelism, each cut into ``sequence_shards`` (1: no rule)."""
        return (2 * self.cp if self.cp > 1 else 1) * self.sequence_shards


def _positive(name: str, value) -> int:
    if value is None:
        return 1
    if int(value) != value or int(value) < 1:
        raise ValueError(f"distributed.{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_parallel_sizes(
    world_size: int,
    pp_size: int | None = 1,
    dp_size: int | None = None,
    dp_replicate_size: int | None = None,
    tp_size: int | None = 1,
    cp_size: int | None = 1,
    sequence_parallel: bool = False,
    ep_size: int | None = 1,
) -> ParallelDims:
    """Resolve the axis sizes from the ``distributed:`` section and the world size.

    ``dp_size`` (None: inferred as ``world_size / (pp*cp*tp)``) is split into
    ``dp_replicate_size`` (default 1, i.e. plain FSDP) x ``dp_shard``.
    ``sequence_parallel`` is recorded as given (``plan_run`` checks it against tp).
    ``ep_size`` experts shards are taken from the dp_shard x cp ranks of a stage (within one
    HSDP replica); the ``dp_shard * cp / ep`` ranks left (``ep_shard``) hold the same experts
    and FSDP2-shard them, replicated over ``dp_replicate``.

    Raises:
        ValueError: sizes that do not multiply to the world size, with the arithmetic; an
            ``ep_size`` that does not divide the dp_shard x cp ranks, or with sequence
            parallelism.
    """
    pp, tp, cp = _positive("pp_size", pp_size), _positive("tp_size", tp_size), _positive("cp_size", cp_size)
    rep = _positive("dp_replicate_size", dp_replicate_size)
    non_dp = pp * cp * tp
    if dp_size is None:
        if world_size % non_dp:
            raise ValueError(
                f"world size {world_size} is not divisible by pp_size*cp_size*tp_size = {pp}*{cp}*{tp} = {non_dp}; "
                f"launch a multiple of {non_dp} processes (torchrun --nproc_per_node) or change distributed.pp_size/"
                "cp_size/tp_size"
            )
        dp = world_size // non_dp
    else:
        dp = _positive("dp_size", dp_size)
        if dp * non_dp != world_size:
            raise ValueError(
                f"pp_size*dp_size*cp_size*tp_size = {pp}*{dp}*{cp}*{tp} = {dp * non_dp} but the world size is "
                f"{world_size}; set distributed.dp_size to null (inferred) or launch {dp * non_dp} processes"
            )
    if dp % rep:
        raise ValueError(
            f"distributed.dp_replicate_size={rep} does not divide the data-parallel size {dp} "
            f"(= world {world_size} / (pp {pp} * cp {cp} * tp {tp}))"
        )
    ep = _positive("ep_size", ep_size)
    if ep > 1:
        if sequence_parallel:
            raise ValueError(
                f"distributed.ep_size={ep} with sequence_parallel: true: the experts would see sequence shards of "
                "tokens the tp ranks share; set distributed.sequence_parallel: false or distributed.ep_size: 1")
        shard = dp // rep * cp
        if shard % ep:
            divisors = [d for d in range(1, shard + 1) if shard % d == 0]
            raise ValueError(
                f"distributed.ep_size={ep} does not divide the data-parallel x cp ranks of a stage's replica, "
                f"{dp // rep} x {cp} = {shard} (world {world_size} / (pp {pp} x tp {tp} x dp_replicate {rep})): the ep "
                f"ranks are taken from them; use one of {divisors}")
    return ParallelDims(pp=pp, dp_replicate=rep, dp_shard=dp // rep, cp=cp, tp=tp,
                        sequence_parallel=bool(sequence_parallel), ep=ep)


