"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the
modules of one pipeline stage, through the ``peft`` library.

``PeftConfig`` carries NeMo AutoModel's keys (``target_modules``, ``exclude_modules``,
``match_all_linear``, ``dim``, ``alpha``, ``dropout``) and NeMo's matching rules
(``nemo_automodel.components._peft.module_matcher``): a target pattern matches a module
whose own name equals it, or whose FQN matches it with ``*`` as a wildcard
(``*.layers.0.*.q_proj``); ``exclude_modules`` means every linear module but those;
``match_all_linear`` every ``nn.Linear``, the output projection included; nothing given
means ``target_modules: ['*_proj']``.

A stage keeps the unsplit model's FQNs (docs/architecture.md, "Splitting"), so the
modules a stage adapts are exactly the ones the unsplit model would adapt there. The
matched FQNs go to ``peft.inject_adapter_in_model`` as an explicit list (peft matches a
list entry against the end of each module name, so a full FQN picks that module only),
which replaces each with ``peft.tuners.lora.Linear`` (``<fqn>.base_layer`` holds the
original weight, ``<fqn>.lora_A.default`` / ``lora_B.default`` the adapter) and freezes
every other parameter, the copies of a tied embedding included.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's name of the one adapter a module carries


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def wildcard_match(pattern: str, fqn: str) -> bool:
    """NeMo's rule: ``*`` matches any run of characters, dots included, and the whole
    FQN must match (``*.layers.0.*.q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), fqn) is not None


@dataclass
class PeftConfig:
    """The ``peft:`` section: which linear modules get LoRA adapters, and their shape.

    Args:
        target_modules: module names (``q_proj``) or FQN patterns with ``*``; a module
            matches by its own name or its whole FQN.
        exclude_modules: adapt every linear module except these (same patterns).
        match_all_linear: adapt every ``nn.Linear`` (the output projection included).
        dim: LoRA rank r (columns of A, rows of B).
        alpha: the adapter output is scaled by ``alpha / dim``.
        dropout: dropout probability on the adapter's input.
        dropout_position: ``pre`` (on the adapter input, as peft does); NeMo's ``post``
            is accepted only without dropout.
        lora_A_init: ``kaiming`` (peft's default: Kaiming-uniform A, zero B, so training
            starts at the base model) or ``gaussian`` (normal A with std 1/r).
        use_dora, lora_dtype: accepted with their defaults only.
        use_triton, use_memory_efficient_lora: NeMo's CUDA kernel switches; ignored (peft
            computes the adapter with ordinary matmuls).

    Raises:
        ValueError: conflicting or unsupported keys, named as ``peft.<key>``.
    """

    target_modules: list[str] | str | None = field(default_factory=list)
    exclude_modules: list[str] | str | None = field(default_factory=list)
    match_all_linear: bool = False
    dim: int = 8
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init: str = "kaiming"
    use_dora: bool = False
    lora_dtype: str | None = None
    use_triton: bool = False
    use_memory_efficient_lora: bool = True

    def __post_init__(self):
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise ValueError("peft.target_modules and peft.exclude_modules exclude each other: set one of them")
        if self.match_all_linear and (self.target_modules or self.exclude_modules):
            raise ValueError("peft.match_all_linear: true adapts every linear module: leave peft.target_modules and "
                             "peft.exclude_modules empty, or set match_all_linear: false")
        if not (self.match_all_linear or self.target_modules or self.exclude_modules):
            self.target_modules = ["*_proj"]  # NeMo's default
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"peft.dim must be an integer >= 1 (the LoRA rank), not {self.dim!r}")
        if not self.alpha > 0:
            raise ValueError(f"peft.alpha must be > 0 (adapter scale alpha/dim), not {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), not {self.dropout!r}")
        if self.dropout_position not in ("pre", "post"):
            raise ValueError(f"peft.dropout_position must be 'pre' or 'post', not {self.dropout_position!r}")
        if self.dropout > 0 and self.dropout_position == "post":
            raise ValueError("peft.dropout_position: 'post' is not supported (peft applies dropout to the adapter's "
                             "input); set dropout_position: pre")
        if self.lora_A_init not in ("kaiming", "gaussian"):
            raise ValueError(f"peft.lora_A_init must be 'kaiming' or 'gaussian', not {self.lora_A_init!r}")
        if self.use_dora:
            raise ValueError("peft.use_dora: true is not supported by nemo_pp; set it to false")
        if self.lora_dtype is not None:
            raise ValueError("peft.lora_dtype: adapters take their base weight's dtype; leave it null")

    @property
    def scale(self) -> float:
        """``alpha / dim``: what the adapter output ``B @ A @ x`` is multiplied by."""
        return self.alpha / self.dim

    def matches(self, name: str, fqn: str, module: nn.Module) -> bool:
        """Whether the module at ``fqn`` (own name ``name``) gets an adapter (only ``nn.Linear`` can)."""
        if not isinstance(module, nn.Linear):
            return False
        if self.match_all_linear:
            return True
        if self.target_modules:
            return any(name == p or wildcard_match(p, fqn) for p in self.target_modules)
        return not any(name == p or wildcard_match(p, fqn) for p in self.exclude_modules)

    def lora_config(self, target_fqns: list[str], base_model_name_or_path: str | None = None):
        """The ``peft.LoraConfig`` of these settings for exactly ``target_fqns``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.dim, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=sorted(target_fqns),
            init_lora_weights=True if self.lora_A_init == "kaiming" else "gaussian", bias="none",
            task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        )


def matched_linear_modules(model: nn.Module, cfg: PeftConfig) -> list[str]:
    """FQNs of the ``nn.Linear`` modules of ``model`` (or one stage of it) that ``cfg`` adapts."""
    return [fqn for fqn, m in model.named_modules() if fqn and cfg.matches(fqn.rsplit(".", 1)[-1], fqn, m)]


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped modules of ``model`` by FQN (``peft.tuners.lora.LoraLayer``)."""
    from peft.tuners.lora import LoraLayer

    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_lora(model: nn.Module, cfg: PeftConfig) -> int:
    """Add LoRA adapters to ``model`` (a whole model or one stage) in place and freeze the rest.

    Call it after the stage's weights are loaded and before tensor parallelism, activation
    checkpointing and FSDP2 wrap it (``fully_shard`` then shards the adapters with their
    layer). Idempotent: a module that already carries an adapter is left as it is.

    Returns:
        the number of modules adapted (0 for a stage none of whose modules match, which is
        then entirely frozen).
    """
    from peft import inject_adapter_in_model

    if lora_modules(model):
        return 0
    targets = matched_linear_modules(model, cfg)
    if targets:
        # peft reads a causal LM's tied-weight declarations through get_input_embeddings(),
        # which a stage without the embedding cannot answer: a plain container hides them
        # (nemo_pp keeps tied copies in sync itself, tied.py)
        holder = nn.ModuleDict({"stage": model})
        inject_adapter_in_model(cfg.lora_config([f"stage.{t}" for t in targets]), holder, adapter_name=ADAPTER_NAME)
    else:
        model.requires_grad_(False)
    return len(targets)


class LoraParallelizer:
    """A parallelize_fn step that adds the adapters to each stage (first in the chain)."""

    def __init__(self, cfg: PeftConfig):
        self.cfg = cfg

    def __call__(self, model: nn.Module, world_mesh=None, moe_mesh=None, **_):
        n = apply_lora(model, self.cfg)
        logger.info("LoRA: %d modules of this stage adapted (rank %d, alpha %s)", n, self.cfg.dim, self.cfg.alpha)
        return model


def merge_lora_weights(state: dict[str, torch.Tensor], part: nn.Module) -> dict[str, torch.Tensor]:
    """Fold each adapter of ``part`` into its base weight in ``state`` (full tensors by the
    part's FQNs, as ``nemo_pp.checkpoint.hf_export.stage_state_dict`` collects them): ``<fqn>.base_layer.weight``,
    ``lora_A`` and ``lora_B`` become ``<fqn>.weight = W + scale * B @ A`` (computed in fp32,
    stored in W's dtype), ``<fqn>.base_layer.bias`` becomes ``<fqn>.bias``. Returns ``state``."""
    for fqn, module in lora_modules(part).items():
        base = state.pop(f"{fqn}.base_layer.weight")
        a = state.pop(f"{fqn}.lora_A.{ADAPTER_NAME}.weight").float()
        b = state.pop(f"{fqn}.lora_B.{ADAPTER_NAME}.weight").float()
        state[f"{fqn}.weight"] = (base.float() + module.scaling[ADAPTER_NAME] * (b @ a)).to(base.dtype).contiguous()
        bias = state.pop(f"{fqn}.base_layer.bias", None)
        if bias is not None:
            state[f"{fqn}.bias"] = bias
    return state


