"""The 5D device mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` and its flattened views.

Flattened views (kept as the objects ``_flatten`` returns; slicing them again from
the root mesh is deprecated in torch 2.13):

* ``dp``          = dp_replicate x dp_shard      (data-parallel ranks: each its own batch shard)
* ``dp_shard_cp`` = dp_shard x cp                 (what FSDP2 shards parameters over)
* ``dp_cp``       = dp_replicate x dp_shard x cp  (what the loss is averaged over)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ._torch_compat import flatten_mesh, slice_with_flattened

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelSizes:
    """Resolved sizes of the five mesh axes; their product is the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp


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
) -> ParallelSizes:
    """Resolve the axis sizes from the ``distributed:`` section and the world size.

    ``dp_size`` (None: inferred as ``world_size / (pp*cp*tp)``) is split into
    ``dp_replicate_size`` (default 1, i.e. plain FSDP) x ``dp_shard``.

    Raises:
        ValueError: sizes that do not multiply to the world size, with the arithmetic.
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
    return ParallelSizes(pp=pp, dp_replicate=rep, dp_shard=dp // rep, cp=cp, tp=tp)


@dataclass
class MeshBundle:
    """The root 5D mesh and its flattened views."""

    world: DeviceMesh
    sizes: ParallelSizes
    dp: DeviceMesh
    dp_shard_cp: DeviceMesh
    dp_cp: DeviceMesh

    @property
    def hsdp(self) -> DeviceMesh:
        """HSDP's 2D mesh: replicate over ``dp_replicate``, shard over ``dp_shard`` x ``cp``."""
        if self.sizes.cp == 1:
            return self.world["dp_replicate", "dp_shard"]
        return slice_with_flattened(self.world, ("dp_replicate", "dp_shard_cp"))

    @property
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def pp_rank(self) -> int:
        return self.world.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def writes_stage_files(self) -> bool:
        """True on one rank per pp rank (dp, cp and tp rank 0): it writes that stage's
        files when every rank holds (or has gathered) the same tensors."""
        w = self.world
        return self.dp_rank == 0 and w.get_local_rank("cp") == 0 and w.get_local_rank("tp") == 0


def build_device_mesh(device_type: str, sizes: ParallelSizes) -> MeshBundle:
    """Create the 5D mesh for ``device_type`` ("cpu" -> gloo groups, "cuda" -> nccl)."""
    shape = (sizes.pp, sizes.dp_replicate, sizes.dp_shard, sizes.cp, sizes.tp)
    world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    dp = flatten_mesh(world["dp_replicate", "dp_shard"], "dp")
    dp_shard_cp = flatten_mesh(world["dp_shard", "cp"], "dp_shard_cp")
    dp_cp = flatten_mesh(world["dp_replicate", "dp_shard", "cp"], "dp_cp")
    return MeshBundle(world=world, sizes=sizes, dp=dp, dp_shard_cp=dp_shard_cp, dp_cp=dp_cp)
