"""AutoPipeline: the high-level pipeline-parallel object (NeMo AutoModel's API, name for name)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from nemo_pp.distributed.grads import clip_grad_norm_across_stages, divide_grads
from nemo_pp.distributed.pipelining.build import build_pipeline, pp_submesh
from nemo_pp.distributed.pipelining.functional import ParallelizeFnProtocol, reset_pp_stage_shapes
from nemo_pp.distributed.pipelining.tied import TiedEmbeddingSync
from nemo_pp.models.auto_model import resolve_dtype
from nemo_pp.models.lm_head import takes_hidden_states
from nemo_pp.models.module_tree import is_tied, stage_parameters, tied_param_fqns
from nemo_pp.models.moe import RouterLoss, moe_layer_indices, router_spec
from nemo_pp.models.stage_forward import validate_hf_model_for_pipeline_support
from nemo_pp.planning.checks import check_grad_sync_options
from nemo_pp.planning.pipeline import PipelinePlan, StageSpec, make_pipeline_plan
from nemo_pp.planning.split import validate_stage_modules

logger = logging.getLogger(__name__)


@dataclass
class PipelineInfo:
    """Runtime state produced by pipeline-parallel setup."""

    enabled: bool
    schedule: Optional[object]
    has_first_stage: bool
    has_last_stage: bool
    model_parts: Optional[list[nn.Module]]
    stages: Optional[list]


class AutoPipeline:
    """Orchestrates pipeline-parallel training on top of ``torch.distributed.pipelining``.

    Two ways in, one builder: NeMo's, the mesh and schedule settings here, then
    ``.build(model, loss_fn=...)``, which plans (and checks) first; or
    :meth:`from_plan` with a plan made beforehand (the recipe's), which checks nothing the
    plan holds. Afterwards ``.plan`` holds the whole pipeline's layout and ``.info`` the schedule,
    this rank's stages and model parts. ``pp_size`` 1 is a one-stage pipeline of the
    whole model through the same schedule machinery (microbatches included).

    Collectives: ``build`` (stage groups, tied-embedding pair groups), ``clip_grad_norm``
    and ``sync_tied_grads`` must be called on every pp rank. The inspection methods
    (``list_stage_modules``, ``get_stage_param_counts``, ``get_total_param_count``,
    ``pretty_print_stages``, ``debug_summary``) read the plan and need no communication.

    Args:
        world_mesh: DeviceMesh with a ``pp_axis_name`` axis (and dp/cp/tp axes).
        pp_schedule: schedule name (``1f1b``, ``gpipe``, ``interleaved_1f1b``, ...).
        pp_schedule_csv: optional CSV schedule (torch ``_PipelineScheduleRuntime`` format).
        pp_microbatch_size: samples per microbatch.
        pp_batch_size: samples per ``schedule.step`` (the dataloader batch size).
        layers_per_stage: decoder layers per virtual stage (None: automatic).
        round_virtual_stages_to_pp_multiple: ``"up"``/``"down"``/None.
        module_fqns_per_model_part: manual split, one FQN list per stage.
        patch_inner_model / patch_causal_lm_model: use nemo_pp's tensor-returning forwards.
        device: device of the stage modules (default: CUDA if available else CPU).
        dtype: cast the model to this dtype before splitting (None: keep); a
            ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.bfloat16"``).
        scale_grads_in_schedule: let torch divide ALL grads by the microbatch count after
            every ``step``. Under gradient accumulation this divides earlier batches again
            (by n_microbatches squared after two steps); keep False (default) and
            normalise by label tokens. The recipe refuses True.
        pp_seq_len: if set, stage shapes are precomputed at build time.
        split: ``"balanced"`` (default) places layer boundaries so the slowest stage is as
            close to the mean as whole layers allow, counting the output head and loss
            (:mod:`nemo_pp.planning.cost`); ``"uniform"`` spreads layers evenly, as the reference does;
            ``"profile"`` balances by piece times measured on the device (the recipe times
            them on rank 0 and passes the plan; here, without a plan, it is ``balanced``).
        max_stage_params: cap on any stage's parameters for the balanced split.
        sequence_shards / activation_dtype (nemo_pp's, not NeMo's): what ``parallelize_fn``
            does to the activations stages exchange, which their forwards and static shapes
            must know: the tp size when it applies sequence parallelism (hidden states
            ``[mb, S / tp, H]``), and the dtype it computes in (FSDP2 mixed precision's
            ``param_dtype``; default ``dtype``, else the parameters'). The recipe plans both
            (``StageSpec``) and builds with :meth:`from_plan`.

    ``moe_mesh`` and ``ep_*`` are passed to ``parallelize_fn``.
    ``patch_stage_backward_maybe_with_nosync`` must stay False: torch already defers FSDP
    gradient sync to the last microbatch (:func:`nemo_pp.planning.checks.check_grad_sync_options`).
    ``defer_fsdp_grad_sync`` (default True) tells the engine to reduce FSDP gradients once
    per optimizer step, not once per accumulated batch (:meth:`set_grad_sync`).

    Raises:
        ValueError: a mesh without the pp axis, an unknown dtype, a refused sync option.
    """

    def __init__(
        self,
        world_mesh=None,
        moe_mesh=None,
        pp_axis_name: str = "pp",
        dp_axis_names: tuple[str, ...] = ("dp",),
        cp_axis_name: Optional[str] = None,
        tp_axis_name: Optional[str] = None,
        ep_axis_name: Optional[str] = None,
        ep_shard_axis_names: Optional[tuple[str, ...]] = None,
        pp_schedule: Optional[str] = "1f1b",
        pp_schedule_csv: Optional[str] = None,
        pp_microbatch_size: int = 1,
        pp_batch_size: int = 1,
        layers_per_stage: Optional[int] = None,
        round_virtual_stages_to_pp_multiple: Optional[Literal["up", "down"]] = None,
        module_fqns_per_model_part: Optional[list[list[str]]] = None,
        patch_inner_model: bool = True,
        patch_causal_lm_model: bool = True,
        patch_stage_backward_maybe_with_nosync: bool = False,
        defer_fsdp_grad_sync: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        scale_grads_in_schedule: bool = False,
        pp_seq_len: Optional[int] = None,
        split: str = "balanced",
        max_stage_params: Optional[int] = None,
        sequence_shards: int = 1,
        activation_dtype: Optional[torch.dtype] = None,
    ):
        check_grad_sync_options(patch_stage_backward_maybe_with_nosync)
        self._init_runtime(world_mesh, moe_mesh, pp_axis_name, dp_axis_names, cp_axis_name, tp_axis_name,
                           ep_axis_name, ep_shard_axis_names, device)
        # NeMo's settings, read by make_plan / build (from_plan takes them from the plan)
        self.dp_axis_names = tuple(dp_axis_names)
        self.cp_axis_name = cp_axis_name
        self.tp_axis_name = tp_axis_name
        self.ep_axis_name = ep_axis_name
        self.ep_shard_axis_names = ep_shard_axis_names
        self.pp_schedule = pp_schedule
        self.pp_schedule_csv = pp_schedule_csv
        self.pp_microbatch_size = int(pp_microbatch_size)
        self.pp_batch_size = int(pp_batch_size)
        self.layers_per_stage = layers_per_stage
        self.round_virtual_stages_to_pp_multiple = round_virtual_stages_to_pp_multiple
        self.module_fqns_per_model_part = module_fqns_per_model_part
        self.patch_inner_model = patch_inner_model
        self.patch_causal_lm_model = patch_causal_lm_model
        self.patch_stage_backward_maybe_with_nosync = patch_stage_backward_maybe_with_nosync
        self.defer_fsdp_grad_sync = defer_fsdp_grad_sync
        self.dtype = resolve_dtype(dtype, "distributed.pipeline.dtype")
        self.scale_grads_in_schedule = scale_grads_in_schedule
        self.pp_seq_len = pp_seq_len
        self.split = split
        self.max_stage_params = max_stage_params
        self.sequence_shards = int(sequence_shards)
        self.activation_dtype = resolve_dtype(activation_dtype, "activation_dtype")

    # ------------------------------------------------------------------ build
    @property
    def pp_size(self) -> int:
        """Number of pipeline ranks: the size of ``world_mesh``'s pp axis."""
        return self._pp_mesh.size()

    @property
    def _pp_mesh(self):
        return pp_submesh(self.world_mesh, self.pp_axis_name)

    def make_plan(self, model: nn.Module) -> PipelinePlan:
        """The :class:`PipelinePlan` of these settings for ``model`` (meta-device is fine);
        no communication.

        Raises:
            ValueError / FileNotFoundError: see :func:`make_pipeline_plan`.
        """
        return make_pipeline_plan(
            model, self.pp_size, self.pp_schedule, self.pp_schedule_csv, self.pp_microbatch_size,
            self.pp_batch_size, self.layers_per_stage, self.round_virtual_stages_to_pp_multiple,
            self.module_fqns_per_model_part, split=self.split, seq_len=self.pp_seq_len,
            max_stage_params=self.max_stage_params, scale_grads=self.scale_grads_in_schedule,
            defer_fsdp_grad_sync=self.defer_fsdp_grad_sync,
            stage=StageSpec(patch_inner_model=self.patch_inner_model, patch_causal_lm_model=self.patch_causal_lm_model,
                            sequence_shards=self.sequence_shards, activation_dtype=self.activation_dtype or self.dtype,
                            seq_len=self.pp_seq_len),
        )

    def build(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable] = None,
        parallelize_fn: Optional[ParallelizeFnProtocol] = None,
        plan: Optional[PipelinePlan] = None,
        weights=None,
    ) -> "AutoPipeline":
        """Plan (or check the given plan against ``model``), split into this rank's stages,
        parallelize each part, build the schedule: NeMo AutoModel's entry point. A plan made
        beforehand without these checks is built by :meth:`from_plan`.

        Args:
            model: the full model (HF ``...ForCausalLM`` or a custom module).
            loss_fn: ``loss_fn(output, target) -> scalar`` for the last stage.
            parallelize_fn: applied once per model part (TP / FSDP2 / checkpointing); it
                receives only the keyword arguments its signature accepts.
            plan: a plan made beforehand; None: :meth:`make_plan` of ``model``.
            weights: where a meta-device ``model``'s stages read their tensors
                (``nemo_pp.models.loading.SafetensorsCheckpoint``): each rank allocates
                and reads only its own stages.

        Returns:
            ``self``.

        Raises:
            ValueError: unsupported model, impossible split/schedule, or a plan whose
                modules the model does not have (before any communication).
        """
        if self.dtype is not None:
            model = model.to(self.dtype)
        if plan is None:
            plan = self.make_plan(model)  # validates its module table against the model
        elif plan.module_fqns is None:
            raise ValueError("AutoPipeline.build needs a plan made with the model (module_fqns is None)")
        else:
            validate_stage_modules(model, [list(m) for m in plan.module_fqns])  # the plan covers this very model
        if (plan.microbatch_size, plan.batch_size) != (self.pp_microbatch_size, self.pp_batch_size):
            raise ValueError(
                f"the plan's microbatches ({plan.batch_size} samples in microbatches of {plan.microbatch_size}) differ "
                f"from this AutoPipeline's pp_batch_size={self.pp_batch_size}, pp_microbatch_size={self.pp_microbatch_size}"
            )
        validate_hf_model_for_pipeline_support(model, self.patch_inner_model, self.patch_causal_lm_model, plan.num_stages)
        return self._materialise(model, plan, loss_fn, parallelize_fn, weights)

    @classmethod
    def from_plan(
        cls,
        plan,
        world_mesh,
        *,
        model: Optional[nn.Module] = None,
        device: Optional[torch.device] = None,
        loss_fn: Optional[Callable] = None,
        parallelize_fn: Optional[ParallelizeFnProtocol] = None,
        weights=None,
        moe_mesh=None,
        pp_axis_name: str = "pp",
        dp_axis_names: tuple[str, ...] = ("dp",),
        cp_axis_name: Optional[str] = None,
        tp_axis_name: Optional[str] = None,
        ep_axis_name: Optional[str] = None,
        ep_shard_axis_names: Optional[tuple[str, ...]] = None,
    ) -> "AutoPipeline":
        """Build this rank's pipeline from a plan, trusting it: nothing the plan decided
        (stage modules, microbatches, model support) is checked again.

        Args:
            plan: a :class:`~nemo_pp.planning.run_plan.RunPlan` (its ``pipeline`` and its
                ``meta_model``) or a :class:`PipelinePlan`.
            world_mesh: the DeviceMesh with a ``pp_axis_name`` axis, or a
                :class:`~nemo_pp.distributed.mesh.MeshBundle` (its ``world``).
            model: the model to split; default the run plan's meta model (then each rank
                materialises only its stages from ``weights``). A model the plan was not
                made from has its stage modules checked against the plan.
            device: where the stages go (default: CUDA if available, else CPU).
            loss_fn: ``loss_fn(output, target) -> scalar`` for the last stage.
            parallelize_fn: applied once per model part
                (:func:`nemo_pp.distributed.parallelize.build_parallelize_fn` for a run plan).
            weights: a ``SafetensorsCheckpoint`` for a meta-device model.
            moe_mesh, *_axis_name(s): passed to ``parallelize_fn``.

        Raises:
            ValueError: no model to build, a mesh without the pp axis or of another pp
                size, or a given model that lacks the plan's modules.
        """
        pipeline = getattr(plan, "pipeline", plan)
        planned = getattr(plan, "meta_model", None)
        if model is None:
            model = planned
        if model is None:
            raise ValueError("AutoPipeline.from_plan needs model= (the plan holds no meta model)")
        if pipeline.module_fqns is None:
            raise ValueError("AutoPipeline.from_plan needs a plan made with the model (module_fqns is None)")
        if model is not planned:  # the plan never saw this model
            validate_stage_modules(model, [list(m) for m in pipeline.module_fqns])
        self = cls.__new__(cls)
        self._init_runtime(getattr(world_mesh, "world", world_mesh), moe_mesh, pp_axis_name, dp_axis_names,
                           cp_axis_name, tp_axis_name, ep_axis_name, ep_shard_axis_names, device)
        return self._materialise(model, pipeline, loss_fn, parallelize_fn, weights)

    def _init_runtime(self, world_mesh, moe_mesh, pp_axis_name, dp_axis_names, cp_axis_name, tp_axis_name,
                      ep_axis_name, ep_shard_axis_names, device) -> None:
        if world_mesh is None:
            raise ValueError("AutoPipeline needs world_mesh (a DeviceMesh with a 'pp' axis)")
        if pp_axis_name not in (world_mesh.mesh_dim_names or ()):
            raise ValueError(f"world_mesh has no axis '{pp_axis_name}' (axes: {world_mesh.mesh_dim_names})")
        self.world_mesh = world_mesh
        self.moe_mesh = moe_mesh
        self.pp_axis_name = pp_axis_name
        self._parallelize_kwargs = dict(
            dp_axis_names=tuple(dp_axis_names), cp_axis_name=cp_axis_name, tp_axis_name=tp_axis_name,
            ep_axis_name=ep_axis_name, ep_shard_axis_names=ep_shard_axis_names)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)  # an int is a CUDA index, as torch.device reads it
        self._info = PipelineInfo(False, None, False, False, None, None)
        self._plan: Optional[PipelinePlan] = None
        self._param_counts: dict[bool, list[int]] = {}
        self._model_config = None
        self._seq_len: Optional[int] = None
        self._tied: Optional[TiedEmbeddingSync] = None
        self._router_loss: Optional[RouterLoss] = None
        self._head_loss = False

    def _materialise(self, model: nn.Module, plan: PipelinePlan, loss_fn, parallelize_fn, weights) -> "AutoPipeline":
        """Stages, parallelize_fn, schedule and tied-embedding sync of ``plan`` on this rank."""
        tied = plan.num_stages > 1 and is_tied(model)
        tied_fqns = tied_param_fqns(model) if tied else None
        self._model_config = getattr(model, "config", None)
        self._param_counts = {only: [_count(model, names, only) for names in plan.module_fqns] for only in (False, True)}
        schedule, parts, has_first, has_last, stages = build_pipeline(
            model, plan, self.world_mesh, self.moe_mesh, self.pp_axis_name, self.device, loss_fn, parallelize_fn,
            self._parallelize_kwargs, weights,
        )
        self._plan = plan
        self._head_loss = takes_hidden_states(loss_fn)
        self._seq_len = plan.stage.seq_len if self._model_config is not None else None
        self._info = PipelineInfo(True, schedule, has_first, has_last, parts, stages)
        spec = router_spec(model)
        if spec is not None:
            # the whole model's MoE layers: a stage's share of the loss is averaged over all of them
            self._router_loss = RouterLoss(spec, moe_layer_indices(model, spec), aux_loss=spec.output_router_logits)
            for part in parts:
                self._router_loss.attach(part, self.device)
        if tied:
            pp_dim = list(self.world_mesh.mesh_dim_names).index(self.pp_axis_name) if self.world_mesh.ndim > 1 else 0
            self._tied = TiedEmbeddingSync(
                self.world_mesh.mesh.movedim(pp_dim, -1), parts, [s.stage_index for s in stages], plan.num_stages,
                plan.owner(0), plan.owner(plan.num_stages - 1), *tied_fqns,
            )
            logger.info("tied word embeddings: gradients of the first- and last-stage copies are summed each step")
        return self

    # ------------------------------------------------------------ accessors
    @property
    def info(self) -> PipelineInfo:
        """The schedule and this rank's stages and model parts (``enabled`` False until built)."""
        return self._info

    @property
    def plan(self) -> PipelinePlan:
        """The plan this pipeline was built from.

        Raises:
            RuntimeError: before :meth:`build`.
        """
        if self._plan is None:
            raise RuntimeError("AutoPipeline.plan is set by build(); call build(model, ...) first")
        return self._plan

    @property
    def parts(self) -> list[nn.Module]:
        """This rank's stage modules (model parts)."""
        return self._info.model_parts or []

    @property
    def pp_group(self):
        """The process group of this rank's pp axis."""
        return self._pp_mesh.get_group()

    @property
    def head_computes_loss(self) -> bool:
        """Whether the last stage computes the loss in its forward (a ``loss_fn`` taking hidden
        states, ``FusedLinearCrossEntropy``): then pass ``labels=`` (``[B, S] int64``, split
        into microbatches like ``target``) to ``schedule.step`` on every rank."""
        return self._head_loss

    @property
    def router_loss(self) -> Optional[RouterLoss]:
        """The routers' load-balancing loss and expert load of this rank's stages
        (:class:`nemo_pp.models.moe.RouterLoss`); None for a dense model."""
        return self._router_loss

    @property
    def tied_embeddings(self) -> Optional[TiedEmbeddingSync]:
        """The tied-embedding gradient sum; None until built, and for an untied or one-stage model."""
        return self._tied

    # -------------------------------------------------------------- shapes
    def update_seq_len(self, seq_len: int) -> None:
        """Re-size the pipeline for batches of ``seq_len`` tokens, without a forward pass.

        Call before every ``schedule.step()``; a no-op when ``seq_len`` is unchanged.
        Gradients accumulated before a change survive it. Every rank must call it with
        the same value.
        """
        if seq_len == self._seq_len:
            return
        if self._model_config is None:
            raise RuntimeError("update_seq_len needs a model with a .config (hidden_size, vocab_size)")
        spec = self.plan.stage
        reset_pp_stage_shapes(self._info.schedule, self._info.stages, self._model_config, self.plan.microbatch_size,
                              int(seq_len), spec.activation_dtype, spec.sequence_shards)
        self._seq_len = int(seq_len)

    # --------------------------------------------------------------- grads
    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next ``schedule.step`` reduces FSDP gradients at its end (torch's
        REDUCE_GRAD). Off for all but the last batch of an optimizer step, FSDP keeps
        accumulating unsharded gradients and reduce-scatters once per step: fewer
        collectives for the memory of one stage's unsharded gradients. No effect without FSDP."""
        for stage in self._info.stages or []:
            stage.grad_sync = bool(enabled)

    def sync_tied_grads(self) -> None:
        """Sum the gradients of the two copies of a tied embedding (no-op if untied)."""
        if self._tied is not None:
            self._tied.sync_grads()

    def scale_grads_by_divisor(self, divisor: float) -> None:
        """Divide every local stage gradient by ``divisor``."""
        divide_grads(self.parts, divisor)

    def clip_grad_norm(self, max_norm: Optional[float], norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global gradient norm over all stages; returns that norm.

        Equal to the unsplit model's ``torch.nn.utils.clip_grad_norm_`` (the tied
        embedding counted once). Collective over the pp group.
        """
        params = [p for part in self.parts for p in part.parameters()]
        exclude = [self._tied.duplicate] if self._tied is not None and self._tied.duplicate is not None else []
        return clip_grad_norm_across_stages(params, max_norm, norm_type, self.pp_group, exclude)

    # ------------------------------------------------------------ inspection (local: read the plan)
    def list_stage_modules(self) -> list[list[str]]:
        """Module FQNs of every stage, by global stage index."""
        return [list(names) for names in self.plan.module_fqns]

    def get_stage_param_counts(self, trainable_only: bool = False) -> list[int]:
        """Parameter count of every stage, by global stage index, counted on the unsplit
        model at build time (so FSDP sharding does not change it; a tied embedding
        counts once per copy)."""
        self.plan  # noqa: B018  (raises before build)
        return list(self._param_counts[bool(trainable_only)])

    def get_total_param_count(self, trainable_only: bool = False) -> int:
        """Sum of :meth:`get_stage_param_counts`."""
        return sum(self.get_stage_param_counts(trainable_only))

    def pretty_print_stages(self, max_modules_per_stage: int = 16, trainable_only: bool = False) -> str:
        """A table of stages (GLOBAL stage index, its pp rank, params, modules)."""
        return self.plan.describe(self.get_stage_param_counts(trainable_only), max_modules_per_stage)

    def debug_summary(self) -> str:
        """This rank's pipeline in a few lines: schedule, microbatches, local stages and their
        parameter counts (local: after sharding), tied embeddings."""
        info, plan = self._info, self._plan
        lines = [
            f"AutoPipeline: enabled={info.enabled} schedule={type(info.schedule).__name__ if info.schedule else None}",
            f"  pp_microbatch_size={plan.microbatch_size if plan else None} pp_batch_size={plan.batch_size if plan else None} "
            f"microbatches={plan.n_microbatches if plan else None} seq_len={self._seq_len}",
            f"  local stages={[s.stage_index for s in info.stages or []]} has_first={info.has_first_stage} "
            f"has_last={info.has_last_stage} tied_embeddings={self._tied is not None}",
        ]
        for s, p in zip(info.stages or [], self.parts):
            lines.append(f"  stage {s.stage_index}: {sum(t.numel() for t in p.parameters()):,} local params")
        return "\n".join(lines)

    def visualize_current_schedule(self, filename: Optional[str] = None) -> str:
        """Write a PNG timeline of the built schedule's actions per rank (matplotlib).

        Drawn from the schedule's own action list with its real number of microbatches
        (``pp_batch_size // pp_microbatch_size``; NeMo passes the microbatch size there),
        so CSV schedules draw too. Returns the file name (default ``pipeline_schedule.png``).
        """
        from nemo_pp.distributed.pipelining.visualize import save_schedule_png, schedule_actions

        return save_schedule_png(schedule_actions(self._info.schedule), filename or "pipeline_schedule.png")

    def log_debug_summary(self) -> None:
        """Log :meth:`debug_summary` at INFO level (NeMo's name)."""
        logger.info("%s", self.debug_summary())


def _count(model: nn.Module, module_fqns, trainable_only: bool) -> int:
    """Parameters of one stage, counted once each."""
    return sum(p.numel() for p in stage_parameters(model, module_fqns) if p.requires_grad or not trainable_only)
