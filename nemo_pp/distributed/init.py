"""Process group start-up: backend by device (nccl on CUDA, gloo on CPU), timeouts, seeding."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

#: Default collective timeout: a hang fails in minutes, never blocks forever.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the default process group, from :func:`initialize_distributed`.

    Attributes:
        rank: global rank, in ``[0, world_size)``.
        world_size: number of processes in the default group.
        local_rank: rank on this node (``LOCAL_RANK``; 0 for a plain launch).
        device: ``cuda:<local_rank>`` or ``cpu`` (:func:`pick_device`).
        backend: ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def pick_device(local_rank: int = 0, device: str | None = None) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (or asked for), else ``cpu``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("dist_env.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it), for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_store(timeout: timedelta):
    """Under torchrun, the agent's store seen through a prefix of this restart attempt
    (``TORCHELASTIC_RESTART_COUNT``); None elsewhere (``env://`` as usual).

    torchrun's static rendezvous (its default for a fixed ``--nnodes``) keeps one store for
    every attempt of ``--max-restarts``, and torch 2.13's ``env://`` handler no longer
    prefixes the keys by attempt (it assumes a new store per attempt). The restarted
    workers then read the dead workers' gloo addresses and fail with "connectFullMesh
    failed ... Connection refused". The prefix gives every attempt keys of its own.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/nemo_pp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def initialize_distributed(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join (or create, for a plain ``python`` launch) the default process group.

    Under torchrun the ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables are used; a plain
    launch becomes a world of one so the same code path runs.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        store = _restart_store(timedelta(seconds=timeout_s))
        if store is not None:
            kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)



def set_seed(seed: int) -> None:
    """Seed python, torch (CPU and CUDA) identically on every rank."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def destroy_distributed() -> None:
    """Barrier, then destroy the default process group; a no-op when none is initialised."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_ints(value: int, device: torch.device) -> list[int]:
    """``value`` of every rank in rank order (one all-gather; collective); ``[value]`` alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [int(value)]
    out = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(int(value), dtype=torch.int64, device=device))
    return [int(t) for t in out]
