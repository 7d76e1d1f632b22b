"""Mixture-of-experts routers: where a Hugging Face family's router is, its load-balancing
loss inside each pipeline stage, and the tokens each expert received.

**Where the router is.** transformers records a family's router logits with an
``OutputRecorder`` in ``_can_record_outputs["router_logits"]`` (the router's module class and
which output holds the logits), and ships the family's ``load_balancing_loss_func`` in its
modeling module. nemo_pp reads both, so every family transformers ships that way is found
the same way, with no table of our own.

**The loss, per layer.** Hugging Face's causal-LM forward pools the router logits of *all*
layers before it forms the Switch Transformer product ``E * sum_i f_i * P_i``
(``load_balancing_loss_func`` over the tuple of every layer's logits). That pooled product
couples layers held by different stages, so no stage could compute its share, and it cannot
see layers that collapse onto *different* experts (their pooled load looks balanced).
nemo_pp uses the loss as the Switch Transformer defines it, one per router layer (Fedus et
al., 2021, eq. 4-6; Megatron-LM's ``switch_load_balancing_loss_func`` is the same), computed
by the family's own ``load_balancing_loss_func`` on that one layer's logits, and averages it
over the model's MoE layers. The scale is Hugging Face's (``top_k`` at perfect balance), so a
family's ``router_aux_loss_coef`` means what it meant; with one MoE layer both are equal.

**The reference a run reproduces.** The loss is nonlinear in its batch, so it needs a unit.
Megatron-LM takes the microbatch, which makes the objective depend on the microbatch size:
the same run at pp 1 and pp 2 (or resumed at another layout) would optimise different
losses. nemo_pp takes the sequence (one batch row; DeepSeek-V3's sequence-wise balance loss
has the same unit): each row's loss is what Hugging Face's forward of that one row computes
(no attention mask: every position counts, padding too), averaged over every row of the
optimizer step (all microbatches, gradient-accumulation batches and data-parallel ranks),
so the objective is the same at every layout. The step's objective is
``token-mean LM loss + router_aux_loss_coef * mean aux loss``.

**Inside the stage.** Each stage adds its own layers' loss to its own backward with the
technique of Megatron-LM's ``MoEAuxLossAutoScaler``: an identity on the decoder layer's
output whose backward also seeds the auxiliary loss's gradient, so nothing extra crosses a
stage boundary and every schedule's backward (1F1B, interleaved, zero-bubble) carries it.
The router's forward hook only keeps the logits; the loss is formed in the decoder layer's
forward hook, outside ``torch.utils.checkpoint``, so activation checkpointing recomputes the
layer exactly as it ran.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nemo_pp.models.module_tree import find_layer_stack, iter_decoder_layers, text_config

__all__ = ["EP_PROVEN_MODEL_TYPES", "EXPERT_WEIGHTS", "GATE_BIAS", "RouterLoss", "RouterSpec", "check_expert_parallel",
           "check_gate_bias_update", "check_router_aux_loss", "expert_modules", "moe_layer_indices", "router_spec"]


@dataclass(frozen=True)
class RouterSpec:
    """A family's router, as transformers records it.

    Attributes:
        model_type: the config's ``model_type``.
        router_class: the router's module class (``MixtralTopKRouter``).
        logits_index: which element of the router's output is ``router_logits: [tokens, E]``.
        num_experts / top_k: ``E`` and the experts each token is routed to.
        aux_loss_coef: the family's ``router_aux_loss_coef`` (DBRX: ``ffn_config.moe_loss_weight``).
        load_balancing_loss: the family's ``load_balancing_loss_func`` (None: it has none,
            e.g. DeepSeek-V3, which balances with a routing bias instead).
        output_router_logits: the config asks for the load-balancing loss.
        gate_bias_update_factor: the step of the auxiliary-loss-free balancing (NeMo
            AutoModel's name; 0: the routing bias stays as loaded, as Hugging Face leaves it).
    """

    model_type: str
    router_class: type
    logits_index: int
    num_experts: int
    top_k: int
    aux_loss_coef: float
    load_balancing_loss: Callable | None
    output_router_logits: bool
    gate_bias_update_factor: float = 0.0


def router_spec(model: nn.Module) -> RouterSpec | None:
    """The model's :class:`RouterSpec`, or None for a dense model (no recorded router logits,
    or no readable expert count and top-k).

    Args:
        model: a Hugging Face causal LM, or a pipeline stage copied from one.
    """
    recorders = getattr(type(model), "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    router_class = getattr(recorder, "target_class", None)
    if router_class is None:
        return None
    config = text_config(model.config)
    module = importlib.import_module(type(model).__module__)
    # the causal-LM wrapper keeps the numbers its own aux-loss call uses (DBRX's live in ffn_config)
    num_experts = getattr(model, "num_experts", None) or _config_int(config, "num_local_experts", "num_experts",
                                                                     "n_routed_experts")
    top_k = getattr(model, "num_experts_per_tok", None) or _config_int(config, "num_experts_per_tok", "moe_top_k")
    if num_experts is None or top_k is None:
        return None  # a router whose expert count nemo_pp cannot read: treated as dense (no loss, no counts)
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(config, "router_aux_loss_coef", 0.0)
    return RouterSpec(
        model_type=getattr(config, "model_type", type(model).__name__),
        router_class=router_class,
        logits_index=int(getattr(recorder, "index", 0) or 0),
        num_experts=int(num_experts),
        top_k=int(top_k),
        aux_loss_coef=float(coef),
        load_balancing_loss=getattr(module, "load_balancing_loss_func", None),
        output_router_logits=bool(getattr(config, "output_router_logits", False)),
        gate_bias_update_factor=float(getattr(config, "gate_bias_update_factor", 0.0) or 0.0),
    )


#: the routing-bias buffer of auxiliary-loss-free balancing (DeepSeek-V3, GLM-4-MoE routers):
#: added to the scores for the top-k choice only, never to the weights
GATE_BIAS = "e_score_correction_bias"


def check_gate_bias_update(model: nn.Module) -> None:
    """Refuse ``gate_bias_update_factor`` where no router has a routing bias to update.

    Raises:
        ValueError: a negative factor, or a positive one on a model whose routers hold no
            ``e_score_correction_bias`` (names ``model.gate_bias_update_factor``).
    """
    spec = router_spec(model)
    factor = float(getattr(text_config(model.config), "gate_bias_update_factor", 0.0) or 0.0)
    if factor < 0:
        raise ValueError(f"model.gate_bias_update_factor={factor} must be >= 0 (0: the routing bias stays fixed)")
    if factor == 0:
        return
    kind = getattr(text_config(model.config), "model_type", type(model).__name__)
    biased = spec is not None and any(GATE_BIAS in dict(m.named_buffers(recurse=False))
                                      for m in model.modules() if isinstance(m, spec.router_class))
    if not biased:
        raise ValueError(
            f"model.gate_bias_update_factor={factor}: model type '{kind}' has no router with a routing bias "
            f"({GATE_BIAS}) to balance (auxiliary-loss-free balancing is DeepSeek-V3's); use "
            "model.output_router_logits for a load-balancing loss, or remove the key")


def check_router_aux_loss(model: nn.Module) -> RouterSpec:
    """Refuse ``output_router_logits: true`` where the stages cannot add the loss.

    Returns:
        the model's :class:`RouterSpec`.

    Raises:
        ValueError: the family records no router logits (a dense model, or a custom MoE),
            or ships no ``load_balancing_loss_func`` (DeepSeek-V3, GLM-4-MoE balance their
            experts with a routing bias instead); names ``model.output_router_logits``.
    """
    spec = router_spec(model)
    kind = getattr(text_config(model.config), "model_type", type(model).__name__)
    if spec is None:
        raise ValueError(
            f"model.output_router_logits: true, but model type '{kind}' records no router logits (transformers' "
            "_can_record_outputs has no 'router_logits'), so no stage can form the load-balancing loss; "
            "set model.output_router_logits: false")
    if spec.load_balancing_loss is None:
        raise ValueError(
            f"model.output_router_logits: true, but model type '{kind}' ships no load_balancing_loss_func (its "
            "Hugging Face forward adds no auxiliary loss either); set model.output_router_logits: false")
    if spec.top_k > spec.num_experts or spec.num_experts < 1:
        raise ValueError(f"model type '{kind}': num_experts_per_tok={spec.top_k} exceeds the {spec.num_experts} experts")
    return spec


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def moe_layer_indices(model: nn.Module, spec: RouterSpec) -> list[int]:
    """Original indices of the decoder layers that hold a router (a dense-then-sparse stack
    such as DeepSeek-V3's, or Qwen2-MoE's ``mlp_only_layers``, has fewer than all)."""
    _, stack = find_layer_stack(model)
    return [i for i, layer in iter_decoder_layers(stack) if _routers(layer, spec)]


def _routers(layer: nn.Module, spec: RouterSpec) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(m, spec.router_class)]


#: the fused expert weights of transformers 5's experts modules (Mixtral, Qwen-MoE, OLMoE, ...)
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")

#: families whose experts nemo_pp's expert-parallel forward reproduces exactly
#: (tests/distributed/test_moe_router_loss.py, EP_FAMILIES)
EP_PROVEN_MODEL_TYPES = frozenset({"mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"})


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The fused experts modules of ``model``: ``gate_up_proj: [E, 2I, H]``,
    ``down_proj: [E, H, I]`` (3-D parameters, no bias), an ``act_fn`` and ``num_experts``."""
    found = []
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if set(params) == set(EXPERT_WEIGHTS) and hasattr(module, "act_fn") and hasattr(module, "num_experts") \
                and all(p.dim() == 3 for p in params.values()):
            found.append(module)
    return found


def check_expert_parallel(model: nn.Module, ep: int) -> None:
    """Refuse an ``ep_size`` the model's experts cannot be sharded by (meta model is fine).

    Raises:
        ValueError: ``ep`` > 1 on a model without fused experts modules (a dense model, or a
            family whose experts have another layout, e.g. biases), or ``ep`` not dividing
            the expert count, or a family outside :data:`EP_PROVEN_MODEL_TYPES`; names
            ``distributed.ep_size``.
    """
    if ep == 1:
        return
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind not in EP_PROVEN_MODEL_TYPES:
        # the sharded forward re-implements the experts' math (act(gate) * up, then down): exact
        # only where the parity tests proved it (GPT-OSS, e.g., clamps its gated activation)
        raise ValueError(
            f"distributed.ep_size={ep}: expert parallelism is proven for model types "
            f"{', '.join(sorted(EP_PROVEN_MODEL_TYPES))}, not '{kind}'; set distributed.ep_size: 1")
    modules = expert_modules(model)
    if not modules:
        raise ValueError(
            f"distributed.ep_size={ep}: model type '{kind}' has no experts nemo_pp can shard (fused "
            "gate_up_proj [E, 2I, H] and down_proj [E, H, I] without biases: Mixtral, Qwen-MoE, OLMoE); "
            "set distributed.ep_size: 1")
    experts = modules[0].num_experts
    if experts % ep:
        divisors = [d for d in range(2, experts + 1) if experts % d == 0][:6]
        raise ValueError(f"distributed.ep_size={ep} does not divide the model's {experts} experts per layer; use one "
                         f"of {divisors} or 1")


class _AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``hidden``; its backward also returns ``aux``'s gradient, ``RouterLoss.grad_scale``
    (Megatron-LM's ``MoEAuxLossAutoScaler``), so the loss needs no path to the stage's output."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, owner: "RouterLoss") -> torch.Tensor:
        ctx.owner = owner
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        # a new tensor, not ``hidden`` itself (which autograd would make a view of the input):
        # zero-bubble schedules detach stage outputs in place, which a view refuses
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_hidden, torch.full(shape, ctx.owner.grad_scale, dtype=dtype, device=device), None


class RouterLoss:
    """The load-balancing loss and the expert load of one rank's stages.

    Args:
        spec: the family's router (:func:`router_spec`).
        moe_layers: original indices of every MoE layer of the whole model
            (:func:`moe_layer_indices` on the unsplit, possibly meta, model).
        aux_loss: add the loss to the backward (the config's ``output_router_logits``);
            False only counts the tokens per expert.

    Attributes:
        grad_scale: the gradient each layer's loss seeds in backward; the engine sets it per
            step (:meth:`begin_step`).
        aux_sum: ``[]`` float32, the sum of this rank's per-layer, per-sequence losses
            since :meth:`begin_step` (detached).
        tokens_per_expert: ``[len(moe_layers), E]`` float64, top-k assignments counted on this
            rank since :meth:`begin_step`, a row per MoE layer (zeros for layers elsewhere):
            the router's own choice where it returns it (DeepSeek-V3's group-limited,
            bias-shifted top-k), else the top-k of its logits.
    """

    def __init__(self, spec: RouterSpec, moe_layers: list[int], aux_loss: bool):
        if aux_loss and spec.load_balancing_loss is None:
            raise ValueError(f"model type '{spec.model_type}' ships no load_balancing_loss_func")
        self.spec = spec
        self.moe_layers = list(moe_layers)
        self.aux_loss = aux_loss
        self._slot = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.grad_scale = 0.0
        self.aux_sum = torch.zeros(())
        self.tokens_per_expert = torch.zeros(len(self.moe_layers), spec.num_experts, dtype=torch.float64)
        self._logits: dict[int, tuple | None] = {}
        self._routers: dict[int, list[nn.Module]] = {}

    # ------------------------------------------------------------------ hooks
    def attach(self, part: nn.Module, device: torch.device) -> int:
        """Hook the MoE layers of one stage; returns how many it holds.

        The decoder layer's forward pre-hook arms the capture (training forwards only:
        validation runs under ``no_grad``), the router's forward hook keeps its logits and
        the layer's forward hook forms the loss and attaches it to the layer's output.
        Activation checkpointing recomputes ``layer.forward`` only, never these hooks.
        """
        self.aux_sum = self.aux_sum.to(device)
        self.tokens_per_expert = self.tokens_per_expert.to(device)
        try:
            _, stack = find_layer_stack(part)
        except ValueError:
            return 0
        held = 0
        for index, layer in iter_decoder_layers(stack):
            routers = _routers(layer, self.spec)
            if not routers:
                continue
            if index not in self._slot:
                raise ValueError(f"decoder layer {index} holds a router but the model's MoE layers are {self.moe_layers}")
            self._routers[index] = routers
            for router in routers:
                router.register_forward_hook(self._router_hook(index))
            layer.register_forward_pre_hook(self._arm(index))
            layer.register_forward_hook(self._layer_hook(index))
            held += 1
        return held

    def _arm(self, index: int):
        def hook(module, args):
            if torch.is_grad_enabled() and module.training:
                self._logits[index] = None
        return hook

    def _router_hook(self, index: int):
        def hook(module, args, output):
            if index in self._logits:
                logits = output[self.spec.logits_index] if isinstance(output, (tuple, list)) else output
                # a router that returns its top-k indices chose by more than the logits (a bias, groups)
                chosen = next((o for o in output if isinstance(o, torch.Tensor) and not o.is_floating_point()),
                              None) if isinstance(output, (tuple, list)) else None
                self._logits[index] = (logits, chosen)
        return hook

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            captured = self._logits.pop(index, None)
            if captured is None:
                return output
            logits, chosen = captured
            hidden = output[0] if isinstance(output, tuple) else output
            flat = logits.reshape(-1, self.spec.num_experts)
            with torch.no_grad():
                chosen = (torch.topk(flat, self.spec.top_k, dim=-1).indices if chosen is None else chosen).reshape(-1)
                self.tokens_per_expert[self._slot[index]] += torch.bincount(
                    chosen, minlength=self.spec.num_experts).to(self.tokens_per_expert.dtype)
            if not self.aux_loss:
                return output
            # one loss per sequence (row): the layer's output is [rows, S, H]; a row's logits are its S tokens
            rows = flat.reshape(hidden.shape[0] if hidden.dim() == 3 else 1, -1, self.spec.num_experts)
            lb, e, k = self.spec.load_balancing_loss, self.spec.num_experts, self.spec.top_k
            aux = torch.stack([lb((row,), e, k).float() for row in rows]).sum()
            self.aux_sum += aux.detach()
            if isinstance(output, tuple):
                return (_AuxLossAutoScaler.apply(output[0], aux, self), *output[1:])
            return _AuxLossAutoScaler.apply(output, aux, self)
        return hook

    # ------------------------------------------------------------------- steps
    def begin_step(self, label_tokens: float, sequences: int) -> None:
        """Set the backward seed for one optimizer step and clear its sums.

        The engine divides every gradient by the step's ``label_tokens`` after backward
        (the LM loss is summed), so each layer's loss of each sequence seeds
        ``coef * label_tokens / (num MoE layers * sequences)``: after the division the
        step's gradient is that of ``coef * mean over layers and sequences``.

        Args:
            label_tokens: the step's label tokens over all data-parallel ranks.
            sequences: the step's sequences (batch rows) over all data-parallel ranks.
        """
        self.grad_scale = self.spec.aux_loss_coef * label_tokens / (len(self.moe_layers) * sequences)
        self.aux_sum.zero_()
        self.tokens_per_expert.zero_()
        self._logits.clear()

    @torch.no_grad()
    def update_gate_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing (Wang et al., 2024; DeepSeek-V3, 2024, section 2.1.2):
        after an optimizer step each router's bias moves by ``gate_bias_update_factor`` toward
        balance, ``b_i += u * sign(mean_j c_j - c_i)`` with ``c`` the step's tokens per expert
        of that layer over every rank, so every replica of a layer updates alike. Nothing
        happens at factor 0.

        Args:
            tokens_per_expert: ``[len(moe_layers), E]``, the step's global counts (:meth:`stats`).
        """
        factor = self.spec.gate_bias_update_factor
        if factor == 0:
            return
        for index, routers in self._routers.items():
            load = tokens_per_expert[self._slot[index]]
            for router in routers:
                bias = getattr(router, GATE_BIAS)
                bias.add_(factor * torch.sign(load.mean() - load).to(bias.device, bias.dtype))

    def stats(self, sequences: int, groups) -> tuple[float | None, torch.Tensor]:
        """The step's mean auxiliary loss and tokens per expert over every rank.

        Args:
            sequences: as in :meth:`begin_step`.
            groups: process groups to sum over (data-parallel, then pipeline), None skipped.

        Returns:
            ``(aux_loss, tokens_per_expert)``: the unscaled mean per-layer load-balancing loss
            (None without ``aux_loss``) and ``[num MoE layers, E]`` float64 counts.
        """
        packed = torch.cat([self.aux_sum.reshape(1).double(), self.tokens_per_expert.flatten()])
        for group in groups:
            if group is not None and torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(packed, group=group)
        aux = float(packed[0]) / (len(self.moe_layers) * sequences) if self.aux_loss else None
        return aux, packed[1:].reshape(self.tokens_per_expert.shape).cpu()
