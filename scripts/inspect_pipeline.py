"""Show how a config splits a model into pipeline stages, without training.

    python scripts/inspect_pipeline.py --config configs/smollm2_135m_squad_pp2.yaml \
        [--distributed.pp_size 4 --distributed.pipeline.pp_schedule interleaved_1f1b] [--png schedule.png]

Prints the run plan (parallel layout, stage table with each stage's pp rank and
modules), parameters per stage, the schedule's bubble fraction (idle share of the
simulated timeline) and a memory plan per pp rank (parameters, gradients, optimizer
state and the activations the schedule holds, with and without activation
checkpointing), and writes the schedule picture. The model is built on the meta device:
no weights are read and no process is launched, so a config folder alone will do:

    python scripts/inspect_pipeline.py --config configs/smollm2_135m_squad_pp2.yaml \
        --model.pretrained_model_name_or_path configs/models/llama-3.1-70b --model.torch_dtype bfloat16 \
        --distributed.pp_size 8 --world-size 32 --dataloader.batch_size 8 --step_scheduler.global_batch_size 32 \
        --dataset.seq_length 4096
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from nemo_pp.config import ConfigError, instantiate, parse_cli
    from nemo_pp.distributed.pipelining.visualize import save_schedule_png
    from nemo_pp.planning.run_plan import plan_run, planning_seq_len
    from nemo_pp.planning.schema import load_recipe_config
    from nemo_pp.planning.timeline import bubble_fraction, schedule_actions

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--png", default="pipeline_schedule.png", help="where to write the schedule picture")
    extra.add_argument("--world-size", type=int, default=None,
                       help="processes of the run (default: pp_size * cp_size * tp_size * (dp_size or ep_size))")
    extra.add_argument("--profile", action="store_true",
                       help="time each piece (embedding, one layer, head + loss) once on this CPU and predict "
                            "per-stage and optimizer-step seconds")
    extra.add_argument("--seq-len", type=int, default=None,
                       help="tokens per sample for the memory plan (default: pp_seq_len, else dataset.seq_length)")
    known, rest = extra.parse_known_args(argv)
    try:
        path, overrides = parse_cli(rest)
        cfg = load_recipe_config(path, overrides)
        d = cfg.distributed
        world = known.world_size or d.pp_size * d.cp_size * d.tp_size * (d.dp_size or d.ep_size)
        run = plan_run(cfg, world, check_checkpoint=False)  # the recipe's own plan, no weight read
    except (ConfigError, ValueError, OSError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from transformers import AutoConfig

    from nemo_pp.models.auto_model import resolve_dtype
    from nemo_pp.models.loading import empty_model
    from nemo_pp.models.module_tree import stage_parameters
    from nemo_pp.planning.memory import memory_plan, optimizer_states

    model = empty_model(AutoConfig.from_pretrained(run.model_path), resolve_dtype(cfg.model.get("torch_dtype")))
    plan = run.pipeline
    counts = [sum(t.numel() for t in stage_parameters(model, names)) for names in plan.module_fqns]
    total = sum(t.numel() for t in model.parameters())
    print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {total:,} parameters"
          f"{' (tied embeddings: a copy on the first and the last stage)' if model.config.tie_word_embeddings else ''}")
    print(run.describe())
    print("parameters per stage: " + ", ".join(f"{i}: {n:,}" for i, n in enumerate(counts)))
    actions = schedule_actions(plan)
    print(f"bubble fraction: {100 * bubble_fraction(actions):.1f}% of {len(actions[0])} time slots per rank")
    title = f"{plan.schedule or 'CSV'}, pp {plan.pp_size}, {plan.n_microbatches} microbatches,"
    save_schedule_png(actions, known.png, title=title)
    print(f"schedule picture: {known.png}")

    seq_len = known.seq_len or planning_seq_len(cfg)
    if not seq_len:
        print("cost and memory plan: pass --seq-len (no pp_seq_len or dataset.seq_length in the config)")
        return 0
    from nemo_pp.models.moe import moe_layer_indices, router_spec
    from nemo_pp.planning.cost import flop_costs, profile_costs, stage_costs_of_plan
    from nemo_pp.planning.timeline import simulated_step_seconds

    spec = router_spec(model)
    sparse = set(moe_layer_indices(model, spec)) if spec is not None else set()  # active expert FLOPs, as the split
    flops_pieces = flop_costs(model.config, plan.microbatch_size, seq_len, moe_layers=sparse)
    flops = stage_costs_of_plan(plan, flops_pieces)
    mean = sum(flops) / len(flops)
    print(f"stage cost (FLOP model, split '{d.pipeline.split}'): " + ", ".join(
        f"{i}: {f / mean:.2f}" for i, f in enumerate(flops)) + f" x the mean; slowest {max(flops) / mean:.3f} x")
    if run.sizes.ep > 1:
        from nemo_pp.planning.cost import PieceCosts, expert_all_to_all_bytes

        per_layer = expert_all_to_all_bytes(model.config, plan.microbatch_size, seq_len, run.sizes.ep,
                                            next(model.parameters()).element_size(), run.activation_checkpointing)
        volume = PieceCosts(0.0, tuple(per_layer if i in sparse else 0.0 for i in range(len(flops_pieces.layers))), 0.0)
        steps = plan.n_microbatches * run.grad_acc_steps
        print(f"expert all-to-all sent per rank and optimizer step (ep {run.sizes.ep}, balanced routing, "
              f"{'with' if run.activation_checkpointing else 'without'} recomputation): " + ", ".join(
                  f"stage {i}: {b * steps / 1024**3:.2f} GiB" for i, b in enumerate(stage_costs_of_plan(plan, volume))))
    if known.profile:
        import torch

        torch.set_num_threads(1)
        seconds = stage_costs_of_plan(plan, profile_costs(model.config, plan.microbatch_size, seq_len))
        step = simulated_step_seconds(plan, seconds)
        print("predicted fwd+bwd seconds per microbatch (1 thread): " + ", ".join(
            f"stage {i}: {t:.3f}" for i, t in enumerate(seconds)))
        print(f"predicted seconds per schedule step {step:.2f}, per optimizer step {step * run.grad_acc_steps:.2f} "
              f"(at {seq_len} tokens; batches padded shorter run faster)")
    states = optimizer_states(cfg)
    shards = run.sizes.dp_shard * run.sizes.cp if run.sizes.dp * run.sizes.cp > 1 else 1
    # under cp each rank holds S/cp tokens of every sequence (plus the gathered keys and
    # values of the layer running, not counted here)
    local_len = seq_len // run.sizes.cp
    ep = run.sizes.ep
    gib = 1024**3
    print(f"memory plan per pp rank (seq_len {seq_len}, {local_len} per cp rank, {plan.n_microbatches} microbatches of "
          f"{plan.microbatch_size}, FSDP shards {shards}, {states} optimizer states per parameter"
          + (f", experts over ep {ep} x ep_shard {run.sizes.ep_shard}, routing balanced" if ep > 1 else "") + "), GiB:")
    print(f"  {'rank':<5}{'stages':<10}{'params':>8}{'grads':>8}{'optim':>8}{'activ.':>8}{'act+AC':>8}{'recv':>8}"
          f"{'total':>8}{'total+AC':>9}  microbatches held; receive buffers / activations (+AC)")
    loss_fn = instantiate(cfg.loss_fn)
    plain = memory_plan(model, plan, local_len, shards, states, activation_checkpointing=False, ep=ep, loss_fn=loss_fn)
    ckpt = memory_plan(model, plan, local_len, shards, states, activation_checkpointing=True, ep=ep, loss_fn=loss_fn)
    for r, c in zip(plain, ckpt):
        extra = r.recv_buffer_bytes - r.recv_in_activation_bytes  # beyond the held inputs
        share = "  ".join(f"{100 * extra / max(a, 1):.0f} %" for a in (r.activation_bytes, c.activation_bytes))
        print(f"  {r.pp_rank:<5}{str(list(r.stages)):<10}{r.param_bytes / gib:>8.2f}{r.grad_bytes / gib:>8.2f}"
              f"{r.optimizer_bytes / gib:>8.2f}{r.activation_bytes / gib:>8.2f}{c.activation_bytes / gib:>8.2f}"
              f"{r.recv_buffer_bytes / gib:>8.2f}{r.total_bytes / gib:>8.2f}{c.total_bytes / gib:>9.2f}  "
              f"{r.in_flight}; {share}")
    print("  plus the process itself: about 0.7 GiB of Python/torch/transformers on CPU (measured), the CUDA "
          "context and allocator cache on GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
