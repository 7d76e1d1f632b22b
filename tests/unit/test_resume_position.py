"""The data position and the stop signal that make a resume exact."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from nemo_pp.training.data import ResumableDistributedSampler
from nemo_pp.training.preemption import PreemptionWatcher


def _global_order(n: int, dp: int, consumed: int, epoch: int = 3) -> list[int]:
    """The samples the dp ranks read from ``consumed`` on, interleaved back into one global order."""
    shards = []
    for rank in range(dp):
        s = ResumableDistributedSampler(range(n), num_replicas=dp, rank=rank, shuffle=True, seed=7, drop_last=True)
        s.set_epoch(epoch, consumed)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    return [shards[r][i] for i in range(len(shards[0])) for r in range(dp)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_position_in_global_samples_resumes_the_same_order_at_any_dp(dp):
    n = 42  # not a multiple of every dp: each cuts its own tail
    full = _global_order(n, 1, 0)
    assert sorted(full) == list(range(n)) and full != list(range(n))  # a real permutation
    for consumed in (0, 8, 16, 24):
        assert _global_order(n, dp, consumed) == full[consumed: n // dp * dp]


def test_a_new_epoch_starts_at_zero_and_a_bad_position_is_refused():
    s = ResumableDistributedSampler(range(10), num_replicas=2, rank=0, shuffle=False, drop_last=True)
    s.set_epoch(0, 6)
    assert list(s) == [6, 8]
    s.set_epoch(1)
    assert list(s) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="multiple of the dp size"):
        s.set_epoch(0, 3)
    with pytest.raises(ValueError, match="at most 10"):
        s.set_epoch(0, 12)


def test_sigterm_is_noted_and_the_previous_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher(torch.device("cpu")) as watcher:
        assert not watcher.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested() and watcher.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_disabled_watcher_leaves_sigterm_deadly():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher(torch.device("cpu"), enabled=False) as watcher:
        assert signal.getsignal(signal.SIGTERM) is before and not watcher.requested()
