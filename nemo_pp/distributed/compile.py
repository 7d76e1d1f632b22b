"""Regional compilation: ``torch.compile`` on each decoder layer's forward of a stage.

As torchtitan does (``apply_compile``: per transformer block, also under pipeline
parallelism), the unit is one decoder layer: every layer of a model runs the same code,
so with torch's default ``inline_inbuilt_nn_modules`` (parameters are graph inputs, not
constants) the layers share one compiled graph per shape class instead of one per layer,
and a pipeline stage's split points never cut a graph. Only the layer's ``forward`` is
compiled, not the module call: FSDP2's, activation checkpointing's and the router loss's
hooks stay eager around it. The chain applies it after tensor/context/expert parallelism
and before activation checkpointing and FSDP2, torchtitan's order.

Sequence lengths: ``dynamic: null`` (torch's default) compiles the first length statically
and, when a second length arrives, once more with the sequence dimension symbolic; no later
length recompiles (``torch._dynamo`` "automatic dynamic shapes"). ``dynamic: true`` starts
symbolic; ``false`` compiles every length anew, up to dynamo's ``cache_size_limit`` (8),
after which that layer runs eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nemo_pp.models.module_tree import decoder_layers

logger = logging.getLogger(__name__)

__all__ = ["RegionalCompile", "compile_decoder_layers"]


def compile_decoder_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                           fullgraph: bool = False, dynamic: bool | None = None) -> int:
    """Replace each decoder layer's ``forward`` of ``model`` (a whole model or one stage) with
    its ``torch.compile``-d version; returns how many layers. Idempotent."""
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer.forward, "_nemo_pp_compiled", False):
            continue
        compiled = torch.compile(layer.forward, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        compiled._nemo_pp_compiled = True
        layer.forward = compiled
    logger.info("compiled %d decoder layers (backend %s, mode %s, dynamic %s)", len(layers), backend, mode, dynamic)
    return len(layers)


class RegionalCompile:
    """The parallelize step of the ``compile:`` section (:func:`compile_decoder_layers`).

    Args:
        backend / mode / fullgraph / dynamic: ``torch.compile``'s.
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                 dynamic: bool | None = None):
        self.kwargs = dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        try:
            compile_decoder_layers(model, **self.kwargs)
        except ValueError:  # a stage without decoder layers (lm_head alone): nothing to compile
            pass
        return model
