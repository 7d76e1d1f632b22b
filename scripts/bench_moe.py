"""Experts implementations of a synthetic mixture of experts (a benchmark, not a test).

    .venv/bin/python scripts/bench_moe.py [--steps 5] [--experts 8] [--top-k 2] [--tokens 2048]

A Mixtral-shaped model (hidden 512, intermediate 1024, 4 layers, 8 experts, top 2, tied
embeddings, random weights) trained with AdamW on random tokens, with the router's
load-balancing loss on, once per transformers experts implementation
(``config._experts_implementation``): ``eager`` (one matmul per expert that got tokens),
``grouped_mm`` (one grouped GEMM: ``torch._grouped_mm``, or transformers' fallback where
the device has none) and ``batched_mm`` (every token through every expert's weights). Each
runs in its own process, so peak memory is per run. Prints the median step time, tokens/s,
peak memory and the final loss (equal across implementations up to float rounding).

``--ep 2`` adds a row for expert parallelism: the same model and global batch on 2 gloo
processes, each routing its half of the tokens, its 4 experts of every layer sharded to it
(``nemo_pp.distributed.expert_parallel``: all-to-all dispatch and combine) and every other
parameter FSDP2-sharded, the chain the recipe builds at pp 1 x dp 2 x ep 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_one(impl: str, steps: int, experts: int, top_k: int, tokens: int, ep: int = 1) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from nemo_pp.training.metrics import peak_memory_bytes

    rank = 0
    if ep > 1:  # under torchrun: this rank's half of the batch, its share of the experts
        import torch.distributed as dist

        from nemo_pp.distributed.init import initialize_distributed
        from nemo_pp.distributed.mesh import build_device_mesh
        from nemo_pp.distributed.parallelize import parallelize_chain
        from nemo_pp.planning.dims import resolve_parallel_sizes

        initialize_distributed("cpu", timeout_s=600)
        rank = dist.get_rank()
        mesh = build_device_mesh("cpu", resolve_parallel_sizes(ep, pp_size=1, ep_size=ep))
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
                           num_experts_per_tok=top_k, tie_word_embeddings=True, output_router_logits=True,
                           router_aux_loss_coef=0.01, max_position_embeddings=tokens)
    config._experts_implementation = impl
    model = MixtralForCausalLM(config)
    seq = 512
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (tokens // seq, seq), generator=g)
    if ep > 1:
        parallelize_chain(mesh)(model, mesh.world)
        ids = ids.chunk(ep)[rank]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, loss = [], None
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)  # HF's own loss, aux term included
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        loss = float(out.loss)
    step = statistics.median(times[1:])  # the first step allocates
    return {"impl": impl if ep == 1 else f"ep {ep}, {impl}", "step_s": step, "tokens_per_s": ids.numel() * ep / step,
            "peak_gib": peak_memory_bytes(torch.device("cpu")) / 2**30, "loss": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (rows of 512)")
    parser.add_argument("--impls", nargs="*", default=["eager", "grouped_mm"],
                        help="also batched_mm: every token through every expert (minutes on a CPU)")
    parser.add_argument("--ep", type=int, default=1, help="also a row at this ep size (2 processes at --ep 2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--ep-rank-run", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one, args.steps, args.experts, args.top_k, args.tokens, args.ep_rank_run)
        if args.ep_rank_run == 1 or int(__import__("os").environ.get("RANK", 0)) == 0:
            print(json.dumps(result))
        return 0
    print(f"{args.experts} experts, top {args.top_k}, {args.tokens} tokens per step (global)")
    print(f"{'experts implementation':<24}{'median step s':>14}{'tokens/s':>10}{'peak GiB':>10}{'loss':>9}")
    for impl in args.impls:
        proc = subprocess.run([sys.executable, __file__, "--one", impl, "--steps", str(args.steps), "--experts",
                               str(args.experts), "--top-k", str(args.top_k), "--tokens", str(args.tokens)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{impl:<24} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{impl:<24}{r['step_s']:>14.3f}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.2f}{r['loss']:>9.4f}", flush=True)
    # under ep the local experts follow the implementation: a loop for eager, grouped GEMMs for grouped_mm
    for impl in [i for i in args.impls if i in ("eager", "grouped_mm")] if args.ep > 1 else []:
        from nemo_pp.distributed.init import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ep}", f"--master_port={free_port()}",
               __file__, "--one", impl, "--ep-rank-run", str(args.ep), "--steps", str(args.steps), "--experts",
               str(args.experts), "--top-k", str(args.top_k), "--tokens", str(args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"ep {args.ep} failed: {proc.stderr.strip().splitlines()[-1]}")
            return 1
        r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        print(f"{r['impl']:<24}{r['step_s']:>14.3f}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.2f}{r['loss']:>9.4f}"
              "  (per rank: peak memory, loss of its half batch)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
