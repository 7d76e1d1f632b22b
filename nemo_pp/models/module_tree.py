"""Facts about a model's module tree that every layer above needs: where the decoder
layer stack is, which modules sit before and after it, whether the input and output
embeddings are tied, and a pruned copy that keeps only some modules.

Nothing here knows about pipelines, meshes or configs: planning reads these facts to
split a model, the parallelizers to find the layers they wrap, the builder to copy a
stage out of the model (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn


def text_config(config):
    """The language model's config: ``config.get_text_config()`` for a multimodal config
    (its ``text_config``), the config itself for a text-only one."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(fqn, module)`` of the decoder layer stack: the shallowest ``nn.ModuleList``
    called ``layers`` (``model.layers`` in Hugging Face causal LMs, ``layers`` in a
    custom model).

    Raises:
        ValueError: the model has none; the message names the key to set instead.
    """
    found = [(name, m) for name, m in model.named_modules() if name.rpartition(".")[2] == "layers"
             and isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    if not found:
        raise ValueError(
            f"cannot find the decoder layer stack of {type(model).__name__} (an nn.ModuleList named 'layers'); "
            "set distributed.pipeline.module_fqns_per_model_part to give the split by hand"
        )
    depth = min(name.count(".") for name, _ in found)
    shallowest = [item for item in found if item[0].count(".") == depth]
    if len(shallowest) > 1:
        raise ValueError(
            f"{type(model).__name__} has several layer stacks at the same depth ({[n for n, _ in shallowest]}); "
            "set distributed.pipeline.module_fqns_per_model_part to give the split by hand"
        )
    return shallowest[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a model or stage, in order (the layer stack of
    :func:`find_layer_stack`).

    Raises:
        ValueError: no layer stack.
    """
    return [layer for _, layer in _modules_of(find_layer_stack(model)[1])]


def _modules_of(stack: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(k, m) for k, m in stack._modules.items() if m is not None]


#: what decoders call the norm after their last layer (Phi: ``final_layernorm``)
FINAL_NORM_NAMES = ("norm", "final_layernorm")


def outer_modules(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """``(first, last, everywhere)``: the FQNs of the modules outside the layer stack that
    go to the first stage, to the last stage and to every stage
    (see :func:`auto_stage_module_names`). Parameterless modules (rotary embeddings) go to
    every stage, except a final norm after the stack, which runs on the last stage only
    even without weights (OLMo's ``OlmoLayerNorm``): elsewhere it would normalise what a
    stage sends on."""
    stack_fqn, _ = find_layer_stack(model)
    parts = stack_fqn.split(".")
    first, last, everywhere = [], [], []
    node, prefix = model, ""
    for step in parts:
        before = True
        tail_here = []
        for name, child in node.named_children():
            if name == step:
                before = False
                continue
            fqn = prefix + name
            weightless = next(child.parameters(), None) is None
            final_norm = not before and name in FINAL_NORM_NAMES
            if weightless and not final_norm:
                everywhere.append(fqn)
            elif before:
                first.append(fqn)
            else:
                tail_here.append(fqn)
        last[:0] = tail_here  # deeper levels (the final norm) before outer ones (lm_head)
        node, prefix = getattr(node, step), prefix + step + "."
    return first, last, everywhere


def stage_parameters(model: nn.Module, module_fqns: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of a stage's modules, each once (a tie inside the stage is one tensor)."""
    unique = {id(p): p for name in module_fqns for p in model.get_submodule(name).parameters()}
    return list(unique.values())


def copy_pruned(model: nn.Module, keep: Sequence[str]) -> nn.Module:
    """Deep-copy only the modules named in ``keep`` (and their ancestors).

    Unkept modules become ``None``; a ``ModuleList`` with some (not all) kept children
    becomes an ``nn.ModuleDict`` keyed by the original indices. Unkept modules are never copied
    (``deepcopy``'s memo maps them to ``None``), so a stage costs only its own memory.
    """
    keep = set(keep)
    ancestors = {".".join(k.split(".")[:i]) for k in keep for i in range(1, len(k.split(".")))}
    memo: dict[int, object] = {}
    lists_to_convert: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            fqn = f"{prefix}{name}"
            if fqn in keep:
                continue
            if fqn in ancestors:
                if isinstance(child, nn.ModuleList) and any(f"{fqn}.{k}" not in keep for k in child._modules):
                    lists_to_convert.append(fqn)
                visit(child, fqn + ".")
            else:
                memo[id(child)] = None

    visit(model, "")
    stage_model = copy.deepcopy(model, memo)
    for fqn in lists_to_convert:
        parent_name, _, attr = fqn.rpartition(".")
        parent = stage_model.get_submodule(parent_name) if parent_name else stage_model
        old = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleDict({k: v for k, v in old._modules.items() if v is not None}))
    return stage_model



def iter_decoder_layers(layers) -> list[tuple[int, nn.Module]]:
    """``(original_index, layer)`` pairs of a ModuleList or a split stage's ModuleDict."""
    if layers is None:
        return []
    if isinstance(layers, nn.ModuleDict):
        return [(int(k), v) for k, v in layers.items() if v is not None]
    return [(i, layer) for i, layer in enumerate(layers) if layer is not None]



def is_tied(model: nn.Module) -> bool:
    """True when the model's output projection shares its weight with the input embedding."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    try:  # a pipeline stage may lack the module or the base model holding it
        emb, head = get_in(), get_out()
    except AttributeError:
        return False
    return emb is not None and head is not None and head.weight is emb.weight


def tied_param_fqns(model: nn.Module) -> tuple[str, str]:
    """FQNs of the (input embedding, output projection) weights, e.g.
    ``("model.embed_tokens.weight", "lm_head.weight")``."""
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(model.get_input_embeddings())] + ".weight", names[id(model.get_output_embeddings())] + ".weight"

