"""The schedule simulation: each pp rank's compute actions laid on a common clock.

One readiness rule (:func:`_needs`) serves every use: the slot grid behind the picture and
the bubble fraction (:func:`simulate`, one slot per action), the step time of the cost
model (:func:`simulated_step_seconds`, actions lasting their stage's share of a measured or
modelled time) and the microbatches each stage holds in the memory plan
(:func:`microbatches_in_flight`). An action runs once its rank is free and its inputs
exist: a forward needs the previous stage's forward of the same microbatch, a (full or
input) backward its own forward and the next stage's backward, a weight backward its
input backward. Communication is a delay on the edges between ranks where one is given
(:func:`simulated_step_seconds`' ``transfer_seconds``); the rest of the step-time model is
:mod:`nemo_pp.planning.step_time`.
"""

from __future__ import annotations

import functools

from torch.distributed.pipelining.schedules import get_schedule_class

from nemo_pp._torch_compat import Action, ComputationType, schedule_action_lists
from nemo_pp.planning.pipeline import PipelinePlan
from nemo_pp.planning.schedules import canonical_schedule_name

__all__ = ["bubble_fraction", "microbatches_in_flight", "schedule_actions", "simulate", "simulated_step_seconds"]

_COMPUTE = {"FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"}
#: share of a stage's forward + backward time per action (backward costs twice the forward)
_SHARE = {"FORWARD": 1 / 3, "FULL_BACKWARD": 2 / 3, "BACKWARD_INPUT": 1 / 3, "BACKWARD_WEIGHT": 1 / 3}


def _kind(action) -> str:
    return action.computation_type.name


def _done_key(action) -> tuple[int, int, str]:
    """What finishing ``action`` makes available: ``(stage, microbatch, "F" | "B" | "W")``."""
    kind = _kind(action)
    tag = "F" if kind == "FORWARD" else "W" if kind == "BACKWARD_WEIGHT" else "B"
    return action.stage_index, action.microbatch_index, tag


def _needs(action, num_stages: int) -> list[tuple[int, int, str]]:
    """The finished actions (as :func:`_done_key` names them) that ``action`` waits for."""
    s, m, kind = action.stage_index, action.microbatch_index, _kind(action)
    if kind == "FORWARD":
        return [] if s == 0 else [(s - 1, m, "F")]
    if kind == "BACKWARD_WEIGHT":
        return [(s, m, "B")]
    return [(s, m, "F")] + ([] if s == num_stages - 1 else [(s + 1, m, "B")])


def _compute_actions(row):
    """The compute actions of a rank's list in order; DualPipeV's OVERLAP_F_B as its F then its B."""
    for a in row:
        if a is not None and a.sub_actions:
            yield from _compute_actions(a.sub_actions)
        elif a is not None and _kind(a) in _COMPUTE:
            yield a


def simulate(ranks: list[list]) -> list[list]:
    """Lay per-rank action lists on a common clock, one slot per action; ``None`` marks an
    idle slot. What an action makes available is seen by other ranks from the next slot on.

    Returns:
        ``grid[rank][slot]``: an ``Action`` or None, every row as long as the longest.

    Raises:
        ValueError: the lists deadlock (an action waits on something never run).
    """
    queues = [list(_compute_actions(r)) for r in ranks]
    num_stages = 1 + max((a.stage_index for q in queues for a in q), default=0)
    done: set = set()
    grid: list[list] = [[] for _ in queues]
    pos = [0] * len(queues)
    while any(p < len(q) for p, q in zip(pos, queues)):
        ran = []
        for r, q in enumerate(queues):
            if pos[r] < len(q) and all(n in done for n in _needs(q[pos[r]], num_stages)):
                ran.append(q[pos[r]])
                grid[r].append(q[pos[r]])
                pos[r] += 1
            else:
                grid[r].append(None)
        if not ran:
            raise ValueError("schedule deadlocks: no rank can run its next action")
        done.update(_done_key(a) for a in ran)
    width = max(len(g) for g in grid)
    return [g + [None] * (width - len(g)) for g in grid]


def single_stage_action_lists(name: str, pp_size: int, n_microbatches: int) -> list[list]:
    """What GPipe / 1F1B execute on each rank: all forwards then all backwards, or
    ``min(m, p - r)`` warm-up forwards then alternating backward/forward (PipeDream-Flush;
    Narayanan et al., 2019)."""
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


def schedule_actions(schedule: PipelinePlan | str, pp_size: int | None = None, n_microbatches: int | None = None,
                     stages_per_rank: int | None = None) -> list[list]:
    """``actions[rank][slot]`` (an ``Action`` or None) of a planned schedule, no process group needed.

    Args:
        schedule: a :class:`PipelinePlan` (a CSV plan replays its rows), or a schedule name,
            then with ``pp_size``, ``n_microbatches`` and ``stages_per_rank``.

    Raises:
        ValueError: an unknown schedule name, or action lists that deadlock.
    """
    if isinstance(schedule, PipelinePlan):
        plan = schedule
        if plan.csv_actions is not None:
            return simulate([list(row) for row in plan.csv_actions])
        return schedule_actions(plan.schedule, plan.pp_size, plan.n_microbatches, plan.stages_per_rank)
    grid = _named_schedule_grid(canonical_schedule_name(schedule), pp_size, n_microbatches, stages_per_rank)
    return [list(row) for row in grid]


@functools.lru_cache(maxsize=1024)
def _named_schedule_grid(name: str, pp_size: int, n_microbatches: int, stages_per_rank: int) -> tuple:
    """:func:`simulate` of a named schedule's action lists, cached: torch builds them through a
    mocked schedule (tens of milliseconds each) and a layout search asks for the same ones often."""
    if name in ("GPipe", "1F1B"):
        grid = simulate(single_stage_action_lists(name, pp_size, n_microbatches))
    else:
        grid = simulate(schedule_action_lists(get_schedule_class(name), pp_size, n_microbatches, stages_per_rank))
    return tuple(tuple(row) for row in grid)


def bubble_fraction(actions: list[list]) -> float:
    """Idle share of all ranks' timelines, one slot per compute action.

    With forward and backward one slot each, GPipe and 1F1B give the textbook
    ``(p - 1) / (m + p - 1)`` for p stages and m microbatches (Huang et al., GPipe, 2019).
    """
    slots = sum(len(r) for r in actions)
    return sum(a is None for r in actions for a in r) / max(1, slots)


def simulated_step_seconds(plan: PipelinePlan, stage_seconds: list[float], transfer_seconds: float = 0.0) -> float:
    """Duration in seconds of one ``schedule.step`` (all microbatches) when stage ``s`` takes
    ``stage_seconds[s]`` per microbatch forward + backward: a forward is a third of that, a
    full backward two thirds, an input or a weight backward a third each. For 1F1B this gives
    ``(m + p - 1) x`` the slowest stage when stages are equal (Narayanan et al., 2021).

    Args:
        transfer_seconds: the point-to-point time of one activation (or its gradient) between
            stages on different pp ranks: an action waits that long for an input another rank
            made (torch's sends are asynchronous, so the sender does not wait).

    Raises:
        ValueError: the plan's action lists deadlock.
    """
    rows = _action_rows(plan)
    owner = {s: r for r, ids in enumerate(plan.stage_ids) for s in ids}
    done: dict[tuple, float] = {}
    free = [0.0] * len(rows)
    pos = [0] * len(rows)
    while any(p < len(r) for p, r in zip(pos, rows)):
        progressed = False
        for rank, row in enumerate(rows):
            while pos[rank] < len(row):
                key, kind, needs = row[pos[rank]]
                if any(n not in done for n in needs):
                    break
                start = free[rank]
                for n in needs:
                    start = max(start, done[n] + (transfer_seconds if owner[n[0]] != rank else 0.0))
                free[rank] = done[key] = start + _SHARE[kind] * stage_seconds[key[0]]
                pos[rank] += 1
                progressed = True
        if not progressed:
            raise ValueError("schedule deadlocks: no rank can run its next action")
    return max(free)


@functools.lru_cache(maxsize=1024)
def _action_rows(plan: PipelinePlan) -> tuple:
    """Per rank, ``(done key, kind, needs)`` of its compute actions in order (cached: a search
    times many layouts of the same schedule)."""
    num_stages = plan.num_stages
    return tuple(tuple((_done_key(a), _kind(a), tuple(_needs(a, num_stages))) for a in row if a is not None)
                 for row in schedule_actions(plan))


def microbatches_in_flight(plan: PipelinePlan) -> list[list[dict]]:
    """Per rank, per time slot of the simulated schedule: ``{stage: microbatches whose
    forward ran and whose backward (the weight part, for split backward) has not}``."""
    timelines = []
    for row in schedule_actions(plan):
        held: dict[int, int] = {}
        slots = []
        for action in row:
            if action is not None:
                kind = _kind(action)
                if kind == "FORWARD":
                    held[action.stage_index] = held.get(action.stage_index, 0) + 1
                elif kind in ("FULL_BACKWARD", "BACKWARD_WEIGHT"):
                    held[action.stage_index] -= 1
            slots.append(dict(held))
        timelines.append(slots)
    return timelines
