"""Choose the parallel layout: every layout the code runs, filtered by memory, ranked by time.

:func:`plan_layouts` enumerates, for one config and ``nodes x gpus_per_node`` ranks, the
layouts the recipe accepts: pp, dp_replicate x dp_shard, cp, tp (with sequence parallelism,
except with packing or ep), ep for a mixture of experts, the schedule and its virtual
stages, the microbatch size and activation checkpointing, the global batch kept as the
config gives it. Each is weighed by the composed memory model
(:mod:`nemo_pp.planning.layout_memory`) against the device's memory and timed by the
step-time model (:mod:`nemo_pp.planning.step_time`); the fastest that fit are then planned
by :func:`~nemo_pp.planning.run_plan.plan_run` itself from the config with the layout's
overrides, and only those it accepts are returned, so what the search prints is what the
recipe runs.

What the search leaves out, and why (each is slower or no smaller than a layout it keeps):
GPipe and LoopedBFS (1F1B and Interleaved1F1B hold fewer microbatches for the same bubble);
gradient accumulation (one schedule step per optimizer step: the microbatch size is the
memory knob, and accumulating adds bubbles); tp beyond one node; dp_replicate other than 1
and "one node's dp ranks per replica" (HSDP's point); cp where a rank would keep under 256
tokens of a sequence; microbatches above 16 samples; the multi-stage schedules beyond 64
microbatches per step (torch's action lists for them take seconds each to build).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass, field

from nemo_pp.planning.devices import GIB, DeviceSpec
from nemo_pp.planning.layout import Layout
from nemo_pp.planning.layout_memory import LayoutMemory, ModelMemory, schedule_plan
from nemo_pp.planning.step_time import ModelShape, StepTime, predict_step_time

__all__ = ["Candidate", "PlanResult", "enumerate_layouts", "plan_layouts"]

#: fewest tokens of a sequence a cp rank keeps for cp to be searched
MIN_CP_TOKENS = 256
#: largest microbatch size searched
MAX_MICROBATCH = 16
#: most virtual stages per rank searched for the interleaved schedules
MAX_VIRTUAL_STAGES = 8
#: most microbatches per step searched for the multi-stage schedules: torch builds their action
#: lists (which the simulator replays) in time that grows with the square of the microbatches
MAX_MULTI_STAGE_MICROBATCHES = 64
#: simulated layouts a search keeps before it stops at the first lower bound beyond them
PRUNE_KEEP = 20


@dataclass(frozen=True)
class Candidate:
    """One layout with its predictions.

    Attributes:
        layout: the layout.
        memory: its fullest pp rank (:class:`~nemo_pp.planning.layout_memory.LayoutMemory`).
        step: the predicted optimizer step (:class:`~nemo_pp.planning.step_time.StepTime`); None
            for a layout that does not fit (not timed).
        tokens_per_s_per_device: training tokens per second per rank.
        mfu: model FLOPs utilisation (PaLM's definition, the recipe's; 0 without a step).
    """

    layout: Layout
    memory: LayoutMemory
    step: StepTime | None
    tokens_per_s_per_device: float = 0.0
    mfu: float = 0.0


@dataclass
class PlanResult:
    """What :func:`plan_layouts` found.

    Attributes:
        candidates: the layouts ``plan_run`` accepted, fastest first (at most ``top``).
        search_space: the layouts that fit and were timed, fastest first (all that fit with
            ``exhaustive``; not planned by ``plan_run``).
        searched: layouts enumerated; weighed: those whose memory was weighed (the rest could
            not beat the best ones); fitting: those within memory; refused: layouts the search
            ranked high that ``plan_run`` refused, with its reason (the search's blind spots).
        seconds: wall time of the search.
    """

    candidates: list[Candidate]
    device: DeviceSpec
    world_size: int
    gpus_per_node: int
    seq_len: int
    global_batch_size: int
    search_space: list[Candidate] = field(default_factory=list)
    searched: int = 0
    weighed: int = 0
    fitting: int = 0
    refused: list[tuple[Layout, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best(self) -> Candidate | None:
        """The fastest accepted layout, or None when nothing fits."""
        return self.candidates[0] if self.candidates else None

    def table(self, limit: int | None = None) -> str:
        """The candidates as a text table (the fastest first)."""
        head = (f"{'#':>3}  {'layout':<66} {'mem GiB':>8} {'step s':>9} {'tok/s/dev':>10} {'MFU':>6} "
                f"{'bubble':>7} {'comm s':>8}")
        rows = [head]
        for i, c in enumerate(self.candidates[:limit], 1):
            s = c.step
            comm = s.tp_s + s.cp_s + s.ep_s + s.fsdp_s + s.grad_sync_s
            rows.append(f"{i:>3}  {c.layout.describe():<66} {c.memory.total_bytes / GIB:>8.2f} {s.total_s:>9.3f} "
                        f"{c.tokens_per_s_per_device:>10.1f} {100 * c.mfu:>5.1f}% {100 * s.bubble_share:>6.1f}% "
                        f"{comm:>8.3f}")
        return "\n".join(rows)

    def summary(self) -> str:
        """One line: what was searched and how long it took."""
        return (f"{self.searched} layouts ({self.weighed} weighed) for {self.world_size} ranks ({self.gpus_per_node} per node) of "
                f"{self.device.name} ({self.device.memory_bytes / GIB:.0f} GiB, {self.device.peak_tflops:.1f} TFLOP/s), "
                f"{self.fitting} fit in memory, {len(self.refused)} refused by the plan; "
                f"{self.seconds:.1f} s; seq_len {self.seq_len}, global batch {self.global_batch_size}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _accepts(check, *args) -> bool:
    try:
        check(*args)
        return True
    except ValueError:
        return False


def _schedules(pp: int, num_layers: int, rounding: str | None):
    """``(schedule, num_stages, layers_per_stage)`` options for ``pp`` ranks."""
    from nemo_pp.planning.split import calculate_virtual_stages

    if pp == 1:
        return [("1F1B", 1, None)]
    out = [("1F1B", pp, None)] if num_layers >= pp else []
    if num_layers >= 2 * pp:
        out += [("Interleaved1F1B", 2 * pp, None), ("ZBVZeroBubble", 2 * pp, None),
                ("InterleavedZeroBubble", 2 * pp, None)]
    seen = {2 * pp}
    for per_stage in range(num_layers // (2 * pp), 0, -1):
        try:
            n, v = calculate_virtual_stages(num_layers, per_stage, pp, False, rounding)
        except ValueError:
            continue
        if v > MAX_VIRTUAL_STAGES:
            break
        if n not in seen:
            seen.add(n)
            out.append(("Interleaved1F1B", n, per_stage))
    return out


def enumerate_layouts(cfg, model, world_size: int, gpus_per_node: int, seq_len: int, global_batch_size: int):
    """Every :class:`Layout` of the search space (module docstring) for ``world_size`` ranks
    whose arithmetic the plan accepts: tp splits the model's shapes, ep its experts, the
    schedule runs the microbatch count, cp cuts the sequence evenly, the global batch divides.
    Yields them lazily."""
    from nemo_pp.models.module_tree import find_layer_stack
    from nemo_pp.models.moe import check_expert_parallel
    from nemo_pp.models.tp_plan import check_tensor_parallel
    from nemo_pp.models.vlm import is_vision_language
    from nemo_pp.planning.checks import check_activation_checkpointing

    d = cfg.distributed
    num_layers = len(find_layer_stack(model)[1])
    packing = bool(cfg.packed_sequence.packed_sequence_size)
    pad = cfg.dataloader.pad_seq_len_divisible
    rounding = d.pipeline.round_virtual_stages_to_pp_multiple
    checkpointing = [False] + ([True] if _accepts(check_activation_checkpointing, model) else [])
    experts = _accepts(check_expert_parallel, model, 2)
    vision = is_vision_language(model.config)  # the plan refuses tp and cp for these (checks.check_vision_language)
    for tp in _divisors(world_size):
        if tp > gpus_per_node or (vision and tp > 1) or not _accepts(check_tensor_parallel, model, tp):
            continue
        for cp in _divisors(world_size // tp):
            if cp > 1 and (vision or packing or seq_len % (2 * cp * tp) or seq_len // cp < MIN_CP_TOKENS):
                continue
            for pp in _divisors(world_size // (tp * cp)):
                dp = world_size // (tp * cp * pp)
                if pp > num_layers or global_batch_size % dp:
                    continue
                local = global_batch_size // dp
                node_dp = gpus_per_node // (cp * tp) if gpus_per_node % (cp * tp) == 0 else 0
                replicas = [1] + ([dp // node_dp] if node_dp > 1 and dp > node_dp and dp % node_dp == 0 else [])
                for rep in replicas:
                    shard = dp // rep
                    eps = [e for e in _divisors(shard * cp) if e == 1 or (experts and _accepts(
                        check_expert_parallel, model, e))]
                    for ep in eps:
                        sp = tp > 1 and ep == 1 and not packing  # the same time, less memory: always taken
                        for schedule, stages, per_stage in _schedules(pp, num_layers, rounding):
                            mbs = [local] if pp == 1 else [m for m in _divisors(local) if m <= MAX_MICROBATCH]
                            for mb in mbs:
                                if schedule != "1F1B" and local // mb > MAX_MULTI_STAGE_MICROBATCHES:
                                    continue
                                if pp > 1 and not _accepts(schedule_plan, schedule, pp, stages, local, mb):
                                    continue
                                for ac in checkpointing:
                                    yield Layout(
                                        pp=pp, dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, ep=ep,
                                        sequence_parallel=sp, schedule=schedule, num_stages=stages,
                                        layers_per_stage=per_stage, microbatch_size=mb, local_batch_size=local,
                                        grad_acc_steps=1, activation_checkpointing=ac,
                                        pad_seq_len_divisible=_lcm(pad, tp) if sp else None)


def _lcm(pad: int | None, tp: int) -> int:
    import math

    return math.lcm(pad or 1, tp)


def plan_layouts(config_path: str, overrides: list[str], nodes: int, gpus_per_node: int, device: DeviceSpec,
                 top: int = 10, seq_len: int | None = None, calibrate_device: bool = True,
                 exhaustive: bool = False) -> PlanResult:
    """Search the layouts of a config for ``nodes x gpus_per_node`` ranks of ``device``.

    Args:
        config_path / overrides: the recipe's config and command-line overrides (as
            :func:`nemo_pp.config.parse_cli` returns them); the layout's overrides go after them.
        nodes, gpus_per_node: the cluster.
        device: the accelerator (:mod:`nemo_pp.planning.devices`; a probed CPU is calibrated
            on this model's pieces first when ``calibrate_device``).
        top: layouts to return (each planned by ``plan_run``).
        seq_len: tokens per sample (default: the plan's, ``pp_seq_len`` / packed size /
            ``dataset.seq_length``).
        exhaustive: time every layout that fits (``search_space`` then holds them all); by
            default layouts whose lower bound cannot beat the best ``max(top, PRUNE_KEEP)``
            are left out unweighed.

    Returns:
        a :class:`PlanResult`; its ``candidates`` empty when no layout fits.

    Raises:
        ValueError: no ``step_scheduler.global_batch_size``, no sequence length to plan at, a
            sequence beyond the model's positions, or a vision-language model (not searched yet).
        ConfigError: the config itself is invalid.
    """
    from nemo_pp.config.cli import normalize_overrides
    from nemo_pp.models.auto_model import resolve_dtype
    from nemo_pp.planning.run_plan import build_meta_model, plan_run, planning_seq_len
    from nemo_pp.planning.schema import load_recipe_config
    from nemo_pp.planning.step_time import calibrate
    from nemo_pp.planning.throughput import PEAK_TFLOPS, model_flops

    start = time.perf_counter()
    cfg = load_recipe_config(config_path, overrides)
    world = nodes * gpus_per_node
    seq_len = seq_len or planning_seq_len(cfg)
    if not seq_len:
        raise ValueError("nemo-pp plan: no sequence length to plan at; set dataset.seq_length or pass --seq-len")
    gbs = cfg.step_scheduler.get("global_batch_size")
    if gbs is None:
        raise ValueError("nemo-pp plan: set step_scheduler.global_batch_size (the search keeps it fixed)")
    model, _ = build_meta_model(cfg, cfg.model.get("pretrained_model_name_or_path"))
    if (pipeline_dtype := resolve_dtype(cfg.distributed.pipeline.dtype, "distributed.pipeline.dtype")) is not None:
        model = model.to(pipeline_dtype)
    from nemo_pp.models.module_tree import text_config
    from nemo_pp.planning.checks import check_sequence_lengths

    check_sequence_lengths(cfg, text_config(model.config))  # wrong for every layout: said once, up front
    if not ModelMemory.supports(model):
        raise ValueError("nemo-pp plan: vision-language models are not searched yet (the memory model weighs "
                         "text decoders); choose their layout by hand (pp only: tp and cp are refused for them)")
    dtype = next(model.parameters()).dtype
    if device.cores is None and dtype.itemsize == 4 and device.name in PEAK_TFLOPS:  # fp32 matmuls run as tf32
        device = dataclasses.replace(device, peak_tflops=PEAK_TFLOPS[device.name]["tf32"])
    memory = ModelMemory.for_config(model, cfg, seq_len)
    shape = ModelShape(memory)
    layouts = list(enumerate_layouts(cfg, model, world, gpus_per_node, seq_len, gbs))
    if calibrate_device and device.cores is not None:
        device = calibrate(device, shape, sorted({lay.microbatch_size * seq_len // lay.cp for lay in layouts}),
                           sorted({lay.tp for lay in layouts}), sorted({lay.ep for lay in layouts}))
    flops = model_flops(model.config, gbs, seq_len, moe_layers=memory.moe_layers)
    # branch and bound: weigh layouts by a lower bound of their step (no simulation), stop once the
    # bound passes the slowest of the best ``keep`` simulated ones (exhaustive: time every layout)
    keep = max(top, PRUNE_KEEP)
    bounds = sorted(((predict_step_time(shape, device, lay, seq_len, gpus_per_node, bound_only=True).total_s, i)
                     for i, lay in enumerate(layouts)))
    scored, fitting, weighed, best = [], 0, 0, []
    checkpointed_needed = set()
    for bound, i in bounds:
        if not exhaustive and len(best) >= keep and bound > -best[0]:
            break
        layout = layouts[i]
        key = dataclasses.replace(layout, activation_checkpointing=False)
        if layout.activation_checkpointing and key not in checkpointed_needed:
            continue  # recomputing is only worth it where the layout without it does not fit
        weighed += 1
        rank = max(memory.rank_memory(layout, seq_len, device.reserved_bytes), key=lambda m: m.total_bytes)
        if rank.total_bytes > device.memory_bytes:
            checkpointed_needed.add(key)
            continue
        fitting += 1
        step = predict_step_time(shape, device, layout, seq_len, gpus_per_node)
        scored.append(Candidate(layout, rank, step, gbs * seq_len / step.total_s / world,
                                flops / step.total_s / world / (device.peak_tflops * 1e12)))
        heapq.heappush(best, -step.total_s)
        if len(best) > keep:
            heapq.heappop(best)
    scored.sort(key=lambda c: c.step.total_s)
    accepted, refused = [], []
    for cand in scored:
        if len(accepted) >= top:
            break
        layout_overrides = [*overrides, *normalize_overrides(cand.layout.overrides(gbs))]
        try:
            plan_run(load_recipe_config(config_path, layout_overrides), world, check_checkpoint=False,
                     meta_model=model)
        except (ValueError, NotImplementedError) as exc:
            refused.append((cand.layout, str(exc).splitlines()[0]))
            continue
        accepted.append(cand)
    return PlanResult(accepted, device, world, gpus_per_node, seq_len, gbs, search_space=scored,
                      searched=len(layouts), weighed=weighed, fitting=fitting,
                      refused=refused, seconds=time.perf_counter() - start)

