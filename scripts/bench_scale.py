"""Per-rank memory and time to the first step: meta-device build vs loading the whole model.

    .venv/bin/python scripts/bench_scale.py [--layers 18] [--pp 2 4] [--dtype bfloat16]

Writes a synthetic Llama checkpoint of about 1B parameters (random weights, sharded
safetensors) into a temporary folder that is deleted afterwards, then for every pp size
launches torchrun twice: `eager` (every rank loads the whole model with
`from_pretrained`, then the pipeline keeps its stages, as nemo_pp did before the meta
build) and `meta` (`NeMoAutoModelForCausalLM.from_pretrained(load_weights=False)` + a
`SafetensorsCheckpoint`: each rank allocates and reads only its stages). Each rank
reports its peak resident memory after the build (`ru_maxrss`), its own stages' bytes and
the seconds from process start to the end of one pipelined training step. A benchmark,
not a test: the numbers go in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.time()
ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(ckpt: str, mode: str, out: str) -> None:
    """One rank: build the pipeline from ``ckpt`` in ``mode``, run one step, report."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.loss.masked_ce import MaskedCrossEntropy
    from nemo_pp.models import NeMoAutoModelForCausalLM
    from nemo_pp.models.loading import SafetensorsCheckpoint
    from nemo_pp.planning.dims import resolve_parallel_sizes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=20))
    world = dist.get_world_size()
    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=world))
    weights = None
    if mode == "meta":
        model = NeMoAutoModelForCausalLM.from_pretrained(ckpt, load_weights=False, torch_dtype="bfloat16")
        weights = SafetensorsCheckpoint(ckpt)
    else:
        model = NeMoAutoModelForCausalLM.from_pretrained(ckpt, torch_dtype="bfloat16")
    loss_fn = MaskedCrossEntropy()
    ap = AutoPipeline(world_mesh=mesh.world, pp_schedule="1f1b", pp_batch_size=world, pp_seq_len=32,
                      device=torch.device("cpu")).build(model, loss_fn=loss_fn, weights=weights)
    del model
    built_rss = _peak_rss_bytes()
    built_s = time.time() - START
    stage_bytes = sum(p.numel() * p.element_size() for part in ap.parts for p in part.parameters())
    ids = torch.randint(0, 32000, (world, 32), generator=torch.Generator().manual_seed(0))
    info = ap.info
    losses = [] if info.has_last_stage else None
    info.schedule.step(*((ids,) if info.has_first_stage else ()), target=ids if info.has_last_stage else None,
                       losses=losses)
    record = {"rank": dist.get_rank(), "mode": mode, "pp": world, "stage_bytes": stage_bytes,
              "peak_rss_after_build": built_rss, "build_s": built_s, "first_step_s": time.time() - START}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def make_checkpoint(folder: Path, layers: int) -> int:
    """A random Llama (hidden 2048, 16 heads, 4 kv heads, MLP 5632, vocab 32000) as bf16
    safetensors shards of at most 500 MB; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    return model.num_parameters()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (18: about 0.94B parameters)")
    parser.add_argument("--pp", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--modes", nargs="*", default=["eager", "meta"])
    args = parser.parse_args()
    gib = 1024**3
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp, "ckpt")
        n = make_checkpoint(ckpt, args.layers)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(f"synthetic Llama: {n / 1e9:.2f}B parameters, {size / gib:.2f} GiB of bf16 safetensors "
              f"in {len(list(ckpt.glob('*.safetensors')))} shards")
        print(f"{'mode':<6}{'pp':>3}{'max peak RSS GiB':>18}{'its stages GiB':>16}{'excess GiB':>12}"
              f"{'build s':>9}{'first step s':>14}")
        for pp in args.pp:
            for mode in args.modes:
                out = Path(tmp, f"{mode}{pp}")
                out.mkdir()
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={pp}", __file__,
                       "--worker", str(ckpt), mode, str(out)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{mode:<6}{pp:>3} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
                worst = max(ranks, key=lambda r: r["peak_rss_after_build"] - r["stage_bytes"])
                print(f"{mode:<6}{pp:>3}{worst['peak_rss_after_build'] / gib:>18.2f}{worst['stage_bytes'] / gib:>16.2f}"
                      f"{(worst['peak_rss_after_build'] - worst['stage_bytes']) / gib:>12.2f}"
                      f"{max(r['build_s'] for r in ranks):>9.1f}{max(r['first_step_s'] for r in ranks):>14.1f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        sys.exit(main())
