"""Loss and throughput curves of a run, drawn from its metrics.jsonl with matplotlib.

    python scripts/plot_metrics.py outputs/smollm2_135m_squad_pp2/metrics.jsonl [-o curves.png]

Left: training loss per step and validation loss where it was measured. Right: training
tokens per second per step. A mixture of experts adds a third panel: the router's
load-balancing loss per step and, from the ``expert_load`` records, the worst layer's and the
mean layer's imbalance (busiest expert's tokens / mean; 1.0 is balanced). Writes a PNG
(default: beside the metrics file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(records: list[dict], out: Path) -> Path:
    """Draw ``records`` (metrics.jsonl lines) into the PNG ``out``.

    Raises:
        ValueError: no training step is recorded.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "validation" and r.get("val_loss") is not None]
    if not train:
        raise ValueError("no training steps in the metrics: nothing to plot")
    loads = [r for r in records if r.get("event") == "expert_load"]
    moe = bool(loads) or any(r.get("aux_loss") is not None for r in train)
    fig, axes = plt.subplots(1, 3 if moe else 2, figsize=(16.5 if moe else 11, 4))
    ax_loss, ax_tok = axes[0], axes[1]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (nats per label token)")
    ax_loss.legend()
    ax_tok.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    ax_tok.set_xlabel("optimizer step")
    ax_tok.set_ylabel("train tokens / s")
    if moe:
        ax_moe = axes[2]
        aux = [r for r in train if r.get("aux_loss") is not None]
        if aux:
            ax_moe.plot([r["step"] for r in aux], [r["aux_loss"] for r in aux], color="tab:purple",
                        label="load-balancing loss")
        if loads:
            ax_moe.plot([r["step"] for r in loads], [r["max_imbalance"] for r in loads], "o-", color="tab:red",
                        label="imbalance, worst layer")
            ax_moe.plot([r["step"] for r in loads], [r["mean_imbalance"] for r in loads], "o-", color="tab:orange",
                        label="imbalance, mean over layers")
        ax_moe.set_xlabel("optimizer step")
        ax_moe.set_ylabel("experts")
        ax_moe.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: metrics.png beside the input)")
    args = parser.parse_args(argv)
    out = plot(read_records(args.metrics), args.output or args.metrics.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
