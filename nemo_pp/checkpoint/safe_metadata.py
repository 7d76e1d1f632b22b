"""Read a checkpoint's tensor index without trusting it: no arbitrary unpickling.

torch.distributed.checkpoint stores its index (``.metadata``: every tensor's FQN, global
shape, dtype and file slices) as a pickle and reads it with ``pickle.load``; a crafted
file could run code on load. :func:`read_metadata` unpickles it with an allowlist of the
classes such an index is made of and refuses anything else, so every rank checks a
checkpoint this way before torch reads it. Tensor data itself is read by torch with
``weights_only=True``. The safetensors format's index is JSON (the file headers).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from nemo_pp.checkpoint.layout import CorruptCheckpointError

__all__ = ["check_model_compatible", "read_metadata", "tensor_shapes"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == _DCP_METADATA or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint index never holds")


def read_metadata(folder: str | Path, model_save_format: str = "torch_save"):
    """The ``torch.distributed.checkpoint.Metadata`` of the DCP or safetensors folder ``folder``.

    Raises:
        CorruptCheckpointError: the index is missing, truncated, or refers to anything
            but index classes (the file is named).
    """
    folder = Path(folder)
    if model_save_format == "safetensors":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        try:
            return HuggingFaceStorageReader(str(folder)).read_metadata()
        except Exception as exc:
            raise CorruptCheckpointError(f"cannot read the safetensors files in {folder}: {exc}") from None
    path = folder / ".metadata"
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint index {path} is missing; the checkpoint is damaged")
    try:
        with path.open("rb") as f:
            return _IndexUnpickler(f).load()
    except Exception as exc:  # EOFError, UnpicklingError, ...: all mean "do not load this"
        raise CorruptCheckpointError(f"checkpoint index {path} is unreadable or unsafe ({exc}); not loading it") from None


def tensor_shapes(metadata) -> dict[str, tuple[int, ...]]:
    """``{FQN: global shape}`` of every tensor in ``metadata``."""
    return {
        k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")
    }


def check_model_compatible(folder: str | Path, expected: dict[str, tuple[int, ...]], model_save_format: str) -> None:
    """Check that the model checkpoint in ``folder`` holds exactly the tensors ``expected``
    (``{FQN: shape}`` of the model being trained), with those shapes.

    Raises:
        CorruptCheckpointError: missing, unexpected or differently shaped tensors (the
            first few named): the checkpoint is from another model.
    """
    saved = tensor_shapes(read_metadata(folder, model_save_format))
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k]) != tuple(expected[k]))
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors of the model are not in it (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} of its tensors are not in the model (e.g. {', '.join(extra[:3])})")
    if shapes:
        parts.append("shapes differ: " + ", ".join(f"{k} {tuple(saved[k])} vs {tuple(expected[k])}" for k in shapes[:3]))
    raise CorruptCheckpointError(
        f"the checkpoint {folder} is from another model: " + "; ".join(parts)
        + ". Resume with the model it was written for, or start fresh (another checkpoint.checkpoint_dir)"
    )
