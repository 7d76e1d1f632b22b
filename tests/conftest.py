import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_assets():
    """Paths of the prepared SmolLM2 folder and SQuAD JSONL folder.

    Skips when they are missing, unless NEMO_PP_REQUIRE_ASSETS=1 (set by the README's
    test command, which prepares them first): then a missing asset is a failure.
    """
    from nemo_pp.assets import is_complete, smollm2_dir, squad_dir

    model, data = smollm2_dir(), squad_dir()
    if not (is_complete(model) and is_complete(data)):
        msg = "assets missing: run python -m nemo_pp.assets"
        if os.environ.get("NEMO_PP_REQUIRE_ASSETS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return model, data


def _prepared(folder, msg: str):
    """``folder`` when its asset is complete; else skipped, or failed under NEMO_PP_REQUIRE_ASSETS=1."""
    from nemo_pp.assets import is_complete

    if not is_complete(folder):
        if os.environ.get("NEMO_PP_REQUIRE_ASSETS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return folder


@pytest.fixture(scope="session")
def real_moe_model(real_assets):
    """The sparsely upcycled SmolLM2 folder (``python -m nemo_pp.assets --only moe_model``);
    skipped or failed when missing, as :func:`real_assets`."""
    from nemo_pp.assets import smollm2_moe_dir

    return _prepared(smollm2_moe_dir(), "upcycled model missing: run python -m nemo_pp.assets --only moe_model")


@pytest.fixture(scope="session")  # built once: read-only, and the same seed would build it alike anyway
def tiny_assets(real_assets, tmp_path_factory):
    """A tiny tied Llama (8 layers, SmolLM2's vocabulary and tokenizer) saved as an HF folder,
    and the SQuAD folder: the recipe's model and data in tests that run the real recipe."""
    from transformers import AutoTokenizer

    from tests.tiny_models import tiny_model

    smollm2, squad = real_assets
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    tiny_model("llama", tied=True, layers=8, vocab=len(tokenizer), hidden=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, squad


@pytest.fixture(scope="session")
def digits_data(real_assets):
    """The digits image task folder (``python -m nemo_pp.assets --only vlm``); skipped or failed
    when missing, as :func:`real_assets`."""
    from nemo_pp.assets import digits_dir

    return _prepared(digits_dir(), "digits missing: run python -m nemo_pp.assets --only vlm")


@pytest.fixture(scope="module")
def tiny_vlm_assets(tiny_assets, digits_data, tmp_path_factory):
    """A tiny LLaVA around the tiny Llama of ``tiny_assets`` (the digits asset's build: a fresh
    CLIP tower, SmolLM2's tokenizer with ``<image>``, its processor) and the digits folder."""
    from nemo_pp.assets.digits_vlm import build_llava

    model, processor = build_llava(tiny_assets[0])
    folder = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, digits_data


@pytest.fixture(scope="module")
def tiny_moe_assets(tiny_assets, tmp_path_factory):
    """The tiny Llama of ``tiny_assets`` sparsely upcycled to a Mixtral (4 experts, top 2,
    ``output_router_logits`` on), saved by ``save_pretrained`` (experts one by one), and SQuAD."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_pp.assets.smollm2_moe import upcycle_llama_to_mixtral

    dense, squad = tiny_assets
    folder = tmp_path_factory.mktemp("tiny_moe")
    upcycle_llama_to_mixtral(AutoModelForCausalLM.from_pretrained(dense)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(dense).save_pretrained(folder)
    return folder, squad


def pytest_report_header(config):
    """The free disk space where tests write (a run needs a few GB: the biggest end-to-end
    test keeps about 5 GB of real-model checkpoints until its teardown)."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free
    return f"free disk in {tempfile.gettempdir()}: {free / 2**30:.1f} GiB"


_TESTS = Path(__file__).resolve().parent
_MARK_BY_FOLDER = {"distributed": "distributed", "e2e": "e2e"}  # tests/<folder>/...: the marker every test there carries


def pytest_collection_modifyitems(config, items):
    """Every test under tests/distributed carries ``distributed``, under tests/e2e ``e2e``
    (``-m 'not distributed'`` etc. select by them; pyproject.toml declares them)."""
    for item in items:
        try:
            folder = Path(str(item.path)).resolve().relative_to(_TESTS).parts[0]
        except ValueError:  # a test outside tests/
            continue
        marker = _MARK_BY_FOLDER.get(folder)
        if marker is not None and item.get_closest_marker(marker) is None:
            item.add_marker(marker)
