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


def main(argv: list[str] | None = None) -> int:
    from nemo_pp.config import ConfigError, parse_cli
    from nemo_pp.distributed.pipelining.visualize import bubble_fraction, save_schedule_png, schedule_actions
    from nemo_pp.training.preflight import preflight_check
    from nemo_pp.training.schema import load_recipe_config

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--png", default="pipeline_schedule.png", help="where to write the schedule picture")
    extra.add_argument("--world-size", type=int, default=None,
                       help="processes of the run (default: pp_size * cp_size * tp_size * (dp_size or 1))")
    known, rest = extra.parse_known_args(argv)
    try:
        path, overrides = parse_cli(rest)
        cfg = load_recipe_config(path, overrides)
        d = cfg.distributed
        world = known.world_size or d.pp_size * d.cp_size * d.tp_size * (d.dp_size or 1)
        run = preflight_check(cfg, world, check_checkpoint=False)  # the recipe's own plan, no weight read
    except (ConfigError, ValueError, OSError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from transformers import AutoConfig

    from nemo_pp.models.loading import empty_model

    model = empty_model(AutoConfig.from_pretrained(run.model_path))
    plan = run.pipeline
    counts = [sum({id(t): t.numel() for n in names for t in model.get_submodule(n).parameters()}.values())
              for names in plan.module_fqns]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
