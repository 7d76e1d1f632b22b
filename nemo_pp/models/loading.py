"""Meta-device model build and per-stage weight loading from Hugging Face safetensors.

A rank never holds the whole model: :func:`empty_model` builds the module tree with
parameters on the meta device (no memory; buffers such as rotary ``inv_freq`` are
computed for real, they are not in checkpoints), the pipeline keeps this rank's
stages, :func:`materialize` gives their parameters storage on the device, and
:meth:`SafetensorsCheckpoint.load_into` reads exactly their tensors, opening only the
shard files that hold them (``safetensors.safe_open`` reads one tensor at a time).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from nemo_pp.models.weight_conversion import checkpoint_sources

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def auto_model_class(config):
    """transformers' auto class for ``config``: ``AutoModelForImageTextToText`` for a
    vision-language config (one with a ``vision_config``), else ``AutoModelForCausalLM``."""
    import transformers

    if getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def empty_model(config, dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """The causal LM (or vision-language model) of ``config`` with meta-device parameters and real buffers.

    Args:
        config: a transformers config (``AutoConfig.from_pretrained(path)``).
        dtype: parameter dtype (None: float32).
        **kwargs: passed to the auto class's ``from_config`` (``attn_implementation``).

    Returns:
        the model; tied weights are tied (``tie_weights``), as a loaded model's are.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype or torch.float32, **kwargs)
    model.tie_weights()  # init_empty_weights re-creates parameters, which unties them
    return model


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter of ``module`` uninitialised storage on ``device`` (a
    parameter shared by two modules, such as a tied embedding, stays shared) and move
    the buffers there. Parameters already on a real device are moved too."""
    fresh: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in fresh:
                data = torch.empty_like(p, device=device) if p.is_meta else p.detach().to(device)
                fresh[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            mod._parameters[name] = fresh[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)


def _persistent_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """FQN -> parameter or persistent buffer (what a checkpoint stores), ties included."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = b
    return out


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint folder by FQN: ``model.safetensors``, or
    shards listed by ``model.safetensors.index.json``. Nothing is read until
    :meth:`load_into`; the constructor reads only the index or the file header.

    Args:
        path: a local folder, or a hub id (then fetched with ``huggingface_hub``).
        tied: ``{fqn: alias}`` for tied weights a checkpoint stores once
            (``{"lm_head.weight": "model.embed_tokens.weight"}``); :meth:`for_model`
            derives it from the model.

    Raises:
        FileNotFoundError: the folder has neither file (names ``model.pretrained_model_name_or_path``).
    """

    def __init__(self, path: str | Path, tied: dict[str, str] | None = None):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
        self.folder = folder
        self.tied = dict(tied or {})
        self.files_read: set[str] = set()
        if (folder / INDEX_FILE).is_file():
            self.weight_map: dict[str, str] = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"model.pretrained_model_name_or_path: {folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        self.sources = checkpoint_sources(None, list(self.weight_map))

    @classmethod
    def for_model(cls, path: str | Path, model: nn.Module) -> "SafetensorsCheckpoint":
        """The checkpoint at ``path`` for ``model``: a parameter the model shares under
        several FQNs (a tied embedding) may be stored under any one of them."""
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        tied = {a: b for group in names.values() if len(group) > 1 for a in group for b in group if a != b}
        checkpoint = cls(path, tied)
        # the family's checkpoint layout (Mixtral's per-expert w1/w2/w3) mapped to the model's FQNs
        checkpoint.sources = checkpoint_sources(model, list(checkpoint.weight_map))
        return checkpoint

    def _source(self, fqn: str) -> str | None:
        """The model FQN whose checkpoint tensors fill ``fqn`` (itself, or a tied alias), or None."""
        if self.sources.has(fqn):
            return fqn
        alias = self.tied.get(fqn)
        return alias if alias is not None and self.sources.has(alias) else None

    def check_covers(self, model: nn.Module) -> list[str]:
        """Check, from names only, that the checkpoint holds every tensor of ``model`` (a
        meta model is fine). Tensors the model does not have are left unread and
        returned (logged once, as transformers does; older checkpoints carry e.g. rotary
        ``inv_freq``).

        Returns:
            the unexpected tensor names.

        Raises:
            ValueError: missing tensors, named (at most 5).
        """
        state = _persistent_state(model)
        missing = sorted(k for k in state if self._source(k) is None)
        if missing:
            raise ValueError(
                f"model.pretrained_model_name_or_path: the checkpoint in {self.folder} does not match "
                f"{type(model).__name__}: missing {len(missing)} tensor(s) the model needs: {missing[:5]}"
            )
        unexpected = sorted(k for fqn in self.sources.sources if fqn not in state for k in self.sources.keys_of(fqn))
        if unexpected:
            logger.warning("checkpoint tensors %s%s are not in %s and are not read", unexpected[:5],
                           " ..." if len(unexpected) > 5 else "", type(model).__name__)
        return unexpected

    @torch.no_grad()
    def load_into(self, module: nn.Module) -> None:
        """Copy the checkpoint's tensors into ``module``'s parameters and persistent
        buffers (cast to their dtype), opening only the files that hold them.

        Raises:
            ValueError: a tensor of ``module`` is not in the checkpoint, or its shape differs.
        """
        import contextlib

        from safetensors import safe_open

        items = []
        for fqn, target in _persistent_state(module).items():
            src = self._source(fqn)
            if src is None:
                raise ValueError(f"model.pretrained_model_name_or_path: the checkpoint in {self.folder} has no '{fqn}'")
            items.append((fqn, src, target))
        files = sorted({self.weight_map[key] for _, src, _ in items for key in self.sources.keys_of(src)})
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(self.folder / f), framework="pt", device="cpu")) for f in files}
            self.files_read.update(files)
            for fqn, src, target in items:
                tensor = self.sources.load(src, lambda key: handles[self.weight_map[key]].get_tensor(key), module)
                if tensor.shape != target.shape:
                    keys = self.sources.keys_of(src)
                    what = f"tensor '{keys[0]}' has" if len(keys) == 1 else f"tensors {keys} give"
                    raise ValueError(f"checkpoint {what} shape {tuple(tensor.shape)}, the model's '{fqn}' "
                                     f"{tuple(target.shape)}")
                target.copy_(tensor)
