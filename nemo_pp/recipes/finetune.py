"""Supervised fine-tuning of a Hugging Face causal LM through a pipeline (one stage when pp_size is 1).

    torchrun --nproc_per_node=2 recipes/finetune.py --config configs/smollm2_135m_squad_pp2.yaml \
        [--distributed.pipeline.pp_schedule gpipe] [--step_scheduler.max_steps 5] ...

Read top to bottom: ``setup()`` checks the whole config and plans the run (on every
rank, before any weight is loaded; the checkpoint to resume from included), then builds
mesh, model, pipeline, data and optimizer and loads that checkpoint; ``run()`` trains
with gradient accumulation, validates before and after, logs each step, writes a
checkpoint every ``step_scheduler.ckpt_every_steps`` steps, at the end and on SIGTERM, and
exports a consolidated Hugging Face folder (a LoRA run: its PEFT adapter folder, and the
merged model with ``checkpoint.save_merged_model``). ``max_steps: 0`` builds, validates and
exports without training. Running the same command again resumes from the latest
complete checkpoint (``checkpoint.enabled: true``, ``checkpoint.restore_from: null``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import transformers
from tqdm import tqdm

from nemo_pp.checkpoint.checkpointer import Checkpointer, CheckpointWriteError
from nemo_pp.checkpoint.finite import NonFiniteWeightsError, check_finite_weights
from nemo_pp.checkpoint.hf_export import save_consolidated_hf
from nemo_pp.checkpoint.peft_export import save_peft_adapter
from nemo_pp.config import ConfigError, config_to_yaml, instantiate, parse_cli, write_text_atomic
from nemo_pp.datasets.packed_sequence import PackedSequenceDataset
from nemo_pp.datasets.utils import SFTCollator
from nemo_pp.distributed.context_parallel import ContextParallel
from nemo_pp.distributed.init import destroy_distributed, gather_ints, initialize_distributed, set_seed
from nemo_pp.distributed.mesh import build_device_mesh
from nemo_pp.distributed.parallelize import build_parallelize_fn
from nemo_pp.distributed.pipelining import AutoPipeline
from nemo_pp.errors import NonFiniteStepError, first_error_of_all_ranks
from nemo_pp.models.module_tree import is_tied, tied_param_fqns
from nemo_pp.planning.cost import layers_per_stage
from nemo_pp.planning.fit import preflight_fit_warning
from nemo_pp.planning.run_plan import RunPlan, plan_run, profile_pipeline_costs, replan, replan_for_fused_loss
from nemo_pp.planning.schema import load_recipe_config
from nemo_pp.training.data import (
    agreed_stream_position,
    build_dataloader,
    build_dataset_main_first,
    build_stream_loader,
    data_tools,
    is_stream_loader,
    label_token_share,
    restore_stream,
    stream_checkpoint_state,
    stream_step_groups,
)
from nemo_pp.training.engine import TrainEngine
from nemo_pp.training.evaluation import EvaluationError, GenerationEvaluator
from nemo_pp.training.flops import FlopsMeter
from nemo_pp.training.loggers import build_metric_loggers
from nemo_pp.training.lr_scheduler import build_lr_scheduler
from nemo_pp.training.metrics import ExpertLoadLog, format_step, peak_memory_bytes
from nemo_pp.training.preemption import PreemptionWatcher, clear_preempted_marker, write_preempted_marker
from nemo_pp.training.skips import SkipCounter

logger = logging.getLogger("nemo_pp.finetune")


@dataclass
class TrainingPosition:
    """Where training stands: optimizer steps done, the epoch, and the samples of that
    epoch the whole data-parallel group has consumed (what a checkpoint records)."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0


class FinetuneRecipe:
    """The fine-tuning recipe: ``FinetuneRecipe(cfg).setup(); .run()``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._expert_load = None  # a mixture of experts' ExpertLoadLog, made at its first step
        self.profiled_costs = None  # split: profile's piece times

    # ------------------------------------------------------------------ setup
    def setup(self) -> "FinetuneRecipe":
        """Plan, then build everything the run needs, in order; returns ``self``.

        Raises:
            ValueError / FileNotFoundError / ConfigError: a config the plan refuses (every
                rank alike, before any weight is read), data that cannot be read.
        """
        self._plan_and_start()
        self._setup_data()
        self._balance_for_fused_loss()
        self._setup_model()
        self._setup_optimizers()
        self._setup_engine()
        self._resume()
        self.metrics = build_metric_loggers(self.cfg, self.out_dir, self.config_yaml, self.is_main,
                                            append=self.plan.resume_from is not None)
        return self

    def _plan_and_start(self) -> None:
        """Plan on every rank (no process group, no weight read), then start the process
        group, mesh and seed; ``split: profile`` re-plans the split from piece times measured
        on rank 0. Saves and prints the resolved config and the plan."""
        cfg = self.cfg
        self.plan: RunPlan = plan_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        self.dist = initialize_distributed(cfg.dist_env.device, timeout_s=60 * cfg.dist_env.timeout_minutes)
        self.mesh = build_device_mesh(self.dist.device.type, self.plan.sizes)
        set_seed(cfg.seed)
        self.is_main = self.dist.is_main
        if cfg.distributed.pipeline.split == "profile" and self.plan.sizes.pp > 1:
            costs = self.profiled_costs = profile_pipeline_costs(cfg, self.plan, self.dist.device, self.is_main)
            self.plan = replan(self.plan, costs)
            if self.is_main:
                print(f"split: profile: fwd+bwd per microbatch: embedding {costs.embedding:.3f} s, layer "
                      f"{costs.layers[0]:.3f} s, head + loss {costs.head:.3f} s", flush=True)
        # before any weight is read: will this layout fit? (every rank weighs it; the main one says so)
        warning = preflight_fit_warning(self.plan, cfg, self.dist.device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if warning and self.is_main:
            logger.warning(warning)
        self.out_dir = Path(cfg.checkpoint.checkpoint_dir)
        self.config_yaml = config_to_yaml(cfg)  # resolved once: saved here and into every checkpoint
        error = None
        if self.is_main:
            try:
                write_text_atomic(self.out_dir / "config.yaml", self.config_yaml)
            except OSError as exc:  # a full or read-only disk: every rank must stop, not only this one
                error = f"checkpoint.checkpoint_dir={self.out_dir}: cannot write config.yaml there ({exc})"
        if (error := first_error_of_all_ranks(error)) is not None:
            raise OSError(error)
        if self.is_main:
            print(f"Resolved config (saved to {self.out_dir / 'config.yaml'}):\n{self.config_yaml}", flush=True)
            print(self.plan.describe(), flush=True)

    def _setup_data(self) -> None:
        """Tokenizer, training and validation loaders: each dp rank its own shard, the pp,
        cp and tp ranks of one dp rank the same batches."""
        cfg = self.cfg
        if not self.is_main:
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        # under cp the plan raises the padding multiple so every sequence splits into 2*cp chunks;
        # a vision-language model's processor renders its rows and its collator keeps images batch-major
        self.tokenizer, self.processor, collate = data_tools(self.plan.model_path, self.plan.meta_model.config,
                                                             self.plan.pad_seq_len_divisible)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        train_ds = build_dataset_main_first(cfg.dataset, "dataset", self.tokenizer, self.is_main, self.processor)
        # what a loss on label tokens only costs (the split is re-balanced for it)
        self.label_share = label_token_share(train_ds) if self.plan.head_computes_loss else None
        train_collate = collate
        pack = cfg.packed_sequence.packed_sequence_size
        stream = getattr(train_ds, "stream", None)  # dataset.streaming: rows read, tokenized and packed as consumed
        if pack:  # rows of several samples, padded to one length (validation stays unpacked)
            train_collate = SFTCollator(pad_token_id=pad_id, pad_seq_len_divisible=pack)
        if pack and stream is None:
            samples = len(train_ds)
            train_ds = PackedSequenceDataset(train_ds, pack, cfg.packed_sequence.split_across_pack)
            if self.is_main:
                print(f"packed_sequence: {samples} samples in {len(train_ds)} rows of {pack} tokens", flush=True)
        if stream is not None:
            self.train_loader = build_stream_loader(stream, self.plan.local_batch_size, self.mesh.sizes.dp,
                                                    self.mesh.dp_rank, train_collate, pack)
        else:
            self.train_loader = build_dataloader(
                train_ds, self.plan.local_batch_size, self.mesh.sizes.dp, self.mesh.dp_rank,
                shuffle=cfg.dataloader.shuffle, seed=cfg.seed, collate_fn=train_collate,
                num_workers=cfg.dataloader.num_workers,
            )
        self.val_loader = None
        if cfg.get("validation_dataset") is not None:
            val_ds = build_dataset_main_first(cfg.validation_dataset, "validation_dataset", self.tokenizer, self.is_main,
                                              self.processor)
            self.val_loader = build_dataloader(
                val_ds, self.plan.local_batch_size, self.mesh.sizes.dp, self.mesh.dp_rank,
                shuffle=False, seed=cfg.seed, collate_fn=collate, num_workers=0,
            )
        self.evaluator = None  # the evaluation section's scorer (checked against the data before any weight is read)
        if cfg.get("evaluation") is not None:
            self.evaluator = GenerationEvaluator(cfg.evaluation, val_ds, self.tokenizer, self.dist.device,
                                                 self.dist.rank, self.dist.world_size)

    def _balance_for_fused_loss(self) -> None:
        """Under a loss computing label tokens only (``FusedLinearCrossEntropy``) the head costs
        a share of what the plan weighed: the automatic split (``balanced`` or ``profile``) is
        planned again at the training data's label-token share (every rank alike: the same data)."""
        if not self.plan.head_computes_loss:
            return
        plan = replan_for_fused_loss(self.plan, self.label_share, self.profiled_costs)
        if plan is not None:
            self.plan = plan
            if self.is_main:
                print(f"split: {self.cfg.distributed.pipeline.split} for the fused loss at {100 * self.label_share:.1f} % "
                      f"label tokens: layers per stage {layers_per_stage(plan.pipeline)}", flush=True)

    def _setup_model(self) -> None:
        """This rank's stages from the plan: the plan's meta model (built once, in planning)
        split, materialised and loaded from the checkpoint's tensors, then parallelized by the
        plan's chain (LoRA, TP, CP, activation checkpointing, FSDP2); another loader's model
        is built whole here and split the same way."""
        cfg = self.cfg
        plan = self.plan
        if plan.meta_build:
            model, weights = plan.meta_model, plan.weights
        else:
            model, weights = instantiate(cfg.model), None
            if plan.pipeline_dtype is not None:
                model = model.to(plan.pipeline_dtype)
        self.model_config = model.config
        self.tied = is_tied(model)  # exported once, as the embedding
        self.tied_fqns = tied_param_fqns(model) if self.tied else None  # (embedding, head)
        # the one ContextParallel of the run: the stages' attention and the engine's batch slicing
        self.cp = ContextParallel(self.mesh, plan.cp_attention) if plan.sizes.cp > 1 else None
        self.ap = AutoPipeline.from_plan(
            plan, self.mesh, model=model, device=self.dist.device, loss_fn=instantiate(cfg.loss_fn),
            parallelize_fn=build_parallelize_fn(plan, self.mesh, self.cp), weights=weights,
            # the reference's moe_mesh and axis names, for a user's parallelize_fn (None without ep)
            moe_mesh=self.mesh.moe, ep_axis_name="ep" if self.mesh.moe is not None else None,
            ep_shard_axis_names=self.mesh.ep_shard_axis_names,
        )
        self.parts = self.ap.parts
        mp = plan.mp_policy
        dtype = mp.param_dtype if mp is not None and mp.param_dtype is not None else next(model.parameters()).dtype
        self.flops = FlopsMeter.for_model(model, self.dist.device, dtype, self.plan.sizes.world_size,
                                          cfg.logging.peak_tflops)
        if self.is_main:
            print(self.flops.describe(), flush=True)
        if self.is_main:
            print(self.ap.debug_summary(), flush=True)
        if plan.peft is not None and self.is_main:
            n, total = plan.lora_params
            print(f"LoRA: {n:,} trainable parameters of {total:,} ({100 * n / total:.2f} %; rank {plan.peft.dim}, "
                  f"alpha {plan.peft.alpha})", flush=True)

    def _setup_optimizers(self) -> None:
        """One optimizer and one LR scheduler per model part, over what trains (LoRA: the
        adapters); a part with nothing to train gets an empty group, so checkpoints stay uniform."""
        cfg = self.cfg
        self.optimizers = [
            instantiate(cfg.optimizer, params=[{"params": [p for p in part.parameters() if p.requires_grad]}])
            for part in self.parts
        ]
        self.total_steps = self.plan.total_steps(None if is_stream_loader(self.train_loader) else len(self.train_loader))
        self.lr_schedulers = [
            build_lr_scheduler(opt, self.total_steps, **dict(cfg.lr_scheduler)) for opt in self.optimizers
        ]

    def _setup_engine(self) -> None:
        """The step engine and the checkpointer."""
        self.engine = TrainEngine(
            self.ap, self.dist.device, dp_group=self.mesh.dp.get_group() if self.mesh.sizes.dp > 1 else None,
            max_grad_norm=self.cfg.clip_grad_norm.max_norm, cp=self.cp,
        )
        self.checkpointer = self._build_checkpointer()

    def _resume(self) -> None:
        """Load the plan's checkpoint (if any) and set where training starts."""
        self.start = TrainingPosition()
        if self.cfg.checkpoint.enabled:
            self.checkpointer.remove_incomplete()  # a crashed or failed save's folder frees its space now
        if self.plan.resume_from is None:
            return
        start = time.perf_counter()
        state = self.checkpointer.load(self.plan.resume_from)
        self.start = TrainingPosition(int(state["step"]), int(state["epoch"]), int(state.get("samples_in_epoch", 0)))
        restore_stream(self.train_loader, state)  # a streamed data set's position (a sampler's: _step_batches sets it)
        if self.is_main:
            left = "" if self.start.step < self.total_steps else "; nothing left to train (a new run needs another checkpoint.checkpoint_dir)"
            print(f"resumed from {self.plan.resume_from} (written at layout {state.get('layout')}): step "
                  f"{self.start.step} of {self.total_steps}, epoch {self.start.epoch} "
                  f"[{time.perf_counter() - start:.1f} s]{left}", flush=True)

    def _build_checkpointer(self):
        ck = self.cfg.checkpoint
        pipe = self.plan.pipeline
        return Checkpointer(
            ck.checkpoint_dir, self.parts, self.optimizers, self.lr_schedulers,
            model_save_format=ck.model_save_format, is_async=ck.is_async,
            max_recent_checkpoints=ck.max_recent_checkpoints, tied=self.tied_fqns,
            export_consolidated=self._export if ck.save_consolidated == "every" else None,
            layout_info={**dataclasses.asdict(self.plan.sizes), "pp_schedule": pipe.schedule,
                         "num_stages": pipe.num_stages},
            trainable_only=self.plan.peft is not None,
            timeout_s=60 * self.cfg.dist_env.timeout_minutes,
        )

    def _export(self, folder: Path) -> Path:
        """The consolidated Hugging Face folder of the current weights (collective); a
        LoRA run's PEFT adapter folder instead."""
        if self.plan.peft is not None:
            return save_peft_adapter(folder, self.parts, self.plan.peft, self.plan.model_path,
                                     is_writer=self.mesh.writes_stage_files)
        return self._export_merged(folder)

    def _export_merged(self, folder: Path) -> Path:
        """A Hugging Face model folder (LoRA adapters merged into their weights; collective)."""
        tied = self.tied and not self.plan.lora_adapts_head  # an adapted head no longer equals the embedding
        return save_consolidated_hf(
            folder, self.parts, self.model_config, self.processor or self.tokenizer, tied=tied,
            tied_head_fqn=self.tied_fqns[1] if tied else None,
            pp_rank=self.mesh.pp_rank, pp_size=self.plan.sizes.pp, is_writer=self.mesh.writes_stage_files,
        )

    # -------------------------------------------------------------------- run
    def _validate(self, step: int, tag: str) -> float | None:
        if self.val_loader is None:
            return None
        start = time.perf_counter()
        loss = self.engine.validation_loss(self.val_loader)
        seconds = time.perf_counter() - start
        self.metrics.log({"event": "validation", "tag": tag, "step": step, "val_loss": loss, "seconds": seconds})
        if self.is_main:
            tqdm.write(f"validation ({tag}, step {step}): loss {loss:.4f} [{seconds:.1f} s]")
        return loss

    def _evaluate(self, step: int, tag: str, folder, adapter=None) -> dict | None:
        """The ``evaluation`` scores of the model in ``folder``: logged like the validation
        loss, returned (None without an evaluation section). Collective."""
        if self.evaluator is None:
            return None
        result = self.evaluator.score(folder, adapter, dtype=next(self.parts[0].parameters()).dtype)  # as it trains
        examples = result.pop("examples")
        self.metrics.log({"event": "evaluation", "tag": tag, "step": step, "model": str(folder), **result})
        if self.is_main:
            tqdm.write(f"evaluation ({tag}, step {step}): exact match {result['exact_match']:.1f} %, F1 "
                       f"{result['f1']:.1f} % on {result['samples']} prompts [{result['seconds']:.1f} s]")
            for prediction, references in examples:
                tqdm.write(f"  generated {prediction!r}; reference {references[0]!r}")
        return result

    def _step_batches(self):
        """Yield ``(batches, position)`` per optimizer step from where the run starts:
        ``grad_acc_steps`` batches, and the :class:`TrainingPosition` after them."""
        acc = self.plan.grad_acc_steps
        first = self.start
        step = first.step
        if is_stream_loader(self.train_loader):  # endless: its passes and position are the stream's own
            for group, position in stream_step_groups(self.train_loader, acc, step, self.total_steps):
                yield group, TrainingPosition(*position)
            return
        for epoch in range(first.epoch, self.plan.num_epochs):
            if step >= self.total_steps:
                return
            in_epoch = first.samples_in_epoch if epoch == first.epoch else 0
            self.train_loader.sampler.set_epoch(epoch, in_epoch)
            group = []
            for batch in self.train_loader:
                group.append(batch)
                if len(group) == acc:
                    in_epoch += self.plan.samples_per_step
                    step += 1
                    yield group, TrainingPosition(step, epoch, in_epoch)
                    group = []
                    if step >= self.total_steps:
                        return

    def _save_checkpoint(self, position: TrainingPosition) -> None:
        step = position.step
        start = time.perf_counter()
        stream_state = stream_checkpoint_state(self.train_loader)  # collective
        if (agreed := agreed_stream_position(stream_state)) is not None:  # one folder name on every rank
            position = dataclasses.replace(position, epoch=agreed[0], samples_in_epoch=agreed[1])
        trainer_state = {**dataclasses.asdict(position), **stream_state}
        path = self.checkpointer.save(position.epoch, step, trainer_state, self.config_yaml)
        seconds = time.perf_counter() - start
        self.metrics.log({"event": "checkpoint", "step": step, "path": str(path), "blocking_s": seconds,
                          "async": self.cfg.checkpoint.is_async})
        if self.is_main:
            how = "written in the background" if self.cfg.checkpoint.is_async else "saved"
            tqdm.write(f"checkpoint {how}: {path} [{seconds:.1f} s blocking]")

    def _log_step(self, step: int, out: dict, bar, batches) -> dict:
        """The step's metrics record (with its model TFLOP/s and MFU): to the sinks, the progress
        bar and (every ``log_every_steps``) the console; returns it."""
        record = {
            "event": "train", "step": step, "total_steps": self.total_steps, "loss": out["loss"],
            "grad_norm": out["grad_norm"], "lr": self.lr_schedulers[0].get_last_lr()[0],
            "tokens": out["tokens"], "num_label_tokens": out["num_label_tokens"],
            "tokens_per_s": out["tokens"] / out["step_time_s"], "step_time_s": out["step_time_s"],
            "nonpad_tokens_per_s": out["nonpad_tokens"] / out["step_time_s"],
            "peak_memory_bytes": peak_memory_bytes(self.dist.device),
            "skipped": out["skipped"], **self.flops.step_metrics(batches, out["tokens"], out["step_time_s"]),
        }
        if out.get("aux_loss") is not None:
            record["aux_loss"] = out["aux_loss"]
        if out["skipped"]:
            record["nonfinite"] = out["nonfinite"]
        self.metrics.log(record)
        if self.is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % self.cfg.logging.log_every_steps == 0 or step == self.total_steps:
                tqdm.write(format_step(record))
        if out.get("expert_tokens") is not None:
            self._log_expert_load(step, out["expert_tokens"])
        return record

    def _log_expert_load(self, step: int, tokens) -> None:
        """Every ``logging.expert_load_every_steps`` (and at the last step) an ``expert_load`` record."""
        if self._expert_load is None:
            self._expert_load = ExpertLoadLog(self.ap.router_loss.moe_layers, self.cfg.logging.expert_load_every_steps)
        record = self._expert_load.add(step, tokens, last=step == self.total_steps)
        if record is not None:
            self.metrics.log(record)
            if self.is_main:
                tqdm.write(self._expert_load.describe(record))

    def _peak_memory_by_rank(self) -> list[int]:
        """Every rank's peak memory (bytes): the last stage's differs from the first's."""
        return gather_ints(peak_memory_bytes(self.dist.device), self.dist.device)

    def _export_final(self) -> Path | None:
        """The end-of-run export (``checkpoint.save_consolidated``): the Hugging Face folder,
        a LoRA run's adapter folder (and the merged model with ``save_merged_model``); None
        when exporting is off. Collective."""
        ck = self.cfg.checkpoint
        if ck.save_consolidated not in ("final", "every"):
            return None
        check_finite_weights(self.parts, "Hugging Face export", self.dist.rank)
        export_dir = self._export(self.out_dir / ("hf_adapter" if self.plan.peft is not None else "hf_model"))
        if self.plan.peft is not None and ck.save_merged_model:
            merged = self._export_merged(self.out_dir / "hf_model")
            if self.is_main:
                print(f"merged model (adapters folded into the weights): {merged}", flush=True)
        return export_dir

    @contextlib.contextmanager
    def _ending_cleanly(self, skips: "SkipCounter"):
        """However training ends: an async save in flight is finished; a stop by the
        finite-step guard is recorded in the metric sinks (and then re-raised)."""
        try:
            yield
        except NonFiniteStepError:
            self.metrics.log({"event": "summary", "steps": skips.last_step, "stopped": "non-finite steps",
                              "skipped_steps": skips.total})
            self.metrics.close()
            raise
        finally:
            self.checkpointer.close()

    def run(self) -> dict:
        """Train from the plan's start to ``total_steps``: validation before and after,
        metrics per step, checkpoints every ``ckpt_every_steps``, at the end and on SIGTERM
        (then exit without exporting, leaving ``checkpoint_dir/preempted.json``, which a finished
        run removes: :mod:`nemo_pp.training.preemption`), the Hugging Face export at the end.

        Returns:
            the summary record (also written to the metric sinks).
        """
        cfg = self.cfg
        ck_on = cfg.checkpoint.enabled
        ck_every = cfg.step_scheduler.get("ckpt_every_steps")
        wall_start = time.perf_counter()
        step = self.start.step
        position = self.start
        # the watcher from the first validation on: a signal there stops the run at the first step boundary
        with PreemptionWatcher(self.dist.device, enabled=ck_on) as watcher:
            val_before = self._validate(step, "before training")
            eval_before = None
            if self.evaluator is not None and cfg.evaluation.before_training:
                if self.start.step == 0:
                    eval_before = self._evaluate(0, "pretrained", self.plan.model_path)
                elif self.is_main:  # a resumed run: the first start scored it (metrics.jsonl)
                    tqdm.write("evaluation (pretrained): scored when this run first started (metrics.jsonl)")
            bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", disable=not self.is_main,
                       dynamic_ncols=True)
            train_tokens, train_seconds, train_flops, record, saved_at, preempted = 0, 0.0, 0.0, {}, None, False
            val_every = cfg.step_scheduler.get("val_every_steps")
            skips = SkipCounter(cfg.step_scheduler.max_consecutive_skipped_steps, self.is_main)
            with self._ending_cleanly(skips):
                for batches, position in self._step_batches():
                    out = self.engine.train_step(batches, self.optimizers, self.lr_schedulers)
                    step = position.step
                    train_tokens += out["tokens"]  # summed over dp ranks; pp ranks of a group share them
                    train_seconds += out["step_time_s"]
                    record = self._log_step(step, out, bar, batches)
                    train_flops += record["model_flops"]
                    skips.update(step, out)  # raises after too many in a row (every rank alike)
                    self.checkpointer.poll()
                    preempted = watcher.requested()
                    if ck_on and (preempted or (ck_every and step % ck_every == 0)):
                        self._save_checkpoint(position)
                        saved_at = step
                    if preempted:
                        break
                    if val_every and step % val_every == 0 and step < self.total_steps:
                        self._validate(step, "periodic")
                bar.close()
                if ck_on and not preempted and saved_at != step and step > self.start.step:
                    self._save_checkpoint(position)  # the end of training is always resumable
            # a signal during the last step or its save: the checkpoint of `step` is written; the
            # requeued run resumes there and exports (a signal during the export itself is not caught)
            preempted = preempted or watcher.requested()
        if preempted:
            if self.is_main:
                print(f"stopped by signal after step {step}; checkpoint {self.cfg.checkpoint.checkpoint_dir}: run the "
                      "same command to resume", flush=True)
            summary = {"event": "summary", "steps": step, "preempted": True, "final_train_loss": record.get("loss")}
            self.metrics.log(summary)
            self.metrics.close()
            if self.is_main:  # last: the batch script requeues on it (the checkpoint and metrics are written)
                write_preempted_marker(self.out_dir, step)
            return summary
        val_after = self._validate(step, "after training") if step > self.start.step else val_before
        export_dir = self._export_final()
        eval_after = eval_before if step == 0 else None  # never trained: the pretrained weights
        if self.evaluator is not None and eval_after is None:
            lora = self.plan.peft is not None
            eval_after = self._evaluate(step, "after training", self.plan.model_path if lora else export_dir,
                                        export_dir if lora else None)
        summary = {
            "event": "summary", "steps": step, "wall_time_s": time.perf_counter() - wall_start,
            "train_tokens": train_tokens, "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
            **self.flops.run_metrics(train_flops, train_seconds),
            "val_loss_before": val_before, "val_loss_after": val_after,
            "final_train_loss": record.get("loss"), "export_dir": str(export_dir) if export_dir else None,
            **_scores(eval_before, "before"), **_scores(eval_after, "after"),
            "skipped_steps": skips.total, "peak_memory_bytes_by_rank": self._peak_memory_by_rank(),
        }
        self.metrics.log(summary)
        self.metrics.close()
        if self.is_main:
            clear_preempted_marker(self.out_dir)  # finished: an earlier run's marker must not requeue anything
            print(
                f"done: {step} steps in {summary['wall_time_s']:.0f} s, {summary['train_tokens_per_s']:.0f} train tok/s"
                f"{self.flops.describe_run(summary)}; "
                f"val loss {_fmt(val_before)} -> {_fmt(val_after)}{_describe_scores(eval_before, eval_after)}; "
                f"exported to {export_dir}",
                flush=True,
            )
        return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _scores(result: dict | None, when: str) -> dict:
    """The summary's ``exact_match_<when>`` and ``f1_<when>`` (percent), none without a result."""
    return {} if result is None else {f"exact_match_{when}": result["exact_match"], f"f1_{when}": result["f1"]}


def _describe_scores(before: dict | None, after: dict | None) -> str:
    if after is None:
        return ""
    em = f"{before['exact_match']:.1f} -> " if before else ""
    f1 = f"{before['f1']:.1f} -> " if before else ""
    return f"; exact match {em}{after['exact_match']:.1f} %, F1 {f1}{after['f1']:.1f} %"


def main(argv: list[str] | None = None) -> int:
    """The command line: ``recipes/finetune.py --config X.yaml [overrides]``.

    Returns:
        0 after training; 2 for a config or input the plan refuses; 3 when training stops
        on non-finite steps or weights, a checkpoint cannot be written, or the evaluation
        fails on some rank (each printed on every rank).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", 0))
    try:
        path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
        cfg = load_recipe_config(path, overrides)
        recipe = FinetuneRecipe(cfg).setup()
    except (ConfigError, ValueError, OSError, NotImplementedError) as exc:  # OSError: FileNotFoundError, hub errors
        # identical on every rank (nothing above depends on the rank): exit, never hang.
        # Every rank prints: torchrun kills the others as soon as the first one exits.
        print(f"[rank {rank}] error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        recipe.run()
    except (NonFiniteStepError, NonFiniteWeightsError, CheckpointWriteError, EvaluationError) as exc:
        # decided alike on every rank (all-reduced loss and norm, agreed write errors)
        print(f"[rank {rank}] error: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
