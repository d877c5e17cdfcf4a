"""Routing analysis: pure metric functions over counts and probabilities (no model needed)."""
from .metrics import (MeanCI, PermutationTest, effective_experts, entropy_bits, gini, mean_ci95,
                      mutual_information_bits, nmi, permutation_null_mi, t_quantile_975, total_variation)

__all__ = ["MeanCI", "PermutationTest", "effective_experts", "entropy_bits", "gini", "mean_ci95",
           "mutual_information_bits", "nmi", "permutation_null_mi", "t_quantile_975", "total_variation"]
