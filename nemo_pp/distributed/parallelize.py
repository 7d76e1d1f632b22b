"""Per-stage parallelization (``ParallelizeFnProtocol`` callables), in torchtitan's order:
tensor parallelism over the ``tp`` axis, activation checkpointing of the decoder layers,
then FSDP2 (or HSDP) over the data-parallel ranks."""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from nemo_pp._peft.lora import LoraParallelizer
from nemo_pp.distributed.compile import RegionalCompile
from nemo_pp.distributed.context_parallel import ContextParallelizer
from nemo_pp.distributed.expert_parallel import ExpertParallel, expert_parallel_params
from nemo_pp.distributed.tensor_parallel import tensor_parallelize
from nemo_pp.models.module_tree import decoder_layers


def checkpoint_decoder_layers(model: nn.Module, required: bool = True) -> int:
    """Recompute every decoder layer's activations in backward instead of keeping them.

    Each layer's ``forward`` runs under ``torch.utils.checkpoint.checkpoint`` with
    ``use_reentrant=False`` (the variant torch recommends; it takes keyword arguments and
    composes with FSDP2's hooks, which stay on the module's ``__call__``). The module is
    not wrapped, so parameter FQNs do not change. Idempotent.

    Args:
        model: a model or one stage of it.
        required: raise when there is no layer stack (the whole model); False for a stage,
            which may hold no layers (``lm_head`` alone).

    Returns:
        the number of layers checkpointed.

    Raises:
        ValueError: ``required`` and the model has no decoder layer stack (names
            ``distributed.activation_checkpointing``).
    """
    try:
        layers = decoder_layers(model)
    except ValueError as exc:
        if not required:
            return 0
        raise ValueError(f"distributed.activation_checkpointing: {exc}") from None
    for layer in layers:
        if not getattr(layer.forward, "_nemo_pp_checkpointed", False):
            forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
            forward._nemo_pp_checkpointed = True
            layer.forward = forward
    return len(layers)


class ActivationCheckpointing:
    """A parallelize_fn that only checkpoints the decoder layers (no data parallelism)."""

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        checkpoint_decoder_layers(model, required=False)
        return model


class FSDP2Parallelizer:
    """Shards each decoder layer and then the whole part with ``fully_shard``, after
    checkpointing the layers when ``activation_checkpointing`` is set. With ``mp_policy``
    (torch's ``MixedPrecisionPolicy``) the sharded fp32 master weights are cast to
    ``param_dtype`` for compute and gradients reduced in ``reduce_dtype``.

    The mesh is ``dp_shard_cp`` (FSDP) or ``(dp_replicate, dp_shard_cp)`` (HSDP): cp
    ranks hold the same parameters and each computes the gradient of its own sequence
    slice, so FSDP2 shards over them too and its reduce-scatter sums their gradients.
    Gradients are SUMMED over data-parallel ranks (divide factor 1): the recipe divides
    by the global label-token count itself. Split-backward schedules
    (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) need
    ``reshard_after_forward=False`` or grads come out None or wrong (docs/architecture.md, "Measured torch facts").
    """

    def __init__(self, mesh_bundle, reshard_after_forward: bool = True, activation_checkpointing: bool = False,
                 mp_policy: MixedPrecisionPolicy | None = None):
        self.mesh_bundle = mesh_bundle
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.mp_policy = mp_policy

    def _fsdp_mesh(self):
        b = self.mesh_bundle
        if b.sizes.dp_replicate > 1:
            return b.hsdp
        return b.dp_shard_cp

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, *, pp_enabled: bool = False, dp_axis_names=("dp",), **_):
        if self.activation_checkpointing:
            checkpoint_decoder_layers(model, required=False)
        mesh = self._fsdp_mesh()
        kwargs = dict(mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        if self.mp_policy is not None:
            kwargs["mp_policy"] = self.mp_policy
        self._shard_experts(model, kwargs)
        try:
            layers = decoder_layers(model)
        except ValueError:  # a stage without layers (lm_head alone): the part is one FSDP unit
            layers = []
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
                # plain SUM collectives: a factor without this becomes PREMUL_SUM, which gloo lacks
                module.set_force_sum_reduction_for_comms(True)
        return model

    def _shard_experts(self, model: nn.Module, kwargs: dict) -> None:
        """Experts already sharded over ``ep`` (:class:`ExpertParallel`): at ``ep_shard`` 1
        without HSDP no two ranks of a stage hold the same expert, so FSDP2 leaves them out;
        otherwise each experts module is its own FSDP2 unit over ``moe_mesh["ep_shard"]`` (the
        ranks holding the same experts; HSDP over ``("dp_replicate", "ep_shard")``), which the
        layer's unit then skips, as torchtitan shards them. FSDP2 composes the meshes of one
        root (ep_shard, ep) and shards dim 0 again (``_StridedShard``), so DCP and
        ``full_tensor`` still see the global expert tensors."""
        sharded = expert_parallel_params(model)
        if not sharded:
            return
        b = self.mesh_bundle
        if b.sizes.ep_shard == 1 and b.sizes.dp_replicate == 1:
            kwargs["ignored_params"] = sharded
            return
        # HSDP: replicated over dp_replicate (their gradients all-reduced), sharded over ep_shard
        mesh = b.moe[b.ep_shard_axis_names]
        for module in model.modules():
            if getattr(module, "_nemo_pp_ep_group", None) is not None:
                fully_shard(module, **{**kwargs, "mesh": mesh})


class TensorParallelizer:
    """Shards a stage over the mesh's ``tp`` axis (:func:`nemo_pp.distributed.tensor_parallel.tensor_parallelize`)."""

    def __init__(self, mesh_bundle, sequence_parallel: bool = False):
        self.mesh_bundle = mesh_bundle
        self.sequence_parallel = sequence_parallel

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        return tensor_parallelize(model, self.mesh_bundle.world["tp"], self.sequence_parallel,
                                  expert_parallel=self.mesh_bundle.sizes.ep > 1)


class ComposedParallelizer:
    """Applies parallelize_fns in order (e.g. tensor parallel, then FSDP2)."""

    def __init__(self, *steps):
        self.steps = [s for s in steps if s is not None]

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **kwargs):
        for step in self.steps:
            step(model, world_mesh, moe_mesh, **kwargs)
        return model


def parallelize_chain(
    mesh_bundle,
    *,
    sizes=None,
    peft=None,
    sequence_parallel: bool = False,
    cp=None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    compile_kwargs: dict | None = None,
):
    """The per-stage parallelize_fn of a run, in the one order that composes: LoRA adapters
    (``peft``), tensor parallelism (tp > 1), the context-parallel attention (``cp``), expert
    parallelism (ep > 1: the experts sharded, FSDP2 then leaves them out), activation
    checkpointing, then FSDP2 / HSDP over the data-parallel and cp ranks
    (``dp * cp > 1``; activation checkpointing is then applied by the FSDP2 step, before it
    shards). None when nothing applies.

    Args:
        mesh_bundle: the run's :class:`~nemo_pp.distributed.mesh.MeshBundle`.
        sizes: the axis sizes (:class:`~nemo_pp.planning.dims.ParallelDims`); default the bundle's.
        peft: a :class:`~nemo_pp._peft.lora.PeftConfig`, or None.
        sequence_parallel: tp's sequence parallelism.
        cp: the run's :class:`~nemo_pp.distributed.context_parallel.ContextParallel`, or None.
        activation_checkpointing: recompute decoder layers in backward.
        reshard_after_forward: FSDP2's; False for split-backward schedules (the reshard
            rule: ``not plan.split_backward``; docs/architecture.md, "Measured torch facts").
        mp_policy: FSDP2's mixed precision.
        compile_kwargs: ``torch.compile``'s arguments for each decoder layer
            (:class:`~nemo_pp.distributed.compile.RegionalCompile`, after tp/cp/ep, before
            activation checkpointing and FSDP2); None: eager.

    Raises:
        ValueError: cp > 1 without ``cp``.
    """
    sizes = sizes if sizes is not None else mesh_bundle.sizes
    if sizes.cp > 1 and cp is None:  # the stages would attend within their own slice only
        raise ValueError("parallelize_chain: cp_size > 1 needs the run's ContextParallel (cp=...)")
    if sizes.fsdp_enabled:
        rest = FSDP2Parallelizer(mesh_bundle, reshard_after_forward, activation_checkpointing, mp_policy)
    else:
        rest = ActivationCheckpointing() if activation_checkpointing else None
    steps = [
        LoraParallelizer(peft) if peft is not None else None,
        TensorParallelizer(mesh_bundle, sequence_parallel) if sizes.tp > 1 else None,
        ContextParallelizer(cp) if sizes.cp > 1 else None,
        ExpertParallel(mesh_bundle.ep) if sizes.ep > 1 else None,
        RegionalCompile(**compile_kwargs) if compile_kwargs is not None else None,
        rest,
    ]
    steps = [s for s in steps if s is not None]
    return None if not steps else steps[0] if len(steps) == 1 else ComposedParallelizer(*steps)


def build_parallelize_fn(plan, mesh_bundle, cp=None):
    """:func:`parallelize_chain` of a :class:`~nemo_pp.planning.run_plan.RunPlan` (its sizes,
    LoRA, sequence parallelism, activation checkpointing, mixed precision and the
    schedule's reshard rule) with the run's ``cp``."""
    return parallelize_chain(
        mesh_bundle, sizes=plan.sizes, peft=plan.peft, sequence_parallel=plan.sequence_parallel, cp=cp,
        activation_checkpointing=plan.activation_checkpointing,
        reshard_after_forward=not plan.pipeline.split_backward, mp_policy=plan.mp_policy,
        compile_kwargs=plan.compile_kwargs,
    )
