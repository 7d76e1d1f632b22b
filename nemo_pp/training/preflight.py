"""Checks of a whole recipe config that need no weights and no communication.

Every rank runs them on the same config and the same world size, so a bad config
fails identically everywhere, before a process group exists or a weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_pp.distributed.mesh import ParallelSizes, resolve_parallel_sizes


@dataclass
class Preflight:
    """What the recipe derived from the config before doing any work."""

    sizes: ParallelSizes
    model_path: str
    local_batch_size: int
    grad_acc_steps: int
    num_epochs: int
    max_steps: int | None
    num_stages: int
    schedule: str | None
    split_backward: bool

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps`` or what the epochs hold."""
        per_epoch = batches_per_epoch // self.grad_acc_steps
        if per_epoch < 1 and self.max_steps is None:
            raise ValueError("the data set holds fewer batches than one optimizer step needs (step_scheduler.global_batch_size)")
        steps = per_epoch * self.num_epochs
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def parallelize_fn(self, mesh):
        """FSDP2 over the data-parallel ranks when there are several, else None."""
        if self.sizes.dp == 1:
            return None
        from nemo_pp.distributed.parallelize import FSDP2Parallelizer

        return FSDP2Parallelizer(mesh, reshard_after_forward=not self.split_backward)


def preflight_check(cfg, world_size: int) -> Preflight:
    """Validate ``cfg`` against ``world_size``; raise with the config key and the fix.

    Raises:
        ValueError: parallel sizes vs world size, batch arithmetic, schedule constraints,
            more stages than layers, unsupported strategy or axis.
        FileNotFoundError: missing local model or data set (names the asset command).
        NotImplementedError: tp/cp sizes this version does not implement.
    """
    from nemo_pp.assets import missing_asset_message, missing_local_path
    from nemo_pp.distributed.pipelining.schedules import (
        SPLIT_BACKWARD_SCHEDULES,
        canonical_schedule_name,
        check_schedule_constraints,
        is_single_stage_schedule,
    )
    from nemo_pp.distributed.pipelining.split import calculate_virtual_stages

    d = cfg.distributed
    if str(d.strategy).lower() != "fsdp2":
        raise ValueError(f"distributed.strategy '{d.strategy}' is not supported; use fsdp2")
    sizes = resolve_parallel_sizes(world_size, d.pp_size, d.dp_size, d.dp_replicate_size, d.tp_size, d.cp_size)
    on_cpu = cfg.dist_env.device == "cpu" or (cfg.dist_env.device in (None, "auto") and not torch.cuda.is_available())
    if sizes.cp > 1:
        if on_cpu:
            raise ValueError(
                "distributed.cp_size > 1: context parallelism has no CPU implementation (torch has no CPU "
                "sharding strategy for SDPA); set distributed.cp_size: 1 or run on GPUs"
            )
        raise NotImplementedError("distributed.cp_size > 1 is not implemented in this version of nemo_pp; set it to 1")
    if sizes.tp > 1:
        raise NotImplementedError("distributed.tp_size > 1 is not implemented in this version of nemo_pp; set it to 1")

    model_path = cfg.model.get("pretrained_model_name_or_path")
    if model_path is None:
        raise ValueError("model.pretrained_model_name_or_path is required")
    if missing_local_path(model_path):
        raise FileNotFoundError(f"model.pretrained_model_name_or_path: {missing_asset_message(model_path)}")
    for section in ("dataset", "validation_dataset"):
        node = cfg.get(section)
        if node is not None and node.get("path_or_dataset") is not None and missing_local_path(node.path_or_dataset):
            raise FileNotFoundError(f"{section}.path_or_dataset: {missing_asset_message(node.path_or_dataset, 'data set')}")

    local_bs = int(cfg.dataloader.batch_size)
    ss = cfg.step_scheduler
    if ss.get("local_batch_size") is not None and int(ss.local_batch_size) != local_bs:
        raise ValueError(
            f"step_scheduler.local_batch_size={ss.local_batch_size} differs from dataloader.batch_size={local_bs}; "
            "set one of them (the other follows)"
        )
    per_step = local_bs * sizes.dp
    gbs = int(ss.global_batch_size) if ss.get("global_batch_size") is not None else per_step
    if gbs % per_step:
        raise ValueError(
            f"step_scheduler.global_batch_size={gbs} is not a multiple of dataloader.batch_size*dp = {local_bs}*{sizes.dp} "
            f"= {per_step}; pick a multiple of {per_step}"
        )

    num_stages, schedule, split_backward = 1, None, False
    if sizes.pp > 1:
        p = d.pipeline
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(str(model_path))
        text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
        num_layers = int(text_cfg.num_hidden_layers)
        schedule = canonical_schedule_name(p.pp_schedule) if p.get("pp_schedule") else None
        if p.get("pp_schedule_csv"):
            from nemo_pp.distributed.pipelining.schedules import csv_stage_ids, read_schedule_csv

            ids = csv_stage_ids(read_schedule_csv(str(p.pp_schedule_csv)))
            if len(ids) != sizes.pp:
                raise ValueError(f"distributed.pipeline.pp_schedule_csv has {len(ids)} rows but pp_size is {sizes.pp}")
            num_stages = 1 + max(max(i) for i in ids)
        elif p.get("module_fqns_per_model_part"):
            num_stages = len(p.module_fqns_per_model_part)
        elif schedule is not None:
            num_stages, _ = calculate_virtual_stages(
                num_layers, p.get("layers_per_stage"), sizes.pp, is_single_stage_schedule(schedule),
                p.get("round_virtual_stages_to_pp_multiple"),
            )
        if schedule is not None and not p.get("pp_schedule_csv"):
            check_schedule_constraints(schedule, sizes.pp, num_stages, local_bs, int(p.pp_microbatch_size))
        elif local_bs % int(p.pp_microbatch_size):
            raise ValueError(
                f"pp_batch_size (dataloader.batch_size = {local_bs}) is not divisible by "
                f"distributed.pipeline.pp_microbatch_size = {p.pp_microbatch_size}"
            )
        split_backward = schedule in SPLIT_BACKWARD_SCHEDULES
    max_steps = ss.get("max_steps")
    return Preflight(
        sizes=sizes, model_path=str(model_path), local_batch_size=local_bs, grad_acc_steps=gbs // per_step,
        num_epochs=int(ss.num_epochs), max_steps=int(max_steps) if max_steps is not None else None,
        num_stages=num_stages, schedule=schedule, split_backward=split_backward,
    )
