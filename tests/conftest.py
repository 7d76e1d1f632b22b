import os

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
