"""Loss and throughput curves of a run, drawn from its metrics.jsonl with matplotlib.

    python scripts/plot_metrics.py outputs/smollm2_135m_squad_pp2/metrics.jsonl [-o curves.png]

Left: training loss per step and validation loss where it was measured. Right: training
tokens per second per step. Writes a PNG (default: beside the metrics file).
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
    fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (nats per label token)")
    ax_loss.legend()
    ax_tok.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    ax_tok.set_xlabel("optimizer step")
    ax_tok.set_ylabel("train tokens / s")
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
