"""The guide's CustomModel pipelined through the functional API with a user split."""

from tests.distributed.launcher import run_ranks
from tests.helpers import load_custom_model_example


def _run(rank, world):
    return load_custom_model_example().run()


def test_custom_model_matches_unsplit_model():
    results = run_ranks(_run, 2)
    for r in results:
        assert r["max_grad_diff"] < 1e-5
        assert r["parallelize_calls"] == 1  # ParallelizeFnProtocol: once per model part
    last = results[1]
    assert abs(last["pipeline_loss"] - last["reference_loss"]) < 1e-4
