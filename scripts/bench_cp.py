"""Activation memory and step time per rank at cp 1 vs cp 2 on one long sequence (a benchmark, not a test).

    .venv/bin/python scripts/bench_cp.py [--seq 4096] [--hidden 512] [--layers 4] [--vocab 8192] [--steps 3]

Builds a random tiny-shaped Llama (8 heads, 4 kv heads) and runs the recipe's own
path (AutoPipeline with one stage, TrainEngine, the all-gather CP attention) on one
``[1, seq]`` sequence: cp 1 in one process, cp 2 in two processes (gloo, one thread
each). Activation memory is what autograd saves for backward, counted by
``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters excluded):
the memory a step holds at the end of its forward. Also printed: the median step time
after the first and the loss, which must agree between the layouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp

from nemo_pp.distributed.init import free_port


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_pp.distributed.context_parallel import ContextParallel, ContextParallelizer
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes
    from nemo_pp.training.engine import TrainEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, cp_size=world))
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")

    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="gpipe", pp_batch_size=1, device=torch.device("cpu")).build(
        model, loss_fn=loss_fn, parallelize_fn=ContextParallelizer(ContextParallel(mesh, "allgather")) if world > 1 else None)
    cp = ContextParallel(mesh, "allgather") if world > 1 else None
    engine = TrainEngine(ap, torch.device("cpu"), max_grad_norm=None, cp=cp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    saved, times, loss = SavedBytes(ap.parts[0]), [], None
    for step in range(args.steps):
        start = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                out = engine.train_step([batch], [], [])
        else:
            out = engine.train_step([batch], [], [])
            times.append(time.perf_counter() - start)
        for p in ap.parts[0].parameters():
            p.grad = None
        loss = out["loss"]
    import resource

    queue.put((rank, saved.total, statistics.median(times) if times else float("nan"), loss,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    dist.destroy_process_group()


def measure(world: int, args) -> list[tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; one sequence of {args.seq} tokens")
    print(f"{'layout':<8}{'rank':>5}{'activations MiB':>17}{'peak RSS MiB':>14}{'median step s':>15}{'loss':>10}")
    for cp in (1, 2):
        for rank, saved, step_s, loss, rss in measure(cp, args):
            print(f"{'cp ' + str(cp):<8}{rank:>5}{saved / 2**20:>17.1f}{rss / 2**20:>14.0f}{step_s:>15.2f}{loss:>10.5f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
