"""The guide's CustomModel pipelined through the functional API with a user split."""

import importlib.util
from pathlib import Path

from tests.distributed.launcher import run_ranks

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model_pipeline.py"


def _load():
    spec = importlib.util.spec_from_file_location("custom_model_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(rank, world):
    return _load().run()


def test_custom_model_matches_unsplit_model():
    results = run_ranks(_run, 2)
    for r in results:
        assert r["max_grad_diff"] < 1e-5
        assert r["parallelize_calls"] == 1  # ParallelizeFnProtocol: once per model part
    last = results[1]
    assert abs(last["pipeline_loss"] - last["reference_loss"]) < 1e-4
