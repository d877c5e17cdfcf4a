"""Routing analysis: pure metric functions over counts and probabilities (no model needed), plus
`analyze` / `write_report` (`mmoe_ds.analysis.analyze`, imported on use: it loads models) and the
training alarms (`mmoe_ds.analysis.alarms`)."""
from .alarms import Alarm, AlarmReport, AlarmThresholds, routing_alarms
from .cka import ExpertMatching, cka_matrix, linear_cka, match_experts, weight_cka
from .metrics import (
                      MeanCI,
                      PermutationTest,
                      effective_experts,
                      entropy_bits,
                      gini,
                      mean_ci95,
                      mutual_information_bits,
                      nmi,
                      permutation_null_mi,
                      t_quantile_975,
                      total_variation,
)
from .probe import ProbeResult, linear_probe
from .routing import (
                      ComputeShare,
                      LogitSplit,
                      compute_share,
                      expert_ffn_flops,
                      logit_variance_split,
                      router_logit_split,
                      soft_mutual_information_bits,
)

__all__ = ["MeanCI", "PermutationTest", "effective_experts", "entropy_bits", "gini", "mean_ci95",
           "mutual_information_bits", "nmi", "permutation_null_mi", "t_quantile_975", "total_variation",
           "Alarm", "AlarmReport", "AlarmThresholds", "routing_alarms", "ExpertMatching", "cka_matrix", "linear_cka",
           "match_experts", "weight_cka", "ProbeResult", "linear_probe", "ComputeShare", "LogitSplit", "compute_share",
           "expert_ffn_flops", "logit_variance_split", "router_logit_split", "soft_mutual_information_bits"]
