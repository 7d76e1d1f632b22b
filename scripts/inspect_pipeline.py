"""Show how a config splits a model into pipeline stages, without training.

    python scripts/inspect_pipeline.py --config configs/smollm2_135m_squad_pp2.yaml \
        [--distributed.pp_size 4 --distributed.pipeline.pp_schedule interleaved_1f1b] [--png schedule.png]

Prints the stage table (global stage index, its pp rank, modules), parameters per
stage and the schedule's bubble fraction (idle share of the simulated timeline), and
writes the schedule picture. The model is built on the meta device: no weights are
read and no process is launched.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_pp.config import ConfigError, parse_cli
    from nemo_pp.distributed.pipelining.plan import make_pipeline_plan
    from nemo_pp.distributed.pipelining.visualize import bubble_fraction, save_schedule_png, schedule_actions
    from nemo_pp.training.schema import load_recipe_config

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--png", default="pipeline_schedule.png", help="where to write the schedule picture")
    known, rest = extra.parse_known_args(argv)
    try:
        path, overrides = parse_cli(rest)
        cfg = load_recipe_config(path, overrides)
        p = cfg.distributed.pipeline
        hf_cfg = AutoConfig.from_pretrained(str(cfg.model.pretrained_model_name_or_path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        plan = make_pipeline_plan(
            model, cfg.distributed.pp_size, p.get("pp_schedule"), p.get("pp_schedule_csv"), p.pp_microbatch_size,
            cfg.dataloader.batch_size, p.get("layers_per_stage"), p.get("round_virtual_stages_to_pp_multiple"),
            p.get("module_fqns_per_model_part"),
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    counts = [sum(t.numel() for n in names for t in model.get_submodule(n).parameters()) for names in plan.module_fqns]
    total = sum(t.numel() for t in model.parameters())
    print(f"{type(model).__name__}: {hf_cfg.num_hidden_layers} layers, {total:,} parameters"
          f"{' (tied embeddings: a copy on the first and the last stage)' if hf_cfg.tie_word_embeddings else ''}")
    print(plan.describe(counts))
    actions = schedule_actions(plan)
    print(f"bubble fraction: {100 * bubble_fraction(actions):.1f}% of {len(actions[0])} time slots per rank")
    title = f"{plan.schedule or 'CSV'}, pp {plan.pp_size}, {plan.n_microbatches} microbatches,"
    save_schedule_png(actions, known.png, title=title)
    print(f"schedule picture: {known.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
