"""Schedule timelines: per-rank action grids, their bubble fraction, and a PNG picture.

The grid replays each rank's action list in order, one time slot per compute action,
a rank idling while the action it is due to run waits on another rank (the
forward of the previous stage, the backward of the next). Idle slots are the bubble.
"""

from __future__ import annotations

from torch.distributed.pipelining.schedules import PipelineScheduleSingle, ScheduleGPipe

from .._torch_compat import Action, ComputationType, schedule_action_lists, single_stage_schedule_shape
from .plan import PipelinePlan
from .schedules import canonical_schedule_name

_FORWARD, _BACKWARDS = "FORWARD", ("FULL_BACKWARD", "BACKWARD_INPUT")
_COMPUTE = {"FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"}
_COLORS = {"FORWARD": "#4e79a7", "FULL_BACKWARD": "#f28e2b", "BACKWARD_INPUT": "#e15759", "BACKWARD_WEIGHT": "#76b7b2"}


def _kind(action) -> str:
    return action.computation_type.name


def _ready(action, done: set, num_stages: int) -> bool:
    s, m, kind = action.stage_index, action.microbatch_index, _kind(action)
    if kind == _FORWARD:
        return s == 0 or (s - 1, m, "F") in done
    if kind in _BACKWARDS:
        return (s, m, "F") in done and (s == num_stages - 1 or (s + 1, m, "B") in done)
    return (s, m, "B") in done  # BACKWARD_WEIGHT after its BACKWARD_INPUT


def simulate(ranks: list[list]) -> list[list]:
    """Lay per-rank action lists on a common clock; ``None`` marks an idle slot.

    Raises:
        ValueError: the lists deadlock (an action waits on something never run).
    """
    def flat(row):
        for a in row:
            if a is not None and a.sub_actions:  # DualPipeV's OVERLAP_F_B: its F then its B
                yield from flat(a.sub_actions)
            elif a is not None and _kind(a) in _COMPUTE:
                yield a

    queues = [list(flat(r)) for r in ranks]
    num_stages = 1 + max((a.stage_index for q in queues for a in q), default=0)
    done: set = set()
    grid: list[list] = [[] for _ in queues]
    pos = [0] * len(queues)
    while any(p < len(q) for p, q in zip(pos, queues)):
        ran = []
        for r, q in enumerate(queues):
            if pos[r] < len(q) and _ready(q[pos[r]], done, num_stages):
                ran.append(q[pos[r]])
                grid[r].append(q[pos[r]])
                pos[r] += 1
            else:
                grid[r].append(None)
        if not ran:
            raise ValueError("schedule deadlocks: no rank can run its next action")
        for a in ran:  # visible to other ranks from the next slot on
            done.add((a.stage_index, a.microbatch_index, "F" if _kind(a) == _FORWARD else "B"))
    width = max(len(g) for g in grid)
    return [g + [None] * (width - len(g)) for g in grid]


def _single_stage_lists(name: str, pp_size: int, n_microbatches: int) -> list[list]:
    """What GPipe / 1F1B execute on each rank: all forwards then all backwards, or
    ``min(m, p - r)`` warm-up forwards then alternating backward/forward (PipeDream-Flush)."""
    F, B = ComputationType.FORWARD, ComputationType.FULL_BACKWARD
    lists = []
    for r in range(pp_size):
        fwd = [Action(r, F, m) for m in range(n_microbatches)]
        bwd = [Action(r, B, m) for m in range(n_microbatches)]
        if name == "GPipe":
            lists.append(fwd + bwd)
            continue
        warm = min(n_microbatches, pp_size - r)
        order = fwd[:warm]
        for i in range(n_microbatches - warm):
            order += [bwd[i], fwd[warm + i]]
        lists.append(order + bwd[n_microbatches - warm:])
    return lists


def schedule_actions(schedule, pp_size: int | None = None, n_microbatches: int | None = None,
                     stages_per_rank: int | None = None) -> list[list]:
    """``actions[rank][slot]`` (an ``Action`` or None) of a schedule.

    Args:
        schedule: a built schedule (its ``pipeline_order``, so a CSV schedule works), a
            ``PipelinePlan`` (no process group needed), or a schedule name, then with
            ``pp_size``, ``n_microbatches`` and ``stages_per_rank``.
    """
    if isinstance(schedule, PipelinePlan):
        plan = schedule
        if plan.csv_actions is not None:
            return simulate([list(row) for row in plan.csv_actions])
        return schedule_actions(plan.schedule, plan.pp_size, plan.n_microbatches, plan.stages_per_rank)
    if isinstance(schedule, str):
        from torch.distributed.pipelining.schedules import get_schedule_class

        name = canonical_schedule_name(schedule)
        if name in ("GPipe", "1F1B"):
            return simulate(_single_stage_lists(name, pp_size, n_microbatches))
        return simulate(schedule_action_lists(get_schedule_class(name), pp_size, n_microbatches, stages_per_rank))
    if isinstance(schedule, PipelineScheduleSingle):
        # single-stage schedules run their own loop; their pipeline_order is not what executes
        name = "GPipe" if isinstance(schedule, ScheduleGPipe) else "1F1B"
        return simulate(_single_stage_lists(name, *single_stage_schedule_shape(schedule)))
    order = getattr(schedule, "pipeline_order", None)
    if not order:
        raise ValueError(f"{type(schedule).__name__} exposes no pipeline_order to draw")
    return simulate([order[r] for r in sorted(order)])


def bubble_fraction(actions: list[list]) -> float:
    """Idle share of all ranks' timelines, one slot per compute action.

    With forward and backward one slot each, GPipe and 1F1B give the textbook
    ``(p - 1) / (m + p - 1)`` for p stages and m microbatches (Huang et al., GPipe, 2019).
    """
    slots = sum(len(r) for r in actions)
    return sum(a is None for r in actions for a in r) / max(1, slots)


def save_schedule_png(actions: list[list], filename: str, title: str = "") -> str:
    """Draw ``actions`` as one row per pp rank (stage and microbatch in each box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    width = max(len(r) for r in actions)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * width + 2), 0.7 * len(actions) + 1.6))
    for rank, row in enumerate(actions):
        for t, a in enumerate(row):
            if a is None:
                continue
            ax.add_patch(Rectangle((t, rank), 1, 0.9, facecolor=_COLORS[_kind(a)], edgecolor="black", linewidth=0.5))
            ax.text(t + 0.5, rank + 0.45, f"{a.stage_index}.{a.microbatch_index}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, width)
    ax.set_ylim(len(actions), 0)
    ax.set_yticks([r + 0.45 for r in range(len(actions))], [f"pp_rank {r}" for r in range(len(actions))])
    ax.set_xlabel("time slot (box: stage.microbatch)")
    bubble = bubble_fraction(actions)
    ax.set_title(f"{title} bubble {100 * bubble:.1f}%".strip())
    ax.legend(handles=[Patch(color=c, label=k.lower()) for k, c in _COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)
    return filename
