"""Helpers that several test modules use: batches and the unsplit model's reference
loss and gradients, the pipeline-parity rank function, the reference training loop,
DTensor-aware comparisons, the decoder-family matrix and the recipe run on forked ranks.

Rank functions here (``run_parity``, ``run_recipe_rank``) reach the ranks by pickle, as
``tests.helpers.<name>``; the forkserver preloads this module (``tests/distributed/launcher.py``).
Test modules import from here, never from each other.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.distributed.launcher import run_ranks
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
MAX_NORM = 0.5  # small enough that clipping is active
LR = 1e-3  # Adam turns grad noise of ~1e-8 into update noise of ~lr on near-zero grads


# ---------------------------------------------------------------------------------------------
# batches, loss, one schedule step, the unsplit model's reference


def sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels[torch.rand(batch_size, seq_len, generator=g) < 0.3] = -100
    return input_ids, labels


def step_once(info, ids, labels) -> list | None:
    """One ``schedule.step`` as every rank calls it; the losses on the last stage."""
    losses = [] if info.has_last_stage else None
    info.schedule.step(*((ids,) if info.has_first_stage else ()),
                       target=labels if info.has_last_stage else None, losses=losses)
    return losses


def reference(model, batches):
    """Loss (sum / tokens) and grads of the unsplit model, accumulated over ``batches``."""
    tokens = sum(int((lb != -100).sum()) for _, lb in batches)
    total = 0.0
    for ids, lb in batches:
        loss = sum_ce(model(input_ids=ids).logits, lb)
        (loss / tokens).backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return total / tokens, grads, tokens


# ---------------------------------------------------------------------------------------------
# pipeline parity: one schedule step of AutoPipeline against the unsplit model


@dataclass(frozen=True)
class ParityCase:
    """A tiny model and the batches :func:`run_parity` pipelines."""

    arch: str
    tied: bool
    schedule: str
    layers: int
    batch: int
    seq_lens: tuple  # one batch per length, grads accumulated over them
    layers_per_stage: int | None = None


def run_parity(rank, world, case: ParityCase, pp=None, ap_kwargs=None):
    """Rank function: loss, every gradient and the forward count of the pipelined model
    equal the unsplit model's; returns the number of parameters checked."""
    from nemo_pp.distributed.mesh import build_device_mesh
    from nemo_pp.distributed.pipelining import AutoPipeline
    from nemo_pp.planning.dims import resolve_parallel_sizes

    mesh = build_device_mesh("cpu", resolve_parallel_sizes(world, pp_size=pp or world))
    ref_model = tiny_model(case.arch, case.tied, case.layers)
    model = copy.deepcopy(ref_model)
    vocab = ref_model.config.vocab_size
    batches = [make_batch(case.batch, s, vocab, seed=i) for i, s in enumerate(case.seq_lens)]
    ref_loss, ref_grads, tokens = reference(ref_model, batches)

    ap = AutoPipeline(
        world_mesh=mesh.world, pp_schedule=case.schedule, pp_microbatch_size=1, pp_batch_size=case.batch,
        layers_per_stage=case.layers_per_stage, device=torch.device("cpu"), **(ap_kwargs or {}),
    ).build(model, loss_fn=sum_ce)
    info = ap.info
    forwards = [0]
    for part in ap.parts:
        part.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    total = 0.0
    for ids, lb in batches:
        ap.update_seq_len(ids.shape[1])
        losses = step_once(info, ids, lb)
        if losses is not None:
            total += float(sum(l.detach() for l in losses))
    ap.scale_grads_by_divisor(tokens)
    ap.sync_tied_grads()

    checked = 0
    for part in ap.parts:
        for name, p in part.named_parameters():
            assert p.grad is not None, f"{name} has no grad"
            torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            checked += 1
    if info.has_last_stage:
        assert abs(total / tokens - ref_loss) < ATOL, (total / tokens, ref_loss)
    expected_forwards = len(ap.parts) * len(batches) * case.batch  # one per microbatch, no probe forward
    assert forwards[0] == expected_forwards, (forwards[0], expected_forwards)
    return checked


# ---------------------------------------------------------------------------------------------
# training against the unsplit model: global batches and the reference AdamW loop


def training_batches(n_steps, acc, dp, batch_size, seq_lens, vocab):
    """[step][dp_rank][acc] batches of dicts."""
    out, seed = [], 0
    for step in range(n_steps):
        per_dp = []
        for _ in range(dp):
            group = []
            for a in range(acc):
                ids, lb = make_batch(batch_size, seq_lens[(step + a) % len(seq_lens)], vocab, seed)
                seed += 1
                group.append({"input_ids": ids, "labels": lb})
            per_dp.append(group)
        out.append(per_dp)
    return out


def reference_training(model, steps, lr: float = LR) -> list[dict]:
    """The unsplit model trained with AdamW on each step's global batch (all dp ranks,
    all accumulated batches): per step the token-mean ``loss``, the global grad ``norm``
    before clipping and the clipped ``grads`` by FQN (of the parameters that train)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    out = []
    for per_dp in steps:
        flat = [b for group in per_dp for b in group]
        tokens = sum(int((b["labels"] != -100).sum()) for b in flat)
        loss = 0.0
        for b in flat:
            batch_loss = sum_ce(model(input_ids=b["input_ids"]).logits, b["labels"])
            batch_loss.backward()
            loss += float(batch_loss)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(tokens)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
        out.append({"loss": loss / tokens, "norm": norm, "grads": grads})
        opt.step()
        opt.zero_grad()
    return out


# ---------------------------------------------------------------------------------------------
# comparisons of (possibly DTensor) parameters and gradients with the reference's


def full_tensor(t):
    """The whole tensor of a DTensor; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_grads_match(ap, grads: dict, atol: float = 1e-6) -> None:
    """Every parameter's (gathered) gradient equals the reference's ``grads[FQN]``."""
    for part in ap.parts:
        for name, p in part.named_parameters():
            torch.testing.assert_close(full_tensor(p.grad).cpu(), grads[name], rtol=1e-4, atol=atol,
                                       msg=lambda m: f"{name}: {m}")


def optimizer_step_keeps_tie(ap, opts) -> None:
    """Step every part's optimizer; the two tied embedding copies must stay identical."""
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if ap.tied_embeddings is not None:
        assert ap.tied_embeddings.max_abs_diff() == 0.0


def assert_weights_match(ap, ref) -> None:
    """Every parameter of the parts equals the reference model's after the same steps."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for part in ap.parts:
        for name, p in part.named_parameters():
            torch.testing.assert_close(full_tensor(p).detach().cpu(), ref_params[name].detach(), atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# parallel layouts of the parity tests (TP, HSDP, CP)


@dataclass(frozen=True)
class Layout:
    """A mesh, a tiny model and a schedule: ``world`` ranks as pp x dp_replicate x dp_shard x cp x tp
    (dp_shard is what is left); ``schedule`` None: 1F1B under a pipeline, else GPipe."""

    world: int
    pp: int
    arch: str
    tied: bool
    cp: int = 1
    tp: int = 1
    dp_replicate: int = 1
    schedule: str | None = None
    sequence_parallel: bool = False
    activation_checkpointing: bool = False

    @property
    def pp_schedule(self) -> str:
        return self.schedule or ("1f1b" if self.pp > 1 else "gpipe")


# ---------------------------------------------------------------------------------------------
# the decoder families (tiny random configs)

FAMILY_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, head_dim=8)

#: model_type -> extra config fields (small, and switching on what makes the family differ)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0,
               "query_pre_attn_scalar": 8},
    "gemma3_text": {"sliding_window": 8, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 8},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {"embedding_multiplier": 3.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.2},
    "cohere": {"logit_scale": 0.5},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    # grown by the parity probe's sweep (nemo_pp.planning.family_probe): Phi's final_layernorm,
    # partial rotary (Phi, GLM, StableLM), SmolLM3's layers without rotary, Cohere 2's windows
    "phi": {"partial_rotary_factor": 0.5, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "starcoder2": {"sliding_window": 8, "residual_dropout": 0.0, "embedding_dropout": 0.0},
    "stablelm": {"partial_rotary_factor": 0.25},
    "smollm3": {"no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "glm": {"partial_rotary_factor": 0.5, "pad_token_id": 0},
    "cohere2": {"sliding_window": 8, "logit_scale": 0.5, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "olmo": {"clip_qkv": 8.0},  # its final LayerNorm has no weights: it must stay on the last stage
    "nemotron": {"partial_rotary_factor": 0.5},
    # more mixtures of experts (their router loss: tests/distributed/test_moe_router_loss.py)
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2},  # dense and sparse layers
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 3.0, "logits_scaling": 4.0,
                   "residual_multiplier": 0.5, "attention_multiplier": 0.2},
    # multi-head latent attention, a dense layer then MoE layers with a shared expert, and
    # group-limited sigmoid routing with a bias (no load-balancing loss: tests/distributed/test_moe_gate_bias.py)
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
                    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
                    "rope_scaling": None},
}


#: the families of the matrix with a router and a load-balancing loss (a test keeps this list honest)
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe")


def family_model(model_type: str, **overrides) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**FAMILY_COMMON, **FAMILIES[model_type], **overrides})
    config._attn_implementation = "eager"  # soft-capping and sliding windows in every family's own code path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# ---------------------------------------------------------------------------------------------
# the real recipe (recipes/finetune.py main) on forked gloo ranks

RECIPE_CONFIG = str(ROOT / "configs" / "smollm2_135m_squad_pp2.yaml")


def recipe_overrides(model: Path, squad: Path, out: Path, *extra: str) -> list[str]:
    """The recipe's argv for a tiny model (the ``tiny_assets`` fixture) on SQuAD, writing to ``out``."""
    return [
        "--config", RECIPE_CONFIG,
        f"--model.pretrained_model_name_or_path={model}",
        f"--dataset.path_or_dataset={squad}", f"--validation_dataset.path_or_dataset={squad}",
        "--dataset.seq_length=32", "--validation_dataset.seq_length=32",
        "--validation_dataset.limit_dataset_samples=4",
        "--dataloader.pad_seq_len_divisible=8",
        "--optimizer.lr=1e-3", "--lr_scheduler.lr_warmup_steps=1",
        f"--checkpoint.checkpoint_dir={out}", "--checkpoint.enabled=true",
        "--checkpoint.save_consolidated=final", "--step_scheduler.ckpt_every_steps=3",
        "--evaluation=null",  # scored by generation in test_evaluation only
        *extra,
    ]


def run_recipe_rank(rank, world, argv, sigterm_after_step=None, sigterm_rank=1):
    """``recipes/finetune.py main(argv)`` on this rank; optionally SIGTERM one rank after a step."""
    os.environ["TQDM_DISABLE"] = "1"
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    if sigterm_after_step is not None and rank == sigterm_rank % world:
        from nemo_pp.training.engine import TrainEngine

        original, calls = TrainEngine.train_step, [0]

        def train_step(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls[0] += 1
            if calls[0] == sigterm_after_step:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the watcher notes it
            return out

        TrainEngine.train_step = train_step
    return recipe.main(argv)


def launch_recipe(world, argv, **kw):
    """The recipe on ``world`` forked ranks; every rank must exit with 0."""
    codes = run_ranks(run_recipe_rank, world, argv, *kw.values(), timeout=240)
    assert codes == [0] * world, codes


# ---------------------------------------------------------------------------------------------
# the guide's custom model (examples/custom_model_pipeline.py)


def load_custom_model_example():
    """``examples/custom_model_pipeline.py`` as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("custom_model_pipeline", ROOT / "examples" / "custom_model_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# mixtures of experts: the unsplit model's loss with the router's load-balancing loss


def moe_family_model(model_type: str, coef: float = 1.0, **overrides) -> torch.nn.Module:
    """A matrix MoE family with ``output_router_logits`` on and a large ``router_aux_loss_coef``
    (the auxiliary gradient must stand far above the tolerance for a dropped loss to fail)."""
    return family_model(model_type, output_router_logits=True, router_aux_loss_coef=coef, **overrides)


def reference_moe_training(model, steps, microbatch_size: int, lr: float = LR) -> list[dict]:
    """The unsplit model trained with AdamW on each step's global batch, with the per-layer,
    per-sequence load-balancing loss of :mod:`nemo_pp.models.moe`: Hugging Face's forward of
    each microbatch records its ``router_logits``, and the family's ``load_balancing_loss_func``
    forms each row's loss from that row's logits. Per step: the token-mean ``loss``, the mean
    ``aux``, the ``norm`` before clipping, the clipped ``grads`` and the ``tokens`` per expert
    ``[MoE layers, E]``."""
    import importlib

    lb = importlib.import_module(type(model).__module__).load_balancing_loss_func
    num_e, top_k, coef = model.num_experts, model.num_experts_per_tok, model.router_aux_loss_coef
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    out = []
    for per_dp in steps:
        flat = [b for group in per_dp for b in group]
        tokens = sum(int((b["labels"] != -100).sum()) for b in flat)
        rows = sum(b["input_ids"].shape[0] for b in flat)
        chunks = [(b["input_ids"][i:i + microbatch_size], b["labels"][i:i + microbatch_size])
                  for b in flat for i in range(0, b["input_ids"].shape[0], microbatch_size)]
        loss, aux_total, counts = 0.0, 0.0, None
        for ids, labels in chunks:
            res = model(input_ids=ids, output_router_logits=True)
            per_row = [l.reshape(ids.shape[0], ids.shape[1], num_e) for l in res.router_logits]
            aux = torch.stack([torch.stack([lb((layer[r],), num_e, top_k) for layer in per_row]).mean()
                               for r in range(ids.shape[0])]).sum()
            ce = sum_ce(res.logits, labels)
            (ce / tokens + coef * aux / rows).backward()
            loss += float(ce.detach())
            aux_total += float(aux.detach())
            chosen = torch.stack([torch.bincount(torch.topk(l.detach(), top_k, dim=-1).indices.flatten(), minlength=num_e)
                                  for l in res.router_logits]).double()
            counts = chosen if counts is None else counts + chosen
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
        out.append({"loss": loss / tokens, "aux": aux_total / rows, "norm": norm, "grads": grads, "tokens": counts})
        opt.step()
        opt.zero_grad()
    return out


# ---------------------------------------------------------------------------------------------
# vision-language batches: per-sample images, batch-major for the pipeline, flat for HF


def _image_of(model_type: str, g: torch.Generator, k: int) -> dict:
    """One image's processor-like tensors; Qwen2-VL's grid alternates between 4x4 and 2x4 patches."""
    if model_type == "qwen2_vl":
        h, w = (4, 4) if k % 2 == 0 else (2, 4)
        return {"pixel_values": torch.randn(h * w, 24, generator=g), "image_grid_thw": torch.tensor([[1, h, w]]),
                "tokens": h * w // 4}
    image = {"pixel_values": torch.randn(1, 3, 16, 16, generator=g), "tokens": 16 if model_type == "llava" else 4}
    if model_type == "idefics3":
        image["pixel_attention_mask"] = torch.ones(1, 16, 16, dtype=torch.bool)
    return image


def vlm_batch(model_type: str, image_counts: list[int], seq_len: int, seed: int) -> tuple[dict, dict]:
    """``(batch, hf_inputs)``: a batch of ``len(image_counts)`` samples, sample b holding
    ``image_counts[b]`` images at random places among random text tokens, as nemo_pp's VLM
    collator lays it out (images batch-major) and as Hugging Face's forward takes it (flat)."""
    from nemo_pp.models.vlm import FAMILIES, batch_images
    from tests.tiny_models import VLM_IMAGE_TOKEN

    g = torch.Generator().manual_seed(seed)
    rows, samples, flat = [], [], {}
    for b, n in enumerate(image_counts):
        images = [_image_of(model_type, g, b + k) for k in range(n)]
        ids = torch.randint(3, 140, (seq_len,), generator=g)
        start = int(torch.randint(0, 4, (1,), generator=g))
        for image in images:
            ids[start: start + image["tokens"]] = VLM_IMAGE_TOKEN
            start += image["tokens"] + 2
        assert start <= seq_len, "the images do not fit the sequence"
        rows.append(ids)
        sample = {}
        for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask"):
            parts = [image[key] for image in images if key in image]
            if parts:
                sample[key] = torch.cat(parts)
                flat.setdefault(key, []).append(sample[key])
        samples.append(sample)
    input_ids = torch.stack(rows)
    labels = torch.randint(0, 150, input_ids.shape, generator=g)
    labels[(input_ids == VLM_IMAGE_TOKEN) | (torch.rand(input_ids.shape, generator=g) < 0.3)] = -100
    batch = {"input_ids": input_ids, "labels": labels, **batch_images(FAMILIES[model_type], samples)}
    hf = {"input_ids": input_ids, **{k: torch.cat(v) for k, v in flat.items()}}
    if model_type == "idefics3" and "pixel_values" in hf:
        hf = {**hf, "pixel_values": hf["pixel_values"][None], "pixel_attention_mask": hf["pixel_attention_mask"][None]}
    if model_type == "qwen2_vl":
        hf["mm_token_type_ids"] = (input_ids == VLM_IMAGE_TOKEN).int()
    if model_type == "gemma3":
        batch["token_type_ids"] = hf["token_type_ids"] = (input_ids == VLM_IMAGE_TOKEN).long()
    return batch, hf


def vlm_reference(model, batches: list[tuple[dict, dict]], backward: bool = True):
    """Loss (sum / label tokens) and gradients of the unsplit vision-language model."""
    tokens = sum(int((b["labels"] != -100).sum()) for b, _ in batches)
    total = 0.0
    for batch, hf in batches:
        loss = sum_ce(model(**hf).logits, batch["labels"])
        if backward:
            (loss / tokens).backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    return total / tokens, grads, tokens


# ---------------------------------------------------------------------------------------------
# the restart tests' run (tests/e2e/test_restarts_torchrun.py, test_slurm.py): the tiny model
# on SQuAD, 24 steps of 2 samples, a checkpoint every 4; the loss of an uninterrupted run is
# the reference of every interrupted one (tests/e2e/conftest.py: straight_loss)

RESTART_CONFIG = "configs/smollm2_135m_squad_pp2.yaml"


def restart_overrides(model: Path, squad: Path, out: Path) -> list[str]:
    """The recipe's overrides of the restart run, checkpoints in ``out``."""
    return [f"--model.pretrained_model_name_or_path={model}",
            f"--dataset.path_or_dataset={squad}", f"--validation_dataset.path_or_dataset={squad}",
            "--dataset.seq_length=32", "--validation_dataset.seq_length=32", "--validation_dataset.limit_dataset_samples=4",
            "--dataset.limit_dataset_samples=200", "--dataloader.pad_seq_len_divisible=8", "--optimizer.lr=1e-3",
            f"--checkpoint.checkpoint_dir={out}", "--checkpoint.enabled=true", "--step_scheduler.ckpt_every_steps=4",
            "--step_scheduler.max_steps=24", "--step_scheduler.global_batch_size=2", "--dataloader.batch_size=2",
            "--checkpoint.save_consolidated=null", "--evaluation=null"]


def restart_command(model: Path, squad: Path, out: Path, *launcher: str) -> list[str]:
    """The restart run as a torchrun command line of 2 ranks (run from the repository root)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *launcher, "recipes/finetune.py",
            "--config", RESTART_CONFIG, *restart_overrides(model, squad, out)]


def quiet_env() -> dict:
    """This environment with one thread per rank (2 CPU cores) and no progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def metric_records(out: Path) -> list[dict]:
    """The records of ``out/metrics.jsonl``."""
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
