"""Routing alarms on hand-built training records, and their mirror to the monitor (TensorBoard)."""
from __future__ import annotations

import json

import pytest

from mmoe_ds.analysis.alarms import AlarmThresholds, routing_alarms
from mmoe_ds.training.metrics_writer import MetricsWriter


def entry(image_routed, text_routed, image_tokens, text_tokens):
    """One layer of a train record's "routing" list, as RoutingStats.to_dict writes it."""
    return {"image": {"tokens": image_tokens, "routed_per_expert": image_routed, "kept_per_expert": image_routed,
                      "dropped": 0, "entropy": 1.0},
            "text": {"tokens": text_tokens, "routed_per_expert": text_routed, "kept_per_expert": text_routed,
                     "dropped": 0, "entropy": 1.0}}


def test_balanced_routing_raises_nothing():
    report = routing_alarms([entry([25, 25, 25, 25], [50, 50, 50, 50], 100, 100)])
    assert report.alarms == []
    assert report.fields() == {"alarms": [], "alarm_dead_expert": 0, "alarm_monopoly": 0, "alarm_few_experts": 0,
                               "alarm_total": 0}


def test_monopoly_and_few_experts():
    # image (top-1): all 100 tokens on expert 0 -> monopoly 1.0 > 0.8 and 1 effective expert < 1.5.
    # text (top-2): 200 routes spread evenly -> 4 effective experts, each expert on 50% of tokens: no alarm.
    # all routes: [150, 50, 50, 50] of 300: the smallest share 1/6 is far above 0.05/4: no dead expert.
    report = routing_alarms([entry([100, 0, 0, 0], [50, 50, 50, 50], 100, 100)], layer_ids=[3])
    kinds = sorted((a.kind, a.modality, a.expert) for a in report.alarms)
    assert kinds == [("few_experts", "image", None), ("monopoly", "image", 0)]
    mono = next(a for a in report.alarms if a.kind == "monopoly")
    assert (mono.layer, mono.value, mono.threshold) == (3, 1.0, 0.8)
    assert mono.message == "layer 3: expert 0 takes 100.0% of the image tokens (alarm above 80%)"
    few = next(a for a in report.alarms if a.kind == "few_experts")
    assert few.value == pytest.approx(1.0) and few.threshold == 1.5
    assert report.counts() == {"dead_expert": 0, "monopoly": 1, "few_experts": 1}


def test_top2_tokens_on_one_expert_pair_is_a_monopoly_of_tokens():
    # text top-2, 100 tokens all on experts 0 and 1: each takes 100% of the text tokens (50% of its routes).
    report = routing_alarms([entry([25, 25, 25, 25], [100, 100, 0, 0], 100, 100)])
    assert sorted((a.kind, a.expert) for a in report.alarms if a.modality == "text") == [("monopoly", 0),
                                                                                         ("monopoly", 1)]
    # 2 effective experts is not below 1.5; with a threshold of 3 it is
    assert not any(a.kind == "few_experts" for a in report.alarms)
    strict = routing_alarms([entry([25, 25, 25, 25], [100, 100, 0, 0], 100, 100)],
                            thresholds=AlarmThresholds(min_effective_experts=3))
    assert [(a.kind, a.modality, round(a.value, 6)) for a in strict.alarms if a.kind == "few_experts"] == \
        [("few_experts", "text", 2.0)]


def test_dead_experts():
    # routes per expert over both modalities: [0, 490, 500, 10] of 1000.
    # even share 1/4, alarm below 0.05 · 1/4 = 1.25%: expert 0 (0%) and expert 3 (1.0%) are dead, not 1 or 2.
    report = routing_alarms([entry([0, 240, 250, 10], [0, 250, 250, 0], 500, 250)], layer_ids=[1])
    dead = [(a.expert, a.value, a.threshold) for a in report.alarms if a.kind == "dead_expert"]
    assert dead == [(0, 0.0, 0.0125), (3, 0.01, 0.0125)]
    assert report.fields()["alarm_dead_expert"] == 2
    assert report.alarms[0].message.startswith("layer 1: expert 0 gets 0.00% of the routes")
    # a looser threshold spares expert 3
    loose = routing_alarms([entry([0, 240, 250, 10], [0, 250, 250, 0], 500, 250)],
                           thresholds=AlarmThresholds(dead_fraction_of_uniform=0.02))
    assert [a.expert for a in loose.alarms if a.kind == "dead_expert"] == [0]


def test_layers_and_modalities_without_routes_raise_nothing():
    assert routing_alarms([entry([0, 0, 0, 0], [0, 0, 0, 0], 0, 0)]).alarms == []
    # text absent from this window: only image is judged
    report = routing_alarms([entry([100, 0, 0, 0], [0, 0, 0, 0], 100, 0)])
    assert {a.modality for a in report.alarms} == {"image", None}


def test_fields_are_json_and_numeric_counts():
    fields = routing_alarms([entry([100, 0, 0, 0], [50, 50, 50, 50], 100, 100)]).fields()
    json.dumps(fields)
    assert fields["alarm_total"] == 2 and fields["alarm_monopoly"] == 1
    assert fields["alarms"][0].keys() == {"layer", "kind", "modality", "expert", "value", "threshold", "message"}


@pytest.mark.parametrize("routing, layer_ids, match", [
    ([{"image": {"tokens": 3}}], None, r"routing\[layer 0\]\.image: needs 'tokens' and 'routed_per_expert'"),
    ([{"image": {"tokens": 3, "routed_per_expert": [1, 2]}, "text": {"tokens": 1, "routed_per_expert": [1]}}], None,
     "same non-zero number of experts"),
    ([{"image": {"tokens": -1, "routed_per_expert": [1]}}], None, "counts must be >= 0"),
    ([entry([1, 1], [1, 1], 2, 1)], [0, 1], "layer_ids: one per routing entry"),
])
def test_bad_records_name_the_problem(routing, layer_ids, match):
    with pytest.raises(ValueError, match=match):
        routing_alarms(routing, layer_ids)


@pytest.mark.parametrize("kw, match", [({"monopoly_share": 0}, "monopoly_share"),
                                       ({"dead_fraction_of_uniform": 1.5}, "dead_fraction_of_uniform"),
                                       ({"min_effective_experts": 0.5}, "min_effective_experts")])
def test_thresholds_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        AlarmThresholds(**kw)


class RecordingMonitor:
    """A stand-in for DeepSpeed's monitor (TensorBoard/W&B/CSV): records what it is given."""
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events.extend(events)


def test_metrics_writer_mirrors_alarm_counts_not_the_list(tmp_path):
    monitor = RecordingMonitor()
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=True, monitor=monitor)
    record = {"kind": "train", "step": 20, "loss": 1.5}
    record.update(routing_alarms([entry([100, 0, 0, 0], [50, 50, 50, 50], 100, 100)], layer_ids=[1]).fields())
    writer.write(record)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["alarms"][0]["layer"] == 1 and line["alarm_total"] == 2
    assert sorted(monitor.events) == sorted([("train/loss", 1.5, 20), ("train/alarm_dead_expert", 0, 20),
                                             ("train/alarm_monopoly", 1, 20), ("train/alarm_few_experts", 1, 20),
                                             ("train/alarm_total", 2, 20)])
