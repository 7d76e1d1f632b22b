"""Periodic, crash-safe, reshardable training checkpoints (torch.distributed.checkpoint).

One checkpoint is the folder ``checkpoint_dir/epoch_E_step_S/``::

    model/               model tensors by FQN: DCP shards (torch_save) or safetensors
    model/consolidated/  a Hugging Face folder (checkpoint.save_consolidated: every)
    optim/               optimizer tensor state by FQN (DCP)
    rng/rank_NNNNN.pt    each rank's RNG states (weights-only torch.save)
    trainer_state.json   step, epoch, data position, LR scheduler, the parallel layout
    config.yaml          the resolved config of the run that wrote it
    complete.json        written last: the manifest; without it the folder is never used

Every rank writes its share into a temporary folder; rank 0 renames it and writes the
marker once all shares are on disk (:mod:`nemo_pp.checkpoint.layout`). With
``is_async`` the tensors are copied to CPU memory and written by a background thread
(``torch.distributed.checkpoint.async_save``) while training goes on; rank 0 finishes
the checkpoint when its write completes, at a later step boundary.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nemo_pp.checkpoint import layout
from nemo_pp.checkpoint.finite import check_finite_weights
from nemo_pp.checkpoint.layout import CorruptCheckpointError
from nemo_pp.checkpoint.safe_metadata import read_metadata
from nemo_pp.checkpoint.state import (
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    rng_state,
    set_rng_state,
    set_scheduler_state,
)
from nemo_pp.config import write_text_atomic
from nemo_pp.errors import first_error_of_all_ranks

__all__ = ["CheckpointWriteError", "Checkpointer", "TRAINER_STATE", "check_checkpoint"]

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, an unwritable folder); the message
    names the folder and the bytes. Complete checkpoints already on disk are untouched, and
    the next run's first save removes the partial folder."""


def _local_bytes(*states: dict) -> int:
    """Bytes of this rank's share of ``states`` (local shards of DTensors)."""
    total = 0
    for state in states:
        for v in state.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
            elif isinstance(v, dict):
                total += _local_bytes(v)
    return total


def _is_disk_full(exc: BaseException) -> bool:
    # torch's zip writer reports ENOSPC as "unexpected pos" (inline_container.cc); DCP wraps
    # each rank's error in a CheckpointException whose text carries it
    text = repr(exc)
    return (getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "ENOSPC" in text
            or "unexpected pos" in text)


def _merge(states: Sequence[dict]) -> dict:
    merged: dict = {}
    for s in states:
        merged.update(s)
    return merged


def _unaliased(state: dict) -> dict:
    """``state`` with a copy for each tensor that shares memory with an earlier one
    (safetensors refuses aliases: a tied embedding held by one stage)."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.to_local() if hasattr(value, "to_local") else value).data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _never_stepped(missing: Sequence[str], saved) -> set[str]:
    """The ``state.<fqn>`` prefixes of parameters the saved optimizer never stepped: every
    entry of theirs is missing while the checkpoint holds other parameters' entries (torch's
    optimizers create a parameter's state at its first gradient; a parameter no forward
    uses has none when saved, but gets a fresh one when state is created to load into)."""
    if not saved:
        return set()
    saved_prefixes = {k.rpartition(".")[0] for k in saved}
    return {k.rpartition(".")[0] for k in missing} - saved_prefixes


class Checkpointer:
    """Saves and loads this rank's share of a training checkpoint (collective calls).

    Args:
        checkpoint_dir: ``checkpoint.checkpoint_dir``.
        parts: this rank's model parts (stage modules).
        optimizers, lr_schedulers: one per part.
        model_save_format: ``torch_save`` (DCP shards) or ``safetensors``.
        is_async: write in the background (``dcp.async_save``).
        max_recent_checkpoints: complete checkpoints kept (None: all).
        tied: (embedding FQN, head FQN) of a tied embedding, else None.
        export_consolidated: ``fn(folder)`` writing a Hugging Face folder (collective);
            called into ``model/consolidated`` of each checkpoint when given.
        layout_info: the parallel layout, recorded in each checkpoint.
        trainable_only: save and load only parameters that require grad (LoRA adapters).
        timeout_s: timeout of the background writes' process groups.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        parts: Sequence[torch.nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        lr_schedulers: Sequence,
        model_save_format: str = "torch_save",
        is_async: bool = False,
        max_recent_checkpoints: int | None = None,
        tied: tuple[str, str] | None = None,
        export_consolidated: Callable[[Path], None] | None = None,
        layout_info: dict | None = None,
        trainable_only: bool = False,
        timeout_s: float = 600.0,
    ):
        if model_save_format not in ("torch_save", "safetensors"):
            raise ValueError(f"checkpoint.model_save_format must be torch_save or safetensors, got {model_save_format!r}")
        self.dir = Path(checkpoint_dir)
        self.parts, self.optimizers, self.lr_schedulers = list(parts), list(optimizers), list(lr_schedulers)
        self.model_save_format = model_save_format
        self.is_async = is_async
        self.keep = max_recent_checkpoints
        self.tied = tied
        self.export_consolidated = export_consolidated
        self.layout_info = dict(layout_info or {})
        self.trainable_only = trainable_only
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self._pending: tuple[Path, Path, list[Future]] | None = None
        self._need = 0  # bytes this rank writes per checkpoint, for a failed write's message
        self._started_cleanup = False
        self._groups = None
        if is_async and dist.is_initialized():
            # the background writes' collectives need their own groups: they run while the
            # training loop uses the default one (one group per concurrent save)
            self._groups = [dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) for _ in range(2)]

    # ------------------------------------------------------------------ save
    def save(self, epoch: int, step: int, trainer_state: dict, config_yaml: str) -> Path:
        """Write the checkpoint of the state after ``step`` optimizer steps (collective).

        Args:
            trainer_state: JSON-able ``{"step", "epoch", "samples_in_epoch", ...}``; the
                LR scheduler state, layout and format are added.
            config_yaml: the resolved config, stored as ``config.yaml``.

        Returns:
            The final folder (still being written when async: see :meth:`wait`).

        Raises:
            NonFiniteWeightsError: the weights hold NaN or inf (nothing written).
            CheckpointWriteError: a write failed (full disk, unwritable folder), on every rank.
        """
        self.wait()  # one save in flight at a time
        name = layout.checkpoint_name(epoch, step)
        temp, final = layout.temp_dir_for(self.dir, name), self.dir / name
        check_finite_weights(self.parts, f"checkpoint {final}", self.rank)
        self.remove_incomplete()
        model = _merge(model_state(self.parts, self.trainable_only))
        if self.model_save_format == "safetensors":
            model = _unaliased(model)
        optim = _merge(optimizer_state(self.parts, self.optimizers, self.tied))
        self._need = _local_bytes(model, optim)
        error = None
        try:  # rank-local writes first: every rank learns of any rank's failure before DCP's collectives
            (temp / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), temp / "rng" / f"rank_{self.rank:05d}.pt")
            if self.is_main:
                state = {
                    **trainer_state, "model_save_format": self.model_save_format,
                    "lr_scheduler": self.lr_schedulers[0].state_dict() if self.lr_schedulers else None,
                    "layout": self.layout_info, "torch_version": torch.__version__,
                }
                write_text_atomic(temp / TRAINER_STATE, json.dumps(state, indent=1, default=_jsonable))
                write_text_atomic(temp / "config.yaml", config_yaml)
        except (OSError, RuntimeError) as exc:
            error = self._write_error(temp, exc)
        error = first_error_of_all_ranks(error)
        if error is not None:
            raise CheckpointWriteError(error)
        with self._writing(temp):
            if self.export_consolidated is not None:
                self.export_consolidated(temp / "model" / "consolidated")
            if self.is_async:
                futures = [
                    dcp.async_save(model, storage_writer=self._model_writer(temp / "model"), process_group=self._group(0)),
                    dcp.async_save(optim, checkpoint_id=str(temp / "optim"), process_group=self._group(1)),
                ]
                self._pending = (temp, final, futures)
            else:
                dcp.save(model, storage_writer=self._model_writer(temp / "model"))
                dcp.save(optim, checkpoint_id=str(temp / "optim"))
                self._barrier()  # every rank's rng file is written
        error = None
        if self.is_main and not self.is_async:
            try:  # the rename, checksums and marker: rank 0 alone, so every rank learns how it went
                self._finish(temp, final)
            except (OSError, RuntimeError) as exc:
                error = self._write_error(temp, exc)
        if not self.is_async:
            error = first_error_of_all_ranks(error)  # also the barrier after the marker
            if error is not None:
                raise CheckpointWriteError(error)
        return final

    def remove_incomplete(self) -> None:
        """Remove what a save that did not finish left in ``checkpoint_dir`` (a temporary
        folder, a folder without its marker), once per run, before its first save
        (collective: rank 0 removes, every rank waits)."""
        if self._started_cleanup:
            return
        self._started_cleanup = True
        if self.is_main:
            for path in layout.remove_incomplete(self.dir):
                logger.warning("removed %s, left by a save that did not finish", path)
        self._barrier()

    def _write_error(self, temp: Path, exc: BaseException) -> str:
        """The message of a failed write: the folder, free and needed bytes, what is kept."""
        folder = temp if temp.exists() else self.dir
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        full = _is_disk_full(exc) or free < self._need
        kept = layout.complete_checkpoints(self.dir)
        what = "the disk is full" if full else "the write failed"
        failures = getattr(exc, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
        if failures:
            exc = failures.get(self.rank, next(iter(failures.values())))[0]
        return (
            f"cannot write the checkpoint {temp} on rank {self.rank}: {what} ({free / 2**20:.0f} MiB free on that disk; "
            f"this rank writes about {self._need / 2**20:.0f} MiB of it): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}. "
            + (f"The last complete checkpoint, {kept[-1].path}, is intact; " if kept else "No complete checkpoint exists yet; ")
            + "free space (or set checkpoint.checkpoint_dir on another disk) and run the same command to resume "
            "(the partial folder is removed now, or else by that run)"
        )

    @contextlib.contextmanager
    def _writing(self, temp: Path):
        """Turn a failed write (DCP raises on every rank) into a :class:`CheckpointWriteError`;
        rank 0 then removes the partial folder (every rank's writes have ended), freeing its space."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except (OSError, RuntimeError, dcp.CheckpointException) as exc:
            message = self._write_error(temp, exc)
            if self.is_main:
                shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointWriteError(message) from exc

    def _group(self, i: int):
        return self._groups[i] if self._groups else None

    def _model_writer(self, folder: Path):
        if self.model_save_format == "safetensors":
            from torch.distributed.checkpoint import HuggingFaceStorageWriter

            return HuggingFaceStorageWriter(str(folder), save_distributed=True)
        return dcp.FileSystemWriter(str(folder))

    def _finish(self, temp: Path, final: Path) -> None:
        layout.mark_complete(temp, final)
        for old in layout.prune_checkpoints(self.dir, self.keep, protect=final):
            logger.info("removed old checkpoint %s (checkpoint.max_recent_checkpoints=%s)", old, self.keep)

    def poll(self) -> None:
        """Finish an async save whose write is done (rank 0; no communication)."""
        if self._pending is None or not all(f.done() for f in self._pending[2]):
            return
        temp, final, futures = self._pending
        self._pending = None
        with self._writing(temp):
            for f in futures:
                f.result()  # raises the write's error
            if self.is_main:
                self._finish(temp, final)

    def wait(self) -> None:
        """Block until an async save is written and finished (collective when ``is_async``:
        a rank whose own write is done still waits for rank 0 to finish the checkpoint)."""
        if not self.is_async:
            return  # a sync save is finished when save() returns
        if self._pending is not None:
            try:
                with self._writing(self._pending[0]):
                    for f in self._pending[2]:
                        f.result()
            except CheckpointWriteError:
                self._pending = None
                raise
            self.poll()
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def close(self) -> None:
        """Finish what is in flight and release the background process groups."""
        self.wait()
        for group in self._groups or []:
            dist.destroy_process_group(group)
        self._groups = None

    # ------------------------------------------------------------------ load
    def load(self, folder: str | Path, restore_rng: bool = True) -> dict:
        """Load the checkpoint ``folder`` into the parts, optimizers and LR schedulers
        (collective), whatever parallel layout wrote it.

        The caller has checked the folder (:func:`check_checkpoint`) on every rank.

        Returns:
            The trainer state (``step``, ``epoch``, ``samples_in_epoch``, ``layout``, ...).

        Raises:
            CorruptCheckpointError: the optimizer state does not match this optimizer
                (raised on every rank), or torch could not read a file.
        """
        folder = Path(folder)
        state = json.loads((folder / TRAINER_STATE).read_text())
        models = model_state(self.parts, self.trainable_only)
        for opt in self.optimizers:
            # torch creates the state to load into by a zero step, only where no grad is set
            opt.zero_grad(set_to_none=True)
        optims = optimizer_state(self.parts, self.optimizers, None)
        if any(opt.param_groups and not opt.state for opt in self.optimizers):
            raise CorruptCheckpointError(
                f"the optimizer {type(self.optimizers[0]).__name__} keeps no state to load from {folder / 'optim'}"
            )
        optim_meta = read_metadata(folder / "optim")
        missing = sorted(k for k in _merge(optims) if k not in optim_meta.state_dict_metadata)
        unstepped = _never_stepped(missing, optim_meta.state_dict_metadata)
        if unstepped:  # parameters no forward used (LLaVA's last vision norm): fresh state, as before the save
            for o in optims:
                for key in [k for k in o if k.rpartition(".")[0] in unstepped]:
                    del o[key]
            missing = [k for k in missing if k.rpartition(".")[0] not in unstepped]
        error = first_error_of_all_ranks(
            f"the optimizer state in {folder / 'optim'} lacks {len(missing)} entries of this optimizer "
            f"(e.g. {', '.join(missing[:3])}): it was written with another optimizer or model; resume with the "
            "same optimizer._target_, or start fresh" if missing else None
        )
        if error is not None:
            raise CorruptCheckpointError(error)
        fmt = state.get("model_save_format", "torch_save")
        reader = None
        if fmt == "safetensors":
            from torch.distributed.checkpoint import HuggingFaceStorageReader

            reader = HuggingFaceStorageReader(str(folder / "model"))
        try:
            merged = _merge(models)
            dcp.load(merged, checkpoint_id=str(folder / "model"), storage_reader=reader)
            for m in models:  # a load may replace values (safetensors): take them back per part
                m.update({k: merged[k] for k in m})
            load_model_state(self.parts, models, self.trainable_only)
            merged = _merge(optims)
            dcp.load(merged, checkpoint_id=str(folder / "optim"))
            for o in optims:
                o.update({k: merged[k] for k in o})
        except dcp.CheckpointException as exc:
            raise CorruptCheckpointError(f"cannot load the checkpoint {folder}: {exc}") from None
        load_optimizer_state(self.parts, self.optimizers, optims)
        if state.get("lr_scheduler") is not None:
            set_scheduler_state(self.lr_schedulers, self.optimizers, state["lr_scheduler"])
        rng_file = folder / "rng" / f"rank_{self.rank:05d}.pt"
        if restore_rng and state.get("layout") == self.layout_info and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif restore_rng:
            logger.info("checkpoint written with layout %s, resuming at %s: RNG states start fresh",
                        state.get("layout"), self.layout_info)
        return state


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def check_checkpoint(folder: str | Path, expected_shapes: dict[str, tuple[int, ...]], checksums: bool = True) -> dict:
    """Everything that can be checked of checkpoint ``folder`` before any weight is read:
    the marker, every file's size and (``checksums``) checksum, the indexes (safely
    unpickled), the trainer state, and that the model tensors match ``expected_shapes``
    (``{FQN: shape}``).

    Returns:
        The trainer state.

    Raises:
        CorruptCheckpointError: naming the file or the mismatch.
    """
    from nemo_pp.checkpoint.safe_metadata import check_model_compatible

    folder = Path(folder)
    layout.verify_manifest(folder, checksums=checksums)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        step, epoch = int(state["step"]), int(state["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{folder / TRAINER_STATE} is missing or unreadable ({exc})") from None
    if step < 0 or epoch < 0:
        raise CorruptCheckpointError(f"{folder / TRAINER_STATE} holds step {step}, epoch {epoch}")
    check_model_compatible(folder / "model", expected_shapes, state.get("model_save_format", "torch_save"))
    read_metadata(folder / "optim")
    return state
