"""Model FLOPs, the peak MFU is measured against, and a step's TFLOP/s and MFU."""

import pytest
import torch

from nemo_pp.planning.cost import flop_costs
from nemo_pp.planning.throughput import PEAK_TFLOPS, device_peak_tflops, measure_gemm_tflops, mfu, model_flops
from nemo_pp.training.flops import FlopsMeter
from tests.tiny_models import tiny_config, tiny_model


def test_model_flops_are_the_cost_models_pieces_and_scale_with_the_batch():
    config = tiny_config("llama", tied=False, layers=4)
    costs = flop_costs(config, 2, 16)
    assert model_flops(config, 2, 16) == sum(costs.layers) + costs.head
    assert model_flops(config, 4, 16) == pytest.approx(2 * model_flops(config, 2, 16))


def test_model_flops_match_torchs_flop_counter_on_a_whole_model():
    """Forward + backward of the real tiny model counted by torch.utils.flop_counter (matrix
    products and attention) equals the cost model's count."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("llama", False, 2)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    counted = counter.get_total_flops()
    # they differ only in attention: the cost model counts the causal keys a query sees ((S + 1) / 2), torch's
    # counter SDPA's formula (4.8 % of the total here)
    assert model_flops(model.config, 2, 16) == pytest.approx(counted, rel=0.06)


def test_the_gemm_probe_and_the_peak_sources():
    assert measure_gemm_tflops(size=256, repeats=2) > 0
    assert device_peak_tflops(torch.device("cpu"), torch.float32, override=1.5) == (1.5, "logging.peak_tflops")
    peak, source = device_peak_tflops(torch.device("cpu"), torch.float32)
    assert peak > 0 and source == f"GEMM probe at {torch.get_num_threads()} threads"


def test_a_known_gpu_by_name_and_an_unknown_one(monkeypatch):
    """No GPU here: the device name is what cannot exist, so only it is given."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_tflops(torch.device("cuda", 0), torch.bfloat16) == (PEAK_TFLOPS["H100"]["bf16"],
                                                                        "H100 bf16 data sheet")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Accelerator 9000")
    peak, source = device_peak_tflops(torch.device("cuda", 0), torch.bfloat16)
    assert peak is None and "set logging.peak_tflops" in source


def test_step_and_run_metrics():
    model = tiny_model("llama", False, 2)
    meter = FlopsMeter.for_model(model, torch.device("cpu"), torch.float32, world_size=2, peak_tflops=0.01)
    batches = [{"input_ids": torch.zeros(2, 16, dtype=torch.long)}] * 3
    out = meter.step_metrics(batches, tokens=2 * 96, seconds=0.5)  # two dp ranks' tokens
    flops = 2 * 3 * model_flops(model.config, 2, 16)
    assert out["model_flops"] == pytest.approx(flops)
    assert out["tflops"] == pytest.approx(flops / 0.5 / 1e12)
    assert out["tflops_per_rank"] == pytest.approx(out["tflops"] / 2)
    assert out["mfu"] == pytest.approx(out["tflops_per_rank"] / 0.01)
    run = meter.run_metrics(flops, 0.5)
    assert run["train_mfu"] == pytest.approx(out["mfu"])
    assert "MFU" in FlopsMeter.describe_run(run) and meter.run_metrics(0.0, 0.0) == {}
    assert mfu(1e12, 1.0, 1, None) == (1.0, 1.0, None)
