"""Metric sinks besides ``metrics.jsonl``: TensorBoard (torch's ``SummaryWriter``) and
Weights & Biases (the ``wandb`` library, offline unless told otherwise).

Only the main rank writes. Records are the recipe's ``metrics.jsonl`` records; each
becomes scalars under ``train/``, ``validation/`` and ``checkpoint/`` at its step:

    train/loss, train/grad_norm, train/lr, train/tokens_per_s, train/step_time_s,
    train/peak_memory_gib, validation/loss, checkpoint/blocking_s,
    evaluation/exact_match, evaluation/f1 (percent; the pretrained model's at step 0)

and for a mixture of experts ``train/aux_loss`` (the router's load-balancing loss) and, from
each ``expert_load`` record, ``experts/max_imbalance``, ``experts/mean_imbalance`` and
``experts/layer_<i>_imbalance``.

YAML (NeMo AutoModel's ``wandb`` keys)::

    tensorboard:
      log_dir: null        # null: <checkpoint_dir>/tensorboard
    wandb:
      project: nemo_pp
      entity: null
      name: null           # null: wandb picks one
      save_dir: null       # null: <checkpoint_dir>; the run is under <save_dir>/wandb/
      mode: offline        # online needs a network and a login; disabled turns it off
"""

from __future__ import annotations

from pathlib import Path

_TRAIN_KEYS = ("loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "tflops", "tflops_per_rank",
               "mfu")


def scalars_of(record: dict) -> dict[str, float]:
    """The scalars a metrics record becomes (``{"train/loss": 1.2, ...}``), or {}."""
    event = record.get("event")
    if event == "train":
        out = {f"train/{k}": float(record[k]) for k in _TRAIN_KEYS if record.get(k) is not None}
        if record.get("peak_memory_bytes") is not None:
            out["train/peak_memory_gib"] = record["peak_memory_bytes"] / 2**30
        return out
    if event == "validation" and record.get("val_loss") is not None:
        return {"validation/loss": float(record["val_loss"])}
    if event == "evaluation":
        return {"evaluation/exact_match": float(record["exact_match"]), "evaluation/f1": float(record["f1"])}
    if event == "checkpoint":
        return {"checkpoint/blocking_s": float(record["blocking_s"])}
    if event == "expert_load":
        out = {"experts/max_imbalance": float(record["max_imbalance"]),
               "experts/mean_imbalance": float(record["mean_imbalance"])}
        out.update({f"experts/layer_{row['layer']}_imbalance": float(row["imbalance"]) for row in record["layers"]})
        return out
    return {}


class TensorBoardLogger:
    """Scalars and the resolved config (as text) into TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str | Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)

    def log(self, record: dict) -> None:
        """Add the record's scalars (:func:`scalars_of`) at its ``step`` (needed when it has any)."""
        for name, value in scalars_of(record).items():
            self.writer.add_scalar(name, value, int(record["step"]))

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbLogger:
    """One W&B run: the resolved config, then scalars by step; ``finish`` at close.

    Raises:
        ImportError: ``wandb`` is not installed (``pip install wandb``).
    """

    def __init__(self, config: dict, project: str, save_dir: str | Path, entity: str | None = None,
                 name: str | None = None, mode: str = "offline"):
        import wandb

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, name=name, dir=str(save_dir), mode=mode, config=config,
                              reinit="finish_previous")

    def log(self, record: dict) -> None:
        """Log the record's scalars at its ``step``; a ``summary`` record's numbers go to the run summary."""
        scalars = scalars_of(record)
        if scalars:
            self.run.log(scalars, step=int(record["step"]))
        if record.get("event") == "summary":
            self.run.summary.update({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        """Finish the W&B run (``wandb.Run.finish``)."""
        self.run.finish()


class MetricLoggers:
    """Hands every record to each sink (``metrics.jsonl``, TensorBoard, W&B) and closes them."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def log(self, record: dict) -> None:
        """Pass ``record`` to every sink, in order."""
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Close every sink that has a ``close``."""
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()


def build_metric_loggers(cfg, out_dir: Path, config_yaml: str, is_main: bool, append: bool) -> MetricLoggers:
    """``metrics.jsonl`` in ``out_dir`` plus the ``tensorboard:`` and ``wandb:`` sections of
    ``cfg`` that are set (main rank only)."""
    from omegaconf import OmegaConf

    from nemo_pp.training.metrics import JSONLLogger

    sinks: list = [JSONLLogger(out_dir / "metrics.jsonl", enabled=is_main, append=append)]
    if is_main and cfg.get("tensorboard") is not None:
        sinks.append(TensorBoardLogger(cfg.tensorboard.log_dir or out_dir / "tensorboard", config_yaml))
    if is_main and cfg.get("wandb") is not None and cfg.wandb.mode != "disabled":
        w = cfg.wandb
        sinks.append(WandbLogger(OmegaConf.to_container(cfg, resolve=True), w.project, w.save_dir or out_dir,
                                 w.entity, w.name, w.mode))
    return MetricLoggers(sinks)


