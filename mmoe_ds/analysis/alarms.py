"""Collapse and monopolization alarms over routing counts, for training logs and the analysis.

Input: a `routing` list as the trainer writes it to metrics.jsonl, one entry per MoE layer,
each `{modality: {"tokens": n, "routed_per_expert": [E], "kept_per_expert": [E], ...}}`
(`RoutingStats.to_dict`). Pure: no model, no files.

Alarms (thresholds in `AlarmThresholds`):
  dead_expert  an expert's share of the layer's routes (all modalities) is below
               `dead_fraction_of_uniform` / E (default: under 5% of an even share);
  monopoly     one expert is chosen by more than `monopoly_share` of a modality's tokens
               (routes of e / tokens of m: for top-1 its share of the modality's routes);
  few_experts  a modality uses fewer than `min_effective_experts` effective experts,
               exp(H(p(e | m))) over its routes.
Layers or modalities without routes in the record raise no alarm.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .metrics import effective_experts

ALARM_KINDS = ("dead_expert", "monopoly", "few_experts")


@dataclass(frozen=True)
class AlarmThresholds:
    """When an alarm fires. Validated at construction."""
    dead_fraction_of_uniform: float = 0.05
    monopoly_share: float = 0.8
    min_effective_experts: float = 1.5

    def __post_init__(self):
        if not 0 <= self.dead_fraction_of_uniform < 1:
            raise ValueError(f"AlarmThresholds.dead_fraction_of_uniform: in [0, 1) (a fraction of an even share), "
                             f"got {self.dead_fraction_of_uniform}.")
        if not 0 < self.monopoly_share <= 1:
            raise ValueError(f"AlarmThresholds.monopoly_share: in (0, 1], got {self.monopoly_share}.")
        if not self.min_effective_experts >= 1:
            raise ValueError(f"AlarmThresholds.min_effective_experts: at least 1, got {self.min_effective_experts}.")


@dataclass
class Alarm:
    """One alarm; `to_dict` is the JSON form in metrics.jsonl and analysis.json."""
    layer: int
    kind: str
    modality: str | None
    expert: int | None
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AlarmReport:
    """Result of `routing_alarms`: the alarms and their counts per kind."""
    alarms: list[Alarm] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {kind: sum(a.kind == kind for a in self.alarms) for kind in ALARM_KINDS}

    def fields(self) -> dict:
        """What a metrics.jsonl record gets: `alarms` (list of dicts) plus numeric `alarm_<kind>` counts
        and `alarm_total`, which `MetricsWriter` mirrors to TensorBoard."""
        out: dict = {"alarms": [a.to_dict() for a in self.alarms]}
        out.update({f"alarm_{kind}": n for kind, n in self.counts().items()})
        out["alarm_total"] = len(self.alarms)
        return out


def _layer_counts(entry: dict, where: str) -> dict[str, tuple[int, list[float]]]:
    """{modality: (tokens, routed per expert)} of one layer entry, checked."""
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"{where}: a {{modality: counts}} mapping is needed, got {type(entry).__name__}.")
    out, sizes = {}, set()
    for modality, counts in entry.items():
        try:
            tokens, routed = int(counts["tokens"]), [float(v) for v in counts["routed_per_expert"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}.{modality}: needs 'tokens' and 'routed_per_expert' (RoutingStats.to_dict), "
                             f"problem: {e}.") from None
        if tokens < 0 or any(v < 0 for v in routed):
            raise ValueError(f"{where}.{modality}: counts must be >= 0.")
        out[modality] = (tokens, routed)
        sizes.add(len(routed))
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{where}: every modality needs the same non-zero number of experts, got {sorted(sizes)}.")
    return out


def routing_alarms(routing: list[dict], layer_ids: list[int] | None = None,
                   thresholds: AlarmThresholds | None = None) -> AlarmReport:
    """Alarms of one record's routing counts.

    Args:
        routing: one entry per MoE layer (`RoutingStats.to_dict` output), e.g. a train record's "routing".
        layer_ids: the decoder layer index of each entry (default 0, 1, ...: the MoE layers' order).
        thresholds: when alarms fire (default `AlarmThresholds()`).
    Returns:
        AlarmReport; `.fields()` gives the metrics.jsonl fields.
    """
    t = thresholds or AlarmThresholds()
    if layer_ids is None:
        layer_ids = list(range(len(routing)))
    if len(layer_ids) != len(routing):
        raise ValueError(f"layer_ids: one per routing entry needed, got {len(layer_ids)} for {len(routing)}.")
    report = AlarmReport()
    for layer, entry in zip(layer_ids, routing):
        counts = _layer_counts(entry, f"routing[layer {layer}]")
        E = len(next(iter(counts.values()))[1])
        totals = [sum(routed[e] for _, routed in counts.values()) for e in range(E)]
        all_routes = sum(totals)
        if all_routes > 0:
            limit = t.dead_fraction_of_uniform / E
            for e, n in enumerate(totals):
                share = n / all_routes
                if share < limit:
                    report.alarms.append(Alarm(layer, "dead_expert", None, e, share, limit,
                                               f"layer {layer}: expert {e} gets {100 * share:.2f}% of the routes "
                                               f"(alarm below {100 * limit:.2f}%, {t.dead_fraction_of_uniform:g} of "
                                               f"an even share)"))
        for modality, (tokens, routed) in counts.items():
            routes = sum(routed)
            if tokens == 0 or routes == 0:
                continue
            for e, n in enumerate(routed):
                share = n / tokens
                if share > t.monopoly_share:
                    report.alarms.append(Alarm(layer, "monopoly", modality, e, share, t.monopoly_share,
                                               f"layer {layer}: expert {e} takes {100 * share:.1f}% of the {modality} "
                                               f"tokens (alarm above {100 * t.monopoly_share:.0f}%)"))
            eff = effective_experts([v / routes for v in routed])
            if eff < t.min_effective_experts and not math.isclose(eff, t.min_effective_experts):
                report.alarms.append(Alarm(layer, "few_experts", modality, None, eff, t.min_effective_experts,
                                           f"layer {layer}: {modality} uses {eff:.2f} effective experts "
                                           f"(alarm below {t.min_effective_experts:g})"))
    return report
