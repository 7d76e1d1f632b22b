"""Vision-language models through the pipeline: at 2 and 4 stages the loss and every
gradient (vision encoder and projector included) equal Hugging Face's forward of the unsplit
model, on batches whose image counts and lengths differ between steps and within a batch.

Images reach only the first stage, split per microbatch along the batch axis of nemo_pp's
batch-major layout (:mod:`nemo_pp.models.vlm`); Qwen2-VL's 3-D rotary positions reach every
stage, split along their batch axis 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.helpers import ATOL, sum_ce, vlm_batch, vlm_reference

FAMILIES = ("llava", "qwen2_vl", "gemma3", "idefics3")
#: per step: (images per sample, sequence length); a sample without images, one with two
STEPS = (([1, 0, 2, 1], 48), ([0, 2, 1, 0], 40))


def _pipelined(rank, world, model_type, microbatch_size=1, validate=False, wrong_positions=None):
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine
    from tests.tiny_models import tiny_vlm

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    ref = tiny_vlm(model_type)
    model = copy.deepcopy(ref)
    batches = [vlm_batch(model_type, counts, seq_len, seed=i) for i, (counts, seq_len) in enumerate(STEPS)]
    if validate:
        ref.eval()
        with torch.no_grad():
            ref_loss, _, tokens = vlm_reference(ref, batches, backward=False)
    else:
        ref_loss, ref_grads, tokens = vlm_reference(ref, batches)
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=4, pp_microbatch_size=microbatch_size,
                      split="uniform", device=torch.device("cpu")).build(model, loss_fn=sum_ce)
    engine = TrainEngine(ap, torch.device("cpu"))
    if wrong_positions is not None:  # a deliberately wrong split of the 3-D position ids
        import nemo_pp.training.engine as engine_module

        original = engine_module.pipeline_inputs

        def wrong(*args):
            kwargs, dims = original(*args)
            if wrong_positions == "axis0":  # torch's default split
                return kwargs, {}
            return {**kwargs, "position_ids": kwargs["position_ids"].roll(1, dims=1)}, dims  # a neighbour's rows

        engine_module.pipeline_inputs = wrong
    if validate:
        loss = engine.validation_loss([b for b, _ in batches])
        assert abs(loss - ref_loss) < ATOL * max(1.0, ref_loss), (loss, ref_loss)
        return True
    total = sum(float(engine._forward(b, train=True)) for b, _ in batches)
    total = engine._global_loss(torch.tensor(total), torch.tensor(float(tokens)))
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()
    checked = []
    for part in ap.parts:
        for name, p in part.named_parameters():
            if name not in ref_grads:  # unused by the forward (LLaVA's last vision layer)
                assert p.grad is None or not p.grad.any(), name
                continue
            torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            checked.append(name)
    assert abs(total - ref_loss) < ATOL * max(1.0, ref_loss), (total, ref_loss)
    return checked


def _checked_everywhere(results, ref_names):
    seen = {n for names in results for n in names}
    missing = set(ref_names) - seen
    assert not missing, f"gradients never compared: {sorted(missing)[:5]}"


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_vlm_matches_hf_forward(model_type, pp):
    from tests.tiny_models import tiny_vlm

    results = run_ranks(_pipelined, pp, model_type, timeout=240)
    ref = tiny_vlm(model_type)
    _, grads, _ = vlm_reference(ref, [vlm_batch(model_type, c, s, seed=i) for i, (c, s) in enumerate(STEPS)])
    _checked_everywhere(results, grads)
    vision = [n for n in grads if any(k in n for k in ("vision", "visual", "projector", "connector"))]
    assert vision, "the vision encoder has gradients in the reference"


def test_vlm_microbatches_of_two_samples():
    """Two samples per microbatch: each microbatch's images are its own samples' images."""
    run_ranks(_pipelined, 2, "qwen2_vl", 2, timeout=240)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_vlm_validation_loss_matches_hf(model_type):
    run_ranks(_pipelined, 2, model_type, 1, True, timeout=240)


def test_qwen2_vl_positions_split_wrongly_fail():
    """Qwen2-VL's ``position_ids: [3, B, S]`` split along torch's default axis 0 cannot even
    form 4 microbatches from its 3 rows; a split that hands each microbatch another sample's
    rows runs and gives gradients unequal to the unsplit model's."""
    with pytest.raises(AssertionError, match="Expecting 4 arg_mbs but got 3"):
        run_ranks(_pipelined, 2, "qwen2_vl", 1, False, "axis0", timeout=240)
    with pytest.raises(AssertionError, match="are not close"):
        run_ranks(_pipelined, 2, "qwen2_vl", 1, False, "neighbour", timeout=240)
