"""Loss functions for already-aligned labels."""

from nemo_pp.loss.masked_ce import IGNORE_INDEX, MaskedCrossEntropy

__all__ = ["IGNORE_INDEX", "MaskedCrossEntropy"]
