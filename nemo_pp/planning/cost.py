"""Compute cost of the pieces of a decoder and the layer split that balances the stages.

The cost of one microbatch's forward + backward through each piece, in FLOPs, from the
model config. A matrix product of ``[m, k] x [k, n]`` is ``2mkn`` FLOPs; backward costs
twice the forward (grads for the input and for the weight), so a piece costs 3x its
forward (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", 2021, section 5.1, there for GPT: ``24bsh^2 + 4bs^2h`` per
layer forward). Written out for grouped-query attention and gated (SwiGLU) MLPs:

* decoder layer, forward: projections ``2bs(2h^2 + 2h*h_kv)`` (q and o: ``h x h``; k and
  v: ``h x h_kv``, ``h_kv = kv_heads * head_dim``), attention ``4bs*s_att*h`` where
  ``s_att`` is the mean number of keys a causal query sees (``(s+1)/2``, or the sliding
  window), MLP ``2bs*h*I`` per projection, three of them (gate, up, down: the gated
  MLPs of Llama, Mistral, Qwen, Gemma, Phi-3, OLMo);
* a mixture-of-experts layer's MLP: the router ``2bs*h*E`` plus, per token, only the
  ``top_k`` experts it is routed to (``top_k * 3 * 2bs*h*I_moe``, ``I_moe`` the
  ``moe_intermediate_size``) and any shared experts (Qwen2-MoE's
  ``shared_expert_intermediate_size``, DeepSeek's ``n_shared_experts * I_moe``): active
  FLOPs, as the Switch Transformer counts them (Fedus et al., 2021). Which layers are
  sparse comes from the model (a dense-then-sparse stack such as DeepSeek-V3's);
* head (final norm + ``lm_head`` + loss): ``2bs*h*V`` forward for ``lm_head``;
* under expert parallelism, the bytes each MoE layer's all-to-alls send
  (:func:`expert_all_to_all_bytes`), beside the FLOPs: a planning input, not a FLOP;
* embedding: a lookup, no FLOPs (its backward is a memory-bound scatter-add: timed on
  this CPU it costs about half a SmolLM2 layer; see docs/architecture.md); a
  vision-language model's vision encoder and projector run there too (:func:`vision_flops`).

The vocabulary term is why the uniform split is unbalanced: SmolLM2's head (vocab 49152,
hidden 576) costs about 7.7 decoder layers, so 15/15 layers leaves the last stage the
slowest, and 19/11 balances it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nemo_pp.models.module_tree import text_config

#: tokens per sample the split is weighed at when no sequence length is configured (it
#: only moves the attention share of a layer's cost)
DEFAULT_PLANNING_SEQ_LEN = 1024


@dataclass(frozen=True)
class PieceCosts:
    """Forward + backward cost of one microbatch through each piece, in FLOPs
    (:func:`flop_costs`) or seconds (:func:`profile_costs`).

    Attributes:
        embedding: the input embedding (first stage).
        layers: one entry per decoder layer, in order.
        head: final norm + output projection + loss (last stage).
    """

    embedding: float
    layers: tuple[float, ...]
    head: float

    def stage_costs(self, counts) -> list[float]:
        """Cost of each stage when stage k holds ``counts[k]`` consecutive layers."""
        out, start = [], 0
        for k, n in enumerate(counts):
            cost = sum(self.layers[start:start + n])
            start += n
            if k == 0:
                cost += self.embedding
            if k == len(counts) - 1:
                cost += self.head
            out.append(cost)
        return out


def flop_costs(config, microbatch_size: int, seq_len: int, moe_layers=()) -> PieceCosts:
    """:class:`PieceCosts` of a Hugging Face decoder config (its ``get_text_config()``).

    Args:
        config: hidden_size, num_attention_heads, num_key_value_heads, head_dim,
            intermediate_size, vocab_size, num_hidden_layers, optional layer_types /
            sliding_window; for ``moe_layers``, the expert count, ``num_experts_per_tok`` and
            optional ``moe_intermediate_size`` / shared-expert sizes.
        microbatch_size: samples per microbatch (b).
        seq_len: tokens per sample (s).
        moe_layers: indices of the layers whose MLP is a routed mixture of experts
            (:func:`nemo_pp.models.moe.moe_layer_indices`); the others are dense.
    """
    cfg = text_config(config)
    b, s, h = microbatch_size, seq_len, cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    inter = cfg.intermediate_size
    gated = 3  # gate, up, down projections
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers

    sparse = set(moe_layers)
    moe_mlp = _moe_mlp_flops_per_token(cfg, gated) if sparse else 0.0

    def layer(index: int, kind: str) -> float:
        keys = min((s + 1) / 2, window) if kind == "sliding_attention" and window else (s + 1) / 2
        proj = 2 * b * s * (2 * h * q + 2 * h * kv)
        attention = 4 * b * s * keys * q
        mlp = b * s * moe_mlp if index in sparse else gated * 2 * b * s * h * inter
        return 3.0 * (proj + attention + mlp)

    return PieceCosts(
        embedding=vision_flops(config, b),
        layers=tuple(layer(i, t) for i, t in enumerate(types[: cfg.num_hidden_layers])),
        head=3.0 * 2 * b * s * h * cfg.vocab_size,
    )


#: patches per image assumed for a dynamic-resolution vision encoder (Qwen2-VL has no fixed
#: image size): a 448 x 448 image in 14-pixel patches
DYNAMIC_RESOLUTION_PATCHES = 1024


def vision_flops(config, images: int) -> float:
    """Forward + backward FLOPs of a vision-language model's vision encoder and projector for
    ``images`` images (the first stage's piece besides the embedding; 0 for a text model).

    A ViT layer over ``p`` patches of width ``h`` with an MLP of width ``I``: projections
    ``2p * 4h^2``, attention ``4p^2 h`` (bidirectional), MLP ``2p * 2hI`` (two projections;
    ``mlp_ratio * h`` where the config gives a ratio); times 3 for the backward, as for the
    decoder. ``p = (image_size / patch_size)^2`` (+1 class token for CLIP), or
    :data:`DYNAMIC_RESOLUTION_PATCHES` where the config has no image size. The projector: two
    products from the encoder width to the decoder's hidden size per image token. One image
    per sample is assumed (the split is weighed before any data is read).
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0.0
    h = getattr(vision, "embed_dim", None) or vision.hidden_size
    layers = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", 0)
    inter = getattr(vision, "intermediate_size", None) or int(getattr(vision, "mlp_ratio", 4) * h)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    p = (size // patch) ** 2 + (vision.model_type == "clip_vision_model") if size and patch else DYNAMIC_RESOLUTION_PATCHES
    per_layer = 2 * p * 4 * h * h + 4 * p * p * h + 2 * p * 2 * h * inter
    projector = 2 * p * (h * text_config(config).hidden_size + text_config(config).hidden_size ** 2)
    return 3.0 * images * (layers * per_layer + projector)


def with_fused_head(costs: PieceCosts, label_share: float) -> PieceCosts:
    """``costs`` with the head of ``nemo_pp.loss.FusedLinearCrossEntropy``: the output
    projection runs on label tokens only (a share ``label_share`` of the positions) and
    recomputes their logits in backward, four ``2 * h * V`` products per label token instead
    of three per position."""
    return dataclasses.replace(costs, head=costs.head * 4.0 / 3.0 * label_share)


def expert_all_to_all_bytes(config, microbatch_size: int, seq_len: int, ep: int, dtype_bytes: int = 2,
                            activation_checkpointing: bool = False, remote_share: float | None = None) -> float:
    """Bytes one rank sends to the other ep ranks per MoE layer for one microbatch's forward
    + backward under expert parallelism (nemo_pp.distributed.expert_parallel), at balanced
    routing: of the ``N * top_k`` assignments (``N = b * s`` tokens) a share ``(ep - 1) / ep``
    lives on another rank. Forward: the token states ``[N k, H]`` out and the expert outputs
    back (dispatch + combine) and each assignment's local expert index (int64); backward:
    the two gradients of the states. Recomputation (``activation_checkpointing``) runs the
    forward's three again. Receives are as large as sends. The count all-to-all (``ep``
    int64) is left out.

    Args:
        config: ``hidden_size``, ``num_experts_per_tok`` (the top k).
        microbatch_size, seq_len: b and s, tokens per microbatch ``b * s``.
        ep: expert-parallel ranks (1: nothing is sent).
        dtype_bytes: bytes per element of the hidden states (2 for bf16).
        activation_checkpointing: the layer's forward runs again in backward.
        remote_share: the share of assignments routed to another rank's experts; default
            ``(ep - 1) / ep`` (balanced routing).

    Returns:
        bytes sent per MoE layer and microbatch, by one rank.
    """
    if ep == 1:
        return 0.0
    cfg = text_config(config)
    share = (ep - 1) / ep if remote_share is None else remote_share
    remote = microbatch_size * seq_len * (getattr(cfg, "num_experts_per_tok", None) or 1) * share
    forward = remote * (2 * cfg.hidden_size * dtype_bytes + 8)
    backward = remote * 2 * cfg.hidden_size * dtype_bytes
    return forward * (2 if activation_checkpointing else 1) + backward


def _moe_mlp_flops_per_token(cfg, gated: int) -> float:
    """Forward FLOPs per token of a routed MoE MLP: router, the top-k experts, shared experts."""
    h = cfg.hidden_size
    experts = next((getattr(cfg, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(cfg, k, None)), 0)
    top_k = getattr(cfg, "num_experts_per_tok", None) or 1
    expert_inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = getattr(cfg, "shared_expert_intermediate_size", None) or (
        (getattr(cfg, "n_shared_experts", None) or 0) * expert_inter)
    return 2 * h * experts + gated * 2 * h * (top_k * expert_inter + shared)


def balanced_layer_counts(
    costs: PieceCosts, num_stages: int, sizes: PieceCosts | None = None, max_stage_size: float | None = None
) -> list[int]:
    """Layers per stage (consecutive, at least one each) that minimise the slowest stage.

    With ``sizes`` (e.g. parameters per piece) and ``max_stage_size``, only splits whose
    every stage stays within the cap are considered.

    Exact, by dynamic programming over (stages, layers), ``O(num_stages * L^2)``: first the
    smallest possible slowest-stage cost ``M``; then, among the splits whose every stage
    costs at most ``M``, the one with the least sum of squared stage costs, i.e. the most
    even. (Many splits share the same slowest stage; a lopsided one would load the first
    ranks, which 1F1B already makes hold the most microbatches.)

    Raises:
        ValueError: fewer layers than stages, or no split within the cap (the message
            gives the smallest cap that would do).
    """
    n = len(costs.layers)
    if num_stages < 1 or n < num_stages:
        raise ValueError(f"cannot split {n} layers into {num_stages} stages (each needs one)")
    prefix = [0.0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def total(pieces: PieceCosts, sums: list[float], i: int, j: int, stage: int) -> float:
        return (sums[j] - sums[i] + (pieces.embedding if stage == 0 else 0.0)
                + (pieces.head if stage == num_stages - 1 else 0.0))

    def cost(i: int, j: int, stage: int) -> float:  # stage holds layers i..j-1
        return total(costs, prefix, i, j, stage)

    fits = lambda i, j, stage: True  # noqa: E731
    if sizes is not None and max_stage_size is not None:
        size_prefix = [0.0]
        for c in sizes.layers:
            size_prefix.append(size_prefix[-1] + c)

        def fits(i: int, j: int, stage: int) -> bool:
            return total(sizes, size_prefix, i, j, stage) <= max_stage_size

    def solve(combine, start: float, cap: float = float("inf")):
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
        cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
        best[0][0] = start
        for k in range(1, num_stages + 1):
            for j in range(k, n - (num_stages - k) + 1):
                for i in range(k - 1, j):
                    c = cost(i, j, k - 1)
                    if c <= cap and best[k - 1][i] < inf and fits(i, j, k - 1):
                        value = combine(best[k - 1][i], c)
                        if value < best[k][j]:
                            best[k][j], cut[k][j] = value, i
        counts, j = [], n
        for k in range(num_stages, 0, -1):
            counts.append(j - cut[k][j])
            j = cut[k][j]
        return best[num_stages][n], counts[::-1]

    slowest, _ = solve(max, 0.0)
    if slowest == float("inf"):
        smallest = balanced_layer_counts(sizes, num_stages)  # the split with the smallest largest stage
        need = max(sizes.stage_costs(smallest))
        raise ValueError(f"no split of {n} layers into {num_stages} stages keeps every stage within "
                         f"{max_stage_size:,.0f}; the smallest cap that works is {need:,.0f}")
    _, counts = solve(lambda acc, c: acc + c * c, 0.0, cap=slowest * (1 + 1e-9))
    return counts


def one_layer_config(config):
    """A copy of a decoder config (its ``get_text_config()``) cut to one decoder layer, the kind
    most of its layers are (a dense-then-sparse stack such as DeepSeek-V3's keeps a sparse one):
    what the probes time, one layer standing for all."""
    import copy

    cfg = copy.deepcopy(text_config(config))
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    if getattr(cfg, "first_k_dense_replace", None):
        cfg.first_k_dense_replace = 0
    return cfg


def profile_costs(config, microbatch_size: int, seq_len: int, repeats: int = 3, device=None) -> PieceCosts:
    """:class:`PieceCosts` in seconds, timed on ``device`` (default CPU, with the current
    thread count): forward + backward of one microbatch through the embedding, one decoder
    layer (every layer is taken to cost the same) and the head with the loss, random weights.

    The FLOP model's blind spots show here: on CPU the embedding's scatter-add backward
    and the loss's softmax over the vocabulary are memory-bound.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from nemo_pp.loss.masked_ce import MaskedCrossEntropy

    layers = text_config(config).num_hidden_layers
    cfg = one_layer_config(config)
    device = torch.device(device or "cpu")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)
    inner, b, s = model.model, microbatch_size, seq_len
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=device)
    position_ids = torch.arange(s, device=device).unsqueeze(0)
    loss_fn = MaskedCrossEntropy()

    def embedding():
        out = inner.embed_tokens(ids)
        out.backward(torch.ones_like(out))

    def layer():
        hidden = torch.randn(b, s, cfg.hidden_size, device=device, requires_grad=True)
        rope = inner.rotary_emb(hidden, position_ids)
        out = inner.layers[0](hidden, attention_mask=None, position_embeddings=rope, position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    def head():
        hidden = torch.randn(b, s, cfg.hidden_size, device=device, requires_grad=True)
        loss_fn(model.lm_head(inner.norm(hidden)), ids).backward()

    def seconds(fn) -> float:
        fn()  # warm-up: allocations, kernel selection
        times = []
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        return sorted(times)[len(times) // 2]

    return PieceCosts(embedding=seconds(embedding), layers=(seconds(layer),) * layers, head=seconds(head))


def layers_per_stage(plan) -> list[int]:
    """Decoder layers each stage of ``plan`` holds (its module FQNs say)."""
    return [sum(".layers." in f".{name}" and name.rsplit(".", 1)[-1].isdigit() for name in names)
            for names in plan.module_fqns]


def stage_costs_of_plan(plan, costs: PieceCosts) -> list[float]:
    """Cost of every stage of ``plan``."""
    return costs.stage_costs(layers_per_stage(plan))


