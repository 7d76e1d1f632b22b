"""NeMo names that no other test reaches: ``functional._get_optional_hook`` and
``AutoPipeline.log_debug_summary``."""

from __future__ import annotations

import logging

from tests.distributed.launcher import run_ranks
from tests.tiny_models import tiny_model


def test_get_optional_hook_returns_callables_only():
    from nemo_pp.distributed.pipelining.functional import _get_optional_hook

    class Model:
        hook = staticmethod(lambda: 3)
        not_a_hook = 3

    assert _get_optional_hook(Model(), "hook")() == 3
    assert _get_optional_hook(Model(), "not_a_hook") is None
    assert _get_optional_hook(Model(), "missing") is None


def _log_summary(rank, world):
    import torch

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("nemo_pp.distributed.pipelining.autopipeline")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="gpipe", pp_batch_size=2, device=torch.device("cpu"))
    ap.build(tiny_model("llama", layers=2), loss_fn=lambda out, y: out.sum())
    ap.log_debug_summary()
    return records[-1], ap.debug_summary()


def test_log_debug_summary_logs_the_debug_summary():
    (logged, summary), = run_ranks(_log_summary, 1)
    assert logged == summary and "AutoPipeline: enabled=True" in summary
