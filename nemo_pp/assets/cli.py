"""Command line: ``python -m nemo_pp.assets [--only {model,moe_model,vlm,squad,user_data}] [--force]``."""

from __future__ import annotations

import argparse
from typing import Sequence

from nemo_pp.assets.digits_vlm import prepare_digits, prepare_smollm2_llava
from nemo_pp.assets.paths import HOME_ENV, assets_home
from nemo_pp.assets.smollm2 import prepare_smollm2
from nemo_pp.assets.smollm2_moe import prepare_smollm2_moe
from nemo_pp.assets.squad import prepare_squad
from nemo_pp.assets.user_data import prepare_bigbench_user_data, prepare_shakespeare


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m nemo_pp.assets [--only {model,moe_model,vlm,squad,user_data}] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_pp.assets",
        description=f"Prepare offline assets under ${HOME_ENV} (now {assets_home()}).",
    )
    parser.add_argument("--only", choices=["model", "moe_model", "vlm", "squad", "user_data"],
                        help="prepare just this one (moe_model: SmolLM2 sparsely upcycled to 4 experts, built from "
                             "model; vlm: the handwritten digits and a LLaVA around SmolLM2, built from model; "
                             "user_data: the instruction, chat and plain-text sets)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if complete (re-uses files in downloads/)")
    args = parser.parse_args(argv)
    if args.only in (None, "model"):
        prepare_smollm2(force=args.force)
    if args.only in (None, "moe_model"):
        prepare_smollm2_moe(force=args.force)
    if args.only in (None, "vlm"):
        prepare_digits(force=args.force)
        prepare_smollm2_llava(force=args.force)
    if args.only in (None, "squad"):
        prepare_squad(force=args.force)
    if args.only in (None, "user_data"):
        prepare_bigbench_user_data(force=args.force)
        prepare_shakespeare(force=args.force)
    return 0

