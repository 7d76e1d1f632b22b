"""The private-API shim: torch 2.13's path runs for real in the distributed tests; the
torch 2.11 path is exercised here on a stand-in with 2.11's attribute names (2.11
cannot be installed beside 2.13)."""

import pytest
import torch

from nemo_pp import _torch_compat as compat


class Stage211:
    """The attributes torch 2.11's PipelineStage uses for static metadata."""

    def __init__(self):
        self.inputs_meta = None
        self._outputs_meta = None

    def _configure_outputs_meta(self, outputs_meta):
        assert self._outputs_meta is None, "Attempting to reconfigure output_meta, which is not supported"
        self._outputs_meta = tuple(outputs_meta)


def test_this_torch_uses_the_new_api():
    assert compat.STAGE_META_API == ("new" if torch.__version__ >= (2, 12) else "old")


def test_old_api_sets_and_resets_static_meta(monkeypatch):
    monkeypatch.setattr(compat, "STAGE_META_API", "old")
    stage = Stage211()
    x = torch.empty(1, 16, 8, device="meta", requires_grad=True)
    compat.set_static_stage_meta(stage, (x,), (x,))
    assert compat.stage_uses_static_meta(stage)
    y = torch.empty(1, 32, 8, device="meta", requires_grad=True)
    compat.set_static_stage_meta(stage, (y,), (y,))  # a second call must not trip 2.11's assert
    assert stage.inputs_meta[0].shape == (1, 32, 8) and stage._outputs_meta[0].shape == (1, 32, 8)


def test_mark_schedule_uninitialized_old_and_new_flags():
    class Old:
        _stages_initialized = True

    class New:
        _stage_forward_initialized = True
        _stage_backward_initialized = True

    old, new = Old(), New()
    compat.mark_schedule_uninitialized(old)
    compat.mark_schedule_uninitialized(new)
    assert old._stages_initialized is False
    assert new._stage_forward_initialized is False and new._stage_backward_initialized is False
    with pytest.raises(RuntimeError, match="_torch_compat.py"):
        compat.mark_schedule_uninitialized(object())
