"""The 5D device mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` and its flattened views.

Flattened views (kept as the objects ``_flatten`` returns; slicing them again from
the root mesh is deprecated in torch 2.13):

* ``dp``          = dp_replicate x dp_shard      (data-parallel ranks: each its own batch shard)
* ``dp_shard_cp`` = dp_shard x cp                 (what FSDP2 shards parameters over)
* ``dp_cp``       = dp_replicate x dp_shard x cp  (what the loss is averaged over)

With expert parallelism (``ep`` > 1) a second mesh over the same ranks, the reference's
``moe_mesh`` ``(pp, ep_shard, ep)``: ``ep`` ranks hold different experts of a layer,
``ep_shard`` ranks the same ones (``ep * ep_shard`` = the dp_shard x cp ranks of a stage).
Under tp a trailing axis ``(pp, ep_shard, ep, tp)``: the ranks of one tp group hold the same
tokens (tp shards the attention only), so each dispatches within the ep group of its tp index.
Under HSDP a ``dp_replicate`` axis after ``pp``: ep and ep_shard are taken within a replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nemo_pp._torch_compat import flatten_mesh, slice_with_flattened
from nemo_pp.planning.dims import ParallelDims

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
MOE_MESH_DIM_NAMES = ("pp", "ep_shard", "ep")



@dataclass
class MeshBundle:
    """The root 5D mesh and its flattened views."""

    world: DeviceMesh
    sizes: ParallelDims
    dp: DeviceMesh
    dp_shard_cp: DeviceMesh
    dp_cp: DeviceMesh
    moe: DeviceMesh | None = None

    @property
    def hsdp(self) -> DeviceMesh:
        """HSDP's 2D mesh: replicate over ``dp_replicate``, shard over ``dp_shard`` x ``cp``."""
        if self.sizes.cp == 1:
            return self.world["dp_replicate", "dp_shard"]
        return slice_with_flattened(self.world, ("dp_replicate", "dp_shard_cp"))

    @property
    def ep(self) -> DeviceMesh | None:
        """The 1-D ``ep`` sub-mesh of :attr:`moe` the experts are sharded over (None at ep 1)."""
        return self.moe["ep"] if self.moe is not None else None

    @property
    def ep_shard_axis_names(self) -> tuple[str, ...] | None:
        """The moe_mesh axes over which ranks hold the same experts (the reference's
        ``ep_shard_axis_names``): ``("ep_shard",)``, with ``"dp_replicate"`` first under HSDP."""
        if self.moe is None:
            return None
        return tuple(n for n in ("dp_replicate", "ep_shard") if n in self.moe.mesh_dim_names)

    @property
    def pp(self) -> DeviceMesh:
        """The 1D ``pp`` sub-mesh."""
        return self.world["pp"]

    @property
    def pp_rank(self) -> int:
        """This rank's index on the ``pp`` axis (its pipeline position), in ``[0, sizes.pp)``."""
        return self.world.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        """This rank's index on the flattened ``dp`` view (dp_replicate x dp_shard): its batch shard."""
        return self.dp.get_local_rank()

    @property
    def writes_stage_files(self) -> bool:
        """True on one rank per pp rank (dp, cp and tp rank 0): it writes that stage's
        files when every rank holds (or has gathered) the same tensors."""
        w = self.world
        return self.dp_rank == 0 and w.get_local_rank("cp") == 0 and w.get_local_rank("tp") == 0


def build_device_mesh(device_type: str, sizes: ParallelDims) -> MeshBundle:
    """Create the 5D mesh for ``device_type`` ("cpu" -> gloo groups, "cuda" -> nccl), and the
    moe_mesh under expert parallelism."""
    shape = (sizes.pp, sizes.dp_replicate, sizes.dp_shard, sizes.cp, sizes.tp)
    world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    dp = flatten_mesh(world["dp_replicate", "dp_shard"], "dp")
    dp_shard_cp = flatten_mesh(world["dp_shard", "cp"], "dp_shard_cp")
    dp_cp = flatten_mesh(world["dp_replicate", "dp_shard", "cp"], "dp_cp")
    moe = None
    if sizes.ep > 1:  # the same ranks in the same order: a replica's dp_shard x cp ranks are ep_shard x ep
        shape, names = (sizes.pp, sizes.ep_shard, sizes.ep), MOE_MESH_DIM_NAMES
        if sizes.dp_replicate > 1:  # HSDP: the replicas hold the same experts too
            shape, names = (sizes.pp, sizes.dp_replicate, *shape[1:]), ("pp", "dp_replicate", *names[1:])
        if sizes.tp > 1:  # tp stays innermost: each tp rank dispatches within the ep group of its tp index
            shape, names = (*shape, sizes.tp), (*names, "tp")
        moe = init_device_mesh(device_type, shape, mesh_dim_names=names)
    return MeshBundle(world=world, sizes=sizes, dp=dp, dp_shard_cp=dp_shard_cp, dp_cp=dp_cp, moe=moe)
