"""The layout search's step-time model against measured runs on this machine.

    .venv/bin/python scripts/bench_plan.py [--models smollm2 tiny tiny_moe] [--worlds 1 2 4] [--per-world 4]
        [--steps 4] [--json bench_plan.json]

For each model and world size, ``nemo_pp.planning.search.plan_layouts`` plans every layout
the recipe accepts here (probing this CPU at one thread per rank, as torchrun runs them);
``--per-world`` of them, spread over the predicted order from the fastest to the slowest,
then run through the real recipe under torchrun (``scripts/bench_common.timed_recipe_run``:
median optimizer step over steps 2..) at a fixed 256 tokens per sample
(``dataloader.pad_seq_len_divisible 256``, so the tokens are the ones predicted). Prints
predicted and measured seconds side by side, then per group and over all of them the
Spearman rank correlation of the two orderings and the median and worst relative errors, raw
and after one scale per group (this machine's speed drifts by up to 1.7x over minutes).

Models: ``smollm2`` the main job's SmolLM2-135M; ``tiny`` a Llama of 8 layers of width 256
with SmolLM2's vocabulary (tied); ``tiny_moe`` that Llama upcycled to 4 experts, top 2
(the expert-parallel layouts). A benchmark, not a test: the numbers go in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CONFIG, ROOT, timed_recipe_run  # noqa: E402

SEQ_LEN = 256
FIXED_LENGTH = ["--dataset.seq_length", str(SEQ_LEN), "--dataloader.pad_seq_len_divisible", str(SEQ_LEN),
                "--step_scheduler.global_batch_size", "8", "--dataloader.batch_size", "8"]


def _tiny_models(folder: Path) -> dict[str, str]:
    """The two tiny models' folders, written into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from nemo_pp.assets import smollm2_dir
    from nemo_pp.assets.smollm2_moe import upcycle_llama_to_mixtral

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=1024)
    dense = AutoModelForCausalLM.from_config(config)
    paths = {"tiny": folder / "tiny", "tiny_moe": folder / "tiny_moe"}
    dense.save_pretrained(paths["tiny"])
    tokenizer.save_pretrained(paths["tiny"])
    upcycle_llama_to_mixtral(dense).save_pretrained(paths["tiny_moe"])
    tokenizer.save_pretrained(paths["tiny_moe"])
    return {k: str(v) for k, v in paths.items()}


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spaced from the first to the last."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _measurable(candidates) -> list:
    """One candidate per layout the measurement can tell apart: sequence parallelism off (its
    padding multiple would change the tokens; the step-time model times it alike)."""
    seen, out = set(), []
    for c in candidates:
        key = dataclasses.replace(c.layout, sequence_parallel=False, pad_seq_len_divisible=None)
        if key not in seen:
            seen.add(key)
            out.append(dataclasses.replace(c, layout=key))
    return out


def _stats(pairs: list[tuple[float, float]]) -> dict:
    from scipy.stats import spearmanr

    errors = [abs(p - m) / m for p, m in pairs]
    rho = spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic if len(pairs) > 2 else float("nan")
    # this machine's speed drifts by up to 1.7x over minutes (the same run measured 29 s and 49 s an hour
    # apart): the errors after one scale per group (the median measured / predicted) show the model's
    # relative predictions, the raw ones its absolute level at calibration time
    scale = statistics.median(m / p for p, m in pairs)
    scaled = [abs(scale * p - m) / m for p, m in pairs]
    return {"n": len(pairs), "spearman": float(rho), "median_error": statistics.median(errors),
            "worst_error": max(errors), "scale": scale, "median_error_scaled": statistics.median(scaled),
            "worst_error_scaled": max(scaled)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny", "tiny_moe"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--per-world", type=int, default=4, help="layouts measured per model and world size")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--json", default=None, help="write every row and the statistics here")
    args = parser.parse_args(argv)

    import torch

    from nemo_pp.config import parse_cli
    from nemo_pp.planning.devices import probe_device
    from nemo_pp.planning.search import plan_layouts

    torch.set_num_threads(1)  # torchrun gives every rank one thread (OMP_NUM_THREADS=1)
    rows, groups = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _tiny_models(Path(tmp)) if set(args.models) & {"tiny", "tiny_moe"} else {}
        for name in args.models:
            model = ["--model.pretrained_model_name_or_path", paths[name]] if name in paths else []
            device = probe_device("cpu")
            for world in args.worlds:
                path, overrides = parse_cli(["--config", str(ROOT / CONFIG), *FIXED_LENGTH, *model])
                device = dataclasses.replace(device, memory_bytes=probe_device("cpu", ranks_per_node=world).memory_bytes)
                result = plan_layouts(path, overrides, 1, world, device, top=1000)
                device = result.device  # calibrated on this model: the next world size reuses its pieces
                chosen = _spread(_measurable(result.candidates), args.per_world)
                print(f"\n{name}, world {world}: {result.summary()}", flush=True)
                for c in chosen:
                    extra = c.layout.overrides(8)
                    measured = timed_recipe_run(world, args.steps, *FIXED_LENGTH, *model, *extra, threads=1)["step_s"]
                    row = {"model": name, "world": world, "layout": c.layout.describe(),
                           "predicted_s": c.step.total_s, "measured_s": measured}
                    rows.append(row)
                    groups.setdefault((name, world), []).append((c.step.total_s, measured))
                    print(f"  {row['layout']:<70} predicted {c.step.total_s:8.3f} s  measured {measured:8.3f} s  "
                          f"({100 * (c.step.total_s - measured) / measured:+.0f} %)", flush=True)
    print(f"\n{'model':<10}{'world':>6}{'n':>4}{'spearman':>10}{'median err':>12}{'worst err':>11}{'scale':>7}"
          f"{'scaled median':>15}{'scaled worst':>14}")
    stats = {}
    for (name, world), pairs in [*groups.items(), (("all", ""), [(r["predicted_s"], r["measured_s"]) for r in rows])]:
        s = stats[f"{name}/{world}" if world else name] = _stats(pairs)
        print(f"{name:<10}{world:>6}{s['n']:>4}{s['spearman']:>10.2f}{100 * s['median_error']:>11.1f}%"
              f"{100 * s['worst_error']:>10.1f}%{s['scale']:>7.2f}{100 * s['median_error_scaled']:>14.1f}%"
              f"{100 * s['worst_error_scaled']:>13.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stats": stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
