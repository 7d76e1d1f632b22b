"""A real image task offline: the UCI handwritten digits as image + question + answer rows,
and a LLaVA-style vision-language model built from the real SmolLM2-135M-Instruct.

* ``data/digits``: the 1,797 8x8 grey-scale digits that scikit-learn ships
  (``sklearn.datasets.load_digits``: the UCI "Optical Recognition of Handwritten Digits"
  test set, 43 writers), each a PNG beside ``train.jsonl`` / ``validation.jsonl`` rows
  ``{"messages": [user: image + "Which digit is this?", assistant: "7"], "answer": "7"}``
  (OpenAI-style content parts; the image part's ``image`` is the PNG's path relative to the
  folder). Every 10th image is held out for validation.
* ``models/SmolLM2-135M-Instruct-LLaVA-digits``: a ``LlavaForConditionalGeneration`` whose
  language model is SmolLM2-135M-Instruct (pretrained, its tied embeddings grown by one
  ``<image>`` row and padded to a multiple of 64) and whose vision tower (a 2-layer CLIP
  ViT over 16x16 images in 4x4 patches: 16 image tokens) and projector are **randomly
  initialised** (seed 0): nothing here was pretrained on images. Its ``LlavaProcessor``
  (CLIP image processor, the tokenizer, a ChatML template that renders image parts) is
  saved with it.

Both are written like the other assets: a hidden temporary folder renamed into place
with its ``.complete`` marker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nemo_pp.assets.paths import _commit_dir, _dir_size, _fresh_tmp_dir, assets_home, is_complete, smollm2_dir
from nemo_pp.assets.squad import write_jsonl

QUESTION = "Which digit is this?"
IMAGE_TOKEN = "<image>"
#: the vision tower: CLIP ViT over 16x16 RGB images (the 8x8 digits upsampled 2x), 4x4 patches
IMAGE_SIZE, PATCH_SIZE = 16, 4
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
#: ChatML (SmolLM2's own template) where a message's content may be a list of parts:
#: an image part renders as the image token, which the processor expands to the image's tokens
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def digits_dir() -> Path:
    """Folder with the digits' PNGs and ``train.jsonl`` / ``validation.jsonl``."""
    return assets_home() / "data" / "digits"


def smollm2_llava_dir() -> Path:
    """HF folder of the LLaVA built from SmolLM2-135M-Instruct (model + processor)."""
    return assets_home() / "models" / "SmolLM2-135M-Instruct-LLaVA-digits"


def digit_rows(images: list[str], targets: list[int]) -> list[dict]:
    """Image question-answer rows: ``{"messages": [...], "answer": str}`` per image path."""
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": str(t)}]}], "answer": str(t)}
        for path, t in zip(images, targets)]


def prepare_digits(force: bool = False) -> Path:
    """Write the digits task (1,618 train / 179 validation rows); returns its folder."""
    final = digits_dir()
    if is_complete(final) and not force:
        print(f"[assets] digits: present at {final}")
        return final
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    start = time.time()
    digits = load_digits()
    tmp = _fresh_tmp_dir(final)
    (tmp / "images").mkdir()
    paths = []
    for i, image in enumerate(digits.images):  # values 0..16
        path = f"images/{i:04d}.png"
        Image.fromarray((image * (255 / 16)).round().astype(np.uint8), mode="L").save(tmp / path)
        paths.append(path)
    targets = [int(t) for t in digits.target]
    held_out = [i % 10 == 9 for i in range(len(paths))]
    for split, keep in (("train", False), ("validation", True)):
        idx = [i for i, h in enumerate(held_out) if h == keep]
        write_jsonl(digit_rows([paths[i] for i in idx], [targets[i] for i in idx]), tmp / f"{split}.jsonl")
    counts = {"train": held_out.count(False), "validation": held_out.count(True)}
    _commit_dir(tmp, final, {"source": "sklearn.datasets.load_digits (UCI optdigits)", **counts})
    print(f"[assets] digits: {counts['train']} train / {counts['validation']} validation images -> {final} "
          f"({time.time() - start:.1f}s)")
    return final


def build_llava(language_model_dir: Path, seed: int = 0):
    """``(model, processor)``: the LLaVA of this module's docstring around the causal LM at
    ``language_model_dir`` (float32).

    Raises:
        ValueError: the language model's embeddings are not tied (the build grows the tie).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(language_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm = AutoModelForCausalLM.from_pretrained(language_model_dir, dtype=torch.float32)
    if not lm.config.tie_word_embeddings:
        raise ValueError(f"{language_model_dir}: expected tied word embeddings")
    vocab = -(-len(tokenizer) // 64) * 64
    text_config = lm.config
    text_config.vocab_size = vocab
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION),
        text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        old = lm.get_input_embeddings().weight
        new = model.get_input_embeddings().weight
        new.copy_(old.mean(0, keepdim=True).expand_as(new))  # new rows: the mean embedding
        new[: old.shape[0]] = old
        missing = model.model.language_model.load_state_dict(
            {k.removeprefix("model."): v for k, v in lm.state_dict().items()
             if k.startswith("model.") and "embed_tokens" not in k}, strict=False)
    if [k for k in missing.missing_keys if "embed_tokens" not in k] or missing.unexpected_keys:
        raise ValueError(f"the language model's weights do not fit LLaVA's decoder: {missing}")
    model.tie_weights()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=0, do_center_crop=True, do_convert_rgb=True)  # nearest: keep the digit's pixels
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return model, processor


def prepare_smollm2_llava(force: bool = False) -> Path:
    """Build and write the LLaVA folder from the SmolLM2 folder (``prepare_smollm2`` first)."""
    final = smollm2_llava_dir()
    if is_complete(final) and not force:
        print(f"[assets] SmolLM2 LLaVA: present at {final}")
        return final
    start = time.time()
    model, processor = build_llava(smollm2_dir())
    tmp = _fresh_tmp_dir(final)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    vision = sum(p.numel() for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n)
    info = {"language_model": str(smollm2_dir()), "pretrained": "language model only",
            "random_init": "vision tower and projector (seed 0)", "vision_parameters": vision}
    (tmp / "nemo_pp_build.json").write_text(json.dumps(info, indent=2) + "\n")
    _commit_dir(tmp, final, info)
    print(f"[assets] SmolLM2 LLaVA: {_dir_size(final) / 2**20:.0f} MiB, {vision / 1e6:.2f} M fresh vision "
          f"parameters -> {final} ({time.time() - start:.1f}s)")
    return final
