"""The cost model's all-to-all volume under expert parallelism
(``nemo_pp.planning.cost.expert_all_to_all_bytes``) against the bytes the ep ranks really
send through ``torch.distributed.all_to_all_single`` in one forward + backward of a tiny
Mixtral at ep 2, with and without recomputation, summed over the ep ranks. The routing is
whatever the random router gives, so the model is fed the measured share of assignments
that left their rank."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_ranks


def _run(rank, world, activation_checkpointing):
    import copy
    import functools

    import torch
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    from nemo_pp.distributed.expert_parallel import ExpertParallel
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.models.moe import moe_layer_indices, router_spec
    from nemo_pp.planning.cost import expert_all_to_all_bytes
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from tests.helpers import moe_family_model

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, ep_size=world))
    model = copy.deepcopy(moe_family_model("mixtral"))
    ExpertParallel(mesh.ep)(model)
    if activation_checkpointing:  # the MoE blocks recomputed in backward (their all-to-alls run again)
        for layer in model.model.layers:
            layer.mlp.forward = functools.partial(checkpoint, layer.mlp.forward, use_reentrant=False)
    sent = {"bytes": 0, "token_rows": 0}
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input_split_sizes is not None:  # the counts exchange (equal splits of ep ints) is left out
            row = input[0].numel() * input.element_size() if input.numel() else 0
            remote = sum(n for r, n in enumerate(input_split_sizes) if r != rank)
            sent["bytes"] += remote * row
            if not input.dtype.is_floating_point:
                sent["token_rows"] += remote  # each forward run's local expert index per assignment
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        b, s = 2, 16
        ids = torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(rank))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    finally:
        dist.all_to_all_single = original
    # a rank sends back the outputs of what it received, so per rank sends and receives
    # differ with the routing; summed over the ep ranks they are the model's balanced count
    totals = torch.tensor([sent["bytes"], sent["token_rows"]], dtype=torch.float64)
    dist.all_reduce(totals)
    sent = {"bytes": totals[0].item(), "token_rows": totals[1].item()}
    layers = len(moe_layer_indices(model, router_spec(model)))
    k = model.config.num_experts_per_tok
    runs = 2 if activation_checkpointing else 1  # dispatch rows counted per forward run
    share = sent["token_rows"] / runs / (world * layers * b * s * k)
    want = world * layers * expert_all_to_all_bytes(model.config, b, s, world, dtype_bytes=4,
                                            activation_checkpointing=activation_checkpointing, remote_share=share)
    assert 0 < share < 1 and sent["bytes"] == pytest.approx(want, rel=1e-9), (sent, want, share)
    return True


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_all_to_all_bytes_sent_equal_the_cost_model(activation_checkpointing):
    run_ranks(_run, 2, activation_checkpointing, timeout=180)
