"""Pipeline a non-Hugging-Face model with the functional API (the guide's CustomModel).

    torchrun --nproc_per_node=2 examples/custom_model_pipeline.py

A custom model is pipelined with ``patch_inner_model=False, patch_causal_lm_model=False``
and a user split (``module_fqns_per_model_part``). Its ``forward`` must work on a
pruned copy: modules of other stages are ``None`` and ``layers`` becomes a
``ModuleDict`` keyed by the original index. The script checks the pipelined loss and
gradients against the unsplit model and prints both.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


class CustomTransformerBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size * 4), nn.GELU(), nn.Linear(hidden_size * 4, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn_out, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm1(x + attn_out)
        return self.norm2(x + self.mlp(x))


class CustomModel(nn.Module):
    """``input_ids [B, S] int64 -> logits [B, S, V]``; any contiguous slice of it runs alone."""

    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([CustomTransformerBlock(hidden_size) for _ in range(num_layers)])
        self.output_proj = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:  # first stage: token ids -> hidden states
            x = self.embedding(x)
        layers = self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers
        for layer in layers:
            x = layer(x)
        if self.output_proj is not None:  # last stage: hidden states -> logits
            x = self.output_proj(x)
        return x


#: The user split for 2 stages: embedding + 2 blocks | 2 blocks + output projection.
SPLIT = [["embedding", "layers.0", "layers.1"], ["layers.2", "layers.3", "output_proj"]]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def run(batch_size: int = 4, seq_len: int = 8, split: list[list[str]] | None = SPLIT) -> dict:
    """Pipeline ``CustomModel`` over the default process group (2 ranks); compare with
    the unsplit model. Returns this rank's max grad difference and the losses.

    With ``split=None`` the split is read from the module tree: modules registered
    before ``layers`` (the embedding) join the first stage, those after it (the output
    projection) the last."""
    from torch.distributed.device_mesh import init_device_mesh

    from nemo_pp.distributed.pipelining.functional import pipeline_model

    torch.manual_seed(0)
    reference = CustomModel()
    model = copy.deepcopy(reference)
    ids = torch.randint(0, 64, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 64, (batch_size, seq_len), generator=torch.Generator().manual_seed(2))
    ref_loss = loss_fn(reference(ids), targets)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    calls = []
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pp",))
    schedule, parts, has_first, has_last, stages = pipeline_model(
        model, world_mesh=mesh, moe_mesh=None, pp_axis_name="pp", dp_axis_names=("dp",),
        pipeline_parallel_schedule="1f1b", microbatch_size=1, local_batch_size=batch_size,
        device=torch.device("cpu"), loss_fn=loss_fn, module_fqns_per_model_part=split,
        patch_inner_model=False, patch_causal_lm_model=False,
        parallelize_fn=lambda part, *a, **k: calls.append(sorted(n for n, _ in part.named_parameters())[:1]),
    )
    losses = [] if has_last else None
    schedule.step(*((ids,) if has_first else ()), target=targets if has_last else None, losses=losses)
    diff = max(float((p.grad - ref_grads[n]).abs().max()) for part in parts for n, p in part.named_parameters())
    pipe_loss = float(sum(l.detach() for l in losses)) if losses else None
    return {"max_grad_diff": diff, "pipeline_loss": pipe_loss, "reference_loss": float(ref_loss),
            "parallelize_calls": len(calls)}


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    result = run()
    print(f"rank {dist.get_rank()}: {result}")
    dist.destroy_process_group()
