"""Run a function on several real gloo ranks forked from a clean server process.

Ranks come from multiprocessing's ``forkserver``: a process started once per test
session that imports torch, transformers, peft and nemo_pp and nothing else, then forks
each rank. That skips torchrun and the imports (0.3-1.2 s per test instead of 8-10 s)
like forking the pytest process would, without inheriting what hundreds of earlier
tests left in the pytest process (thread pools, allocator state): ranks forked from it
crashed rarely inside DTensor collectives (a segfault in 1 of ~460 tests per full run),
never when their tests ran alone. Each rank gets the caller's environment and working
directory. ``start_method="fork"`` remains for a test that must capture the ranks'
output through pytest's ``capfd``.

Every rank uses ``init_process_group(timeout=...)`` so a bug fails in seconds; the
parent kills ranks that outlive ``timeout`` and re-raises the first rank error
with its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from datetime import timedelta
from typing import Any, Callable

from nemo_pp.distributed.init import free_port

# what every rank needs, imported once by the forkserver (an import that fails is skipped)
_PRELOAD = [
    "pytest", "torch", "torch.distributed.tensor", "torch.distributed.fsdp", "torch.distributed.pipelining",
    "torch.distributed.checkpoint", "transformers", "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2", "peft", "peft.tuners.lora", "datasets", "omegaconf", "hydra.utils",
    "nemo_pp.config", "nemo_pp.distributed.pipelining", "nemo_pp.training.engine", "nemo_pp.planning.run_plan",
    "nemo_pp.training.data", "nemo_pp.checkpoint.checkpointer", "nemo_pp.checkpoint.peft_export", "nemo_pp.distributed.context_parallel",
    "tests.tiny_models", "tests.helpers",
]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, pg_timeout_s: float,
           env: dict, cwd: str, backend: str = "gloo") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, including asserts
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        # Queue.put hands the item to a feeder thread; flush it before _exit kills us.
        queue.close()
        queue.join_thread()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        os._exit(0)


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, pg_timeout_s: float = 60.0,
              start_method: str = "forkserver", backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (or nccl ranks, one GPU each).

    Args:
        fn, args: a module-level function and picklable arguments (they reach the
            forkserver by pickle).
        start_method: ``forkserver`` (default) or ``fork`` (ranks share pytest's file
            descriptors, so ``capfd`` sees their output).

    Returns:
        the per-rank return values, ordered by rank.

    Raises:
        AssertionError: a rank raised (its traceback is in the message) or timed out.
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts (the first call)
    queue = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue, pg_timeout_s, env, cwd, backend))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod

    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"timed out after {timeout} s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
                break
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
