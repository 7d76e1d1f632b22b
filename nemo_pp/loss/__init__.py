"""Loss functions for already-aligned labels."""

from nemo_pp.loss.linear_ce import ChunkedCrossEntropy, FusedLinearCrossEntropy, linear_cross_entropy
from nemo_pp.loss.masked_ce import IGNORE_INDEX, MaskedCrossEntropy

__all__ = ["IGNORE_INDEX", "ChunkedCrossEntropy", "FusedLinearCrossEntropy", "MaskedCrossEntropy",
           "linear_cross_entropy"]
