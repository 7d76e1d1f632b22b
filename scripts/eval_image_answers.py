"""Held-out answer accuracy of a vision-language model folder on image question-answer rows.

    python scripts/eval_image_answers.py --model outputs/smollm2_135m_llava_digits_pp2/hf_model
    python scripts/eval_image_answers.py --model ~/.cache/nemo_pp/models/SmolLM2-135M-Instruct-LLaVA-digits  # before

Each row's conversation up to its last assistant turn is rendered by the folder's processor
with the generation prompt; the model (loaded by ``AutoModelForImageTextToText``: the
consolidated export reloads as the family's class) generates greedily, and an answer counts
when its text, stripped, equals the row's ``answer``. One process, no pipeline: this also
checks that the exported folder is a complete Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def answer_accuracy(model_dir: str | Path, data_dir: str | Path, split: str = "validation", limit: int | None = None,
                    batch_size: int = 32, max_new_tokens: int = 4) -> tuple[float, int]:
    """``(accuracy, rows)``: the share of ``data_dir/{split}.jsonl`` rows whose greedy answer is right."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (Path(data_dir) / f"{split}.jsonl").read_text().splitlines() if line]
    rows = rows[:limit] if limit else rows
    right = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [row["messages"][:-1] for row in chunk]
        texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
        images = [Image.open(Path(data_dir) / part["image"]).convert("RGB") for p in prompts for m in p
                  if isinstance(m["content"], list) for part in m["content"] if part["type"] == "image"]
        inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(a.strip() == row["answer"].strip() for a, row in zip(answers, chunk))
    return right / max(len(rows), 1), len(rows)


def main(argv=None) -> int:
    from nemo_pp.assets.digits_vlm import digits_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face vision-language model folder")
    parser.add_argument("--data", default=None, help="folder with {split}.jsonl (default: the digits asset)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="the first N rows only")
    args = parser.parse_args(argv)
    accuracy, n = answer_accuracy(args.model, args.data or digits_dir(), args.split, args.limit)
    print(f"answer accuracy: {100 * accuracy:.1f} % of {n} {args.split} rows ({args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
