"""What a checkpoint holds besides files: the model, optimizer and RNG state of one rank,
keyed so that any parallel layout can load what another wrote.

Model and optimizer state are keyed by parameter FQN (``model.layers.7.mlp.up_proj.weight``),
which a pipeline stage keeps (docs/architecture.md, "Splitting"), so a tensor saved by
pp rank 1 of a 2-stage pipeline is found by whichever rank holds layer 7 in any other
layout. torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` (flattened, i.e.
``state.<fqn>.exp_avg``) give FSDP2 / TP DTensors that torch.distributed.checkpoint
reshards on load (torch docs, "Distributed Checkpoint - torch.distributed.checkpoint").

A tied embedding is one parameter when the embedding and the head share a stage and two
copies kept equal otherwise (``TiedEmbeddingSync``). Both FQNs are always saved, the
optimizer state of a shared parameter under both names too, so a stage that holds only
the head finds its state whichever layout wrote the checkpoint.

Only tensors go through torch.distributed.checkpoint: optimizer hyperparameters come from
the config and the learning rate from the scheduler's state, so loading never unpickles
anything but tensors.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = [
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "rng_state",
    "set_rng_state",
    "set_scheduler_state",
]

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def model_state(parts: Sequence[nn.Module], trainable_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """One ``{FQN: tensor}`` per model part (DTensors stay sharded); their union is what a rank saves.

    Args:
        trainable_only: only parameters that require grad (a LoRA run's adapters: the
            frozen base weights are the pretrained ones, read again from the model folder).
    """
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    return [get_model_state_dict(part, options=options) for part in parts]


def load_model_state(parts: Sequence[nn.Module], states: Sequence[dict[str, torch.Tensor]],
                     trainable_only: bool = False) -> None:
    """Put ``states`` (as :func:`model_state` made them, filled by a load) into ``parts``;
    every tensor of a part must be there (its trainable ones with ``trainable_only``)."""
    for part, state in zip(parts, states):
        set_model_state_dict(part, state, options=StateDictOptions(strict=not trainable_only))


def optimizer_state(
    parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], tied: tuple[str, str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """The tensor state of each part's optimizer, flattened: ``{"state.<fqn>.<name>": tensor}``.

    Args:
        tied: (embedding FQN, head FQN) of a tied embedding: where one parameter is both,
            its state is also listed under the head's name.

    Raises:
        ValueError: an optimizer keeps a state value that is not a tensor (nemo_pp
            checkpoints tensor state only).
    """
    out = []
    for part, opt in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, opt, options=_FLAT)
        state = {}
        for key, value in flat.items():
            if not key.startswith("state."):
                continue  # param_groups: hyperparameters, from the config and the lr scheduler
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"optimizer state '{key}' of {type(opt).__name__} is a {type(value).__name__}, not a tensor: "
                    "nemo_pp checkpoints tensor optimizer state only; use an optimizer such as torch.optim.AdamW"
                )
            state[key] = value
        if tied is not None:
            emb, head = (f"state.{name}." for name in tied)
            holds_head = tied[1] in dict(part.named_parameters(remove_duplicate=False))
            if holds_head and not any(k.startswith(head) for k in state):
                state.update({head + k[len(emb):]: v for k, v in list(state.items()) if k.startswith(emb)})
        out.append(state)
    return out


def load_optimizer_state(
    parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], states: Sequence[dict[str, torch.Tensor]]
) -> None:
    """Put loaded ``states`` (from :func:`optimizer_state`) into the optimizers; their
    hyperparameters stay as configured."""
    for part, opt, state in zip(parts, optimizers, states):
        flat = get_optimizer_state_dict(part, opt, options=_FLAT)
        flat.update({k: v for k, v in state.items() if k in flat})
        set_optimizer_state_dict(part, opt, flat, options=_FLAT)


def set_scheduler_state(schedulers, optimizers, state: dict) -> None:
    """Load one LR scheduler state into every part's scheduler and set each optimizer's
    learning rate to the scheduler's current value (``LambdaLR`` sets it only when stepped)."""
    for sched, opt in zip(schedulers, optimizers):
        sched.load_state_dict(dict(state))
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = lr


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, and CUDA when present) RNG states of this process, as
    tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
