"""AutoPipeline: the high-level pipeline-parallel object (NeMo AutoModel's API, name for name)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from .functional import (
    ParallelizeFnProtocol,
    pipeline_model,
    reset_pp_stage_shapes,
    scale_grads_by_divisor,
)
from .grads import clip_grad_norm_across_stages
from .hf_utils import validate_hf_model_for_pipeline_support
from .tied import TiedEmbeddingSync, is_tied, tied_param_fqns

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

    Build it with the mesh and schedule settings, then ``.build(model, loss_fn=...)``;
    afterwards ``.info`` holds the schedule, this rank's stages and model parts.

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
        dtype: cast the model to this dtype before splitting (None: keep).
        scale_grads_in_schedule: let torch divide grads by the microbatch count; keep
            False (default) and normalise by label tokens instead.
        pp_seq_len: if set, stage shapes are precomputed at build time.

    ``moe_mesh``, ``ep_*``, ``patch_stage_backward_maybe_with_nosync`` and
    ``defer_fsdp_grad_sync`` are accepted for API compatibility.
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
    ):
        if world_mesh is None:
            raise ValueError("AutoPipeline needs world_mesh (a DeviceMesh with a 'pp' axis)")
        if pp_axis_name not in (world_mesh.mesh_dim_names or ()):
            raise ValueError(f"world_mesh has no axis '{pp_axis_name}' (axes: {world_mesh.mesh_dim_names})")
        self.world_mesh = world_mesh
        self.moe_mesh = moe_mesh
        self.pp_axis_name = pp_axis_name
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
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)  # an int is a CUDA index, as torch.device reads it
        self.dtype = dtype
        self.scale_grads_in_schedule = scale_grads_in_schedule
        self.pp_seq_len = pp_seq_len

        self._info = PipelineInfo(False, None, False, False, None, None)
        self._model_config = None
        self._seq_len: Optional[int] = None
        self._tied: Optional[TiedEmbeddingSync] = None

    # ------------------------------------------------------------------ build
    def build(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable] = None,
        parallelize_fn: Optional[ParallelizeFnProtocol] = None,
    ) -> "AutoPipeline":
        """Validate, split into this rank's stages, parallelize each part, build the schedule.

        Args:
            model: the full model (HF ``...ForCausalLM`` or a custom module).
            loss_fn: ``loss_fn(output, target) -> scalar`` for the last stage.
            parallelize_fn: applied once per model part (TP / FSDP2 / checkpointing).

        Returns:
            ``self``.

        Raises:
            ValueError: unsupported model or impossible split/schedule (before any comms).
        """
        if self.patch_inner_model or self.patch_causal_lm_model:
            validate_hf_model_for_pipeline_support(model)
        if self.dtype is not None:
            model = model.to(self.dtype)
        tied = is_tied(model)
        tied_fqns = tied_param_fqns(model) if tied else None
        self._model_config = getattr(model, "config", None)
        schedule, parts, has_first, has_last, stages = pipeline_model(
            model,
            world_mesh=self.world_mesh,
            moe_mesh=self.moe_mesh,
            pp_axis_name=self.pp_axis_name,
            dp_axis_names=self.dp_axis_names,
            cp_axis_name=self.cp_axis_name,
            tp_axis_name=self.tp_axis_name,
            ep_axis_name=self.ep_axis_name,
            ep_shard_axis_names=self.ep_shard_axis_names,
            layers_per_stage=self.layers_per_stage,
            pipeline_parallel_schedule_csv=self.pp_schedule_csv,
            pipeline_parallel_schedule=self.pp_schedule,
            microbatch_size=self.pp_microbatch_size,
            local_batch_size=self.pp_batch_size,
            device=self.device,
            loss_fn=loss_fn,
            parallelize_fn=parallelize_fn,
            module_fqns_per_model_part=self.module_fqns_per_model_part,
            patch_inner_model=self.patch_inner_model,
            patch_causal_lm_model=self.patch_causal_lm_model,
            scale_grads=self.scale_grads_in_schedule,
            round_to_pp_multiple=self.round_virtual_stages_to_pp_multiple,
            seq_len=self.pp_seq_len,
            tensor_dtype=self.dtype,
        )
        self._seq_len = self.pp_seq_len if self._model_config is not None else None
        self._info = PipelineInfo(True, schedule, has_first, has_last, parts, stages)
        if tied:
            num_stages = stages[0].num_stages
            owner = self._stage_owners()
            last_rank = owner[num_stages - 1]
            pp_dim = list(self.world_mesh.mesh_dim_names).index(self.pp_axis_name)
            self._tied = TiedEmbeddingSync(
                self.world_mesh.mesh.movedim(pp_dim, -1),
                parts,
                [s.stage_index for s in stages],
                num_stages,
                last_rank,
                *tied_fqns,
            )
            logger.info("tied word embeddings: gradients of the first- and last-stage copies are summed each step")
        return self

    # ------------------------------------------------------------ accessors
    @property
    def info(self) -> PipelineInfo:
        return self._info

    @property
    def parts(self) -> list[nn.Module]:
        """This rank's stage modules (model parts)."""
        return self._info.model_parts or []

    @property
    def pp_group(self):
        mesh = self.world_mesh[self.pp_axis_name] if self.world_mesh.ndim > 1 else self.world_mesh
        return mesh.get_group()

    @property
    def tied_embeddings(self) -> Optional[TiedEmbeddingSync]:
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
        reset_pp_stage_shapes(
            self._info.schedule,
            self._info.stages,
            self._model_config,
            self.pp_microbatch_size,
            int(seq_len),
            self.dtype,
        )
        self._seq_len = int(seq_len)

    # --------------------------------------------------------------- grads
    def sync_tied_grads(self) -> None:
        """Sum the gradients of the two copies of a tied embedding (no-op if untied)."""
        if self._tied is not None:
            self._tied.sync_grads()

    def scale_grads_by_divisor(self, divisor: float) -> None:
        """Divide every local stage gradient by ``divisor``."""
        scale_grads_by_divisor(self._info.stages or [], divisor)

    def clip_grad_norm(self, max_norm: Optional[float], norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global gradient norm over all stages; returns that norm.

        Equal to the unsplit model's ``torch.nn.utils.clip_grad_norm_`` (the tied
        embedding counted once). Collective over the pp group.
        """
        params = [p for part in self.parts for p in part.parameters()]
        exclude = [self._tied.duplicate] if self._tied is not None and self._tied.duplicate is not None else []
        return clip_grad_norm_across_stages(params, max_norm, norm_type, self.pp_group, exclude)

    # ------------------------------------------------------------ inspection
    @staticmethod
    def _count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    def _gather_over_pp(self, local: dict[int, object]) -> dict[int, object]:
        """Merge {stage_index: value} dicts of all pp ranks (collective)."""
        group = self.pp_group
        out: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, local, group=group)
        merged: dict[int, object] = {}
        for d in out:
            merged.update(d)
        return merged

    def _stage_owners(self) -> dict[int, int]:
        """{global stage index: pp rank holding it} (collective over pp)."""
        me = dist.get_rank(self.pp_group)
        return self._gather_over_pp({s.stage_index: me for s in self._info.stages})

    def list_stage_modules(self) -> list[list[str]]:
        """Module FQNs of every stage, by global stage index (collective over pp)."""
        local = {s.stage_index: list(getattr(p, "_pp_module_fqns", [])) for s, p in zip(self._info.stages, self.parts)}
        merged = self._gather_over_pp(local)
        return [merged[i] for i in sorted(merged)]

    def get_stage_param_counts(self, trainable_only: bool = False) -> list[int]:
        """Parameter count of every stage, by global stage index (collective over pp)."""
        local = {s.stage_index: self._count_parameters(p, trainable_only) for s, p in zip(self._info.stages, self.parts)}
        merged = self._gather_over_pp(local)
        return [merged[i] for i in sorted(merged)]

    def get_total_param_count(self, trainable_only: bool = False) -> int:
        """Sum of :meth:`get_stage_param_counts` (a tied embedding counts once per copy)."""
        return sum(self.get_stage_param_counts(trainable_only))

    def pretty_print_stages(self, max_modules_per_stage: int = 16, trainable_only: bool = False) -> str:
        """A table of stages (GLOBAL stage index, its pp rank, params, modules)."""
        modules = self.list_stage_modules()
        counts = self.get_stage_param_counts(trainable_only)
        total = max(1, sum(counts))
        owner = self._stage_owners()
        pp_size = dist.get_world_size(self.pp_group)
        schedule = self.pp_schedule_csv or self.pp_schedule
        lines = [f"Pipeline: {len(modules)} stages over {pp_size} pp ranks, schedule {schedule}"]
        for idx, (names, n) in enumerate(zip(modules, counts)):
            rank = owner[idx]
            lines.append(f"  stage {idx} (pp_rank {rank}): {n:,} params ({100 * n / total:.1f}%)")
            shown = _compress_layer_names(names)
            for name in shown[:max_modules_per_stage]:
                lines.append(f"    - {name}")
            if len(shown) > max_modules_per_stage:
                lines.append(f"    ... {len(shown) - max_modules_per_stage} more")
        return "\n".join(lines)

    def debug_summary(self) -> str:
        info = self._info
        lines = [
            f"AutoPipeline: enabled={info.enabled} schedule={type(info.schedule).__name__ if info.schedule else None}",
            f"  pp_microbatch_size={self.pp_microbatch_size} pp_batch_size={self.pp_batch_size} "
            f"microbatches={self.pp_batch_size // max(1, self.pp_microbatch_size)} seq_len={self._seq_len}",
            f"  local stages={[s.stage_index for s in info.stages or []]} has_first={info.has_first_stage} "
            f"has_last={info.has_last_stage} tied_embeddings={self._tied is not None}",
        ]
        for s, p in zip(info.stages or [], self.parts):
            lines.append(f"  stage {s.stage_index}: {self._count_parameters(p):,} params")
        return "\n".join(lines)

    def visualize_current_schedule(self, filename: Optional[str] = None) -> str:
        """Write a PNG timeline of the built schedule's actions per rank (matplotlib).

        Drawn from the schedule's own action list with its real number of microbatches
        (``pp_batch_size // pp_microbatch_size``; NeMo passes the microbatch size there),
        so CSV schedules draw too. Returns the file name (default ``pipeline_schedule.png``).
        """
        from .visualize import save_schedule_png, schedule_actions

        return save_schedule_png(schedule_actions(self._info.schedule), filename or "pipeline_schedule.png")

    def log_debug_summary(self) -> None:
        logger.info("%s", self.debug_summary())


def _compress_layer_names(names: list[str]) -> list[str]:
    """``model.layers.0 .. model.layers.14`` -> ``model.layers.0-14`` for display."""
    out, run = [], []

    def flush():
        if run:
            prefix = run[0][0]
            out.append(f"{prefix}{run[0][1]}" if len(run) == 1 else f"{prefix}{run[0][1]}-{run[-1][1]}")
            run.clear()

    for name in names:
        head, _, tail = name.rpartition(".")
        if tail.isdigit():
            if run and run[-1][0] == head + "." and int(tail) == run[-1][1] + 1:
                run.append((head + ".", int(tail)))
                continue
            flush()
            run.append((head + ".", int(tail)))
        else:
            flush()
            out.append(name)
    flush()
    return out
