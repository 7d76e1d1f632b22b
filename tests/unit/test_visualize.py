"""Schedule timelines: bubble fractions against the textbook formula, and the picture."""

import pytest

from nemo_pp.distributed.pipelining.visualize import save_schedule_png
from nemo_pp.planning.timeline import bubble_fraction, schedule_actions


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,mb", [(2, 4), (4, 8), (4, 4)])
def test_single_stage_bubble_is_the_textbook_formula(name, pp, mb):
    assert bubble_fraction(schedule_actions(name, pp, mb, 1)) == pytest.approx((pp - 1) / (mb + pp - 1))


def test_multi_stage_schedules_shrink_the_bubble():
    one = bubble_fraction(schedule_actions("1f1b", 2, 4, 1))
    for name in ("interleaved_1f1b", "looped_bfs", "zero_bubble", "zbv", "dualpipev"):
        actions = schedule_actions(name, 2, 4, 2)
        kinds = [a.computation_type.name for r in actions for a in r if a is not None]
        assert kinds.count("FORWARD") == 4 * 4  # every (stage, microbatch) forward, once
        assert bubble_fraction(actions) < one, name


def test_png_is_written(tmp_path):
    path = save_schedule_png(schedule_actions("interleaved_1f1b", 2, 4, 2), str(tmp_path / "s.png"), "Interleaved1F1B")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
