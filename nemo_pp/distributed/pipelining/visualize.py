"""Pictures of schedules: a built schedule's per-rank actions and a PNG timeline.

The simulation itself (the readiness rule, the slot grid, the bubble fraction) is
:mod:`nemo_pp.planning.timeline`; this module reads a *built* torch schedule (its own
action lists) and draws any grid.
"""

from __future__ import annotations

from torch.distributed.pipelining.schedules import PipelineScheduleSingle, ScheduleGPipe

from nemo_pp._torch_compat import single_stage_schedule_shape
from nemo_pp.planning.timeline import bubble_fraction, simulate, single_stage_action_lists
from nemo_pp.planning.timeline import schedule_actions as planned_schedule_actions

_COLORS = {"FORWARD": "#4e79a7", "FULL_BACKWARD": "#f28e2b", "BACKWARD_INPUT": "#e15759", "BACKWARD_WEIGHT": "#76b7b2"}


def schedule_actions(schedule, pp_size: int | None = None, n_microbatches: int | None = None,
                     stages_per_rank: int | None = None) -> list[list]:
    """``actions[rank][slot]`` (an ``Action`` or None) of a schedule.

    Args:
        schedule: a built schedule (its ``pipeline_order``, so a CSV schedule works), a
            ``PipelinePlan`` or a schedule name, then with ``pp_size``, ``n_microbatches``
            and ``stages_per_rank`` (:func:`nemo_pp.planning.timeline.schedule_actions`).

    Raises:
        ValueError: a schedule without action lists, or lists that deadlock.
    """
    if isinstance(schedule, PipelineScheduleSingle):
        # single-stage schedules run their own loop; their pipeline_order is not what executes
        name = "GPipe" if isinstance(schedule, ScheduleGPipe) else "1F1B"
        return simulate(single_stage_action_lists(name, *single_stage_schedule_shape(schedule)))
    if not hasattr(schedule, "pipeline_order") and not hasattr(schedule, "_get_pipeline_order"):
        return planned_schedule_actions(schedule, pp_size, n_microbatches, stages_per_rank)
    order = getattr(schedule, "pipeline_order", None)
    if not order:
        raise ValueError(f"{type(schedule).__name__} exposes no pipeline_order to draw")
    return simulate([order[r] for r in sorted(order)])


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
            ax.add_patch(Rectangle((t, rank), 1, 0.9, facecolor=_COLORS[a.computation_type.name], edgecolor="black", linewidth=0.5))
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
