"""`Trainer.train` in one process with small fakes (no launcher, no DeepSpeed engine): the metrics
records (log windows, means over ranks, throughput, skips, routing and its alarms), the checkpoint
calls (at `checkpoint_every` and the last step, before that step's evaluation; the evaluation
recorded into that checkpoint), evaluation errors, resuming after `start_step`, and evaluation's
own random stream.

The fakes: an engine whose losses are the batch's number (batch i: loss i, text_loss i/2,
aux_loss i/100, no image loss) and whose routing counts scale with it; a loader numbering its
batches from 1 (a bad image every second batch); a two-rank `dist` whose other rank does exactly
what this one does (sums are twice this rank's: a mean that forgot to divide, or routing counts
not summed over the ranks, show); a clock that
moves 1 s per forward pass; a checkpointer and an evaluator that record their calls. The real
`MetricsWriter` writes metrics.jsonl. The multi-process tests (tests/test_training.py,
tests/test_init_from.py) run the real parts.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmoe_ds.config.recipe import Recipe
from mmoe_ds.data.skips import SkipLog
from mmoe_ds.model import MmoeConfig
from mmoe_ds.moe.router import RoutingStats
from mmoe_ds.training import trainer as trainer_module
from mmoe_ds.training.metrics_writer import MetricsWriter
from mmoe_ds.training.trainer import Trainer

WORLD_SIZE = 2
COMPOSITION = {"image_text": 2, "text": 1}  # micro batch 3
SEED = 7


class Clock:
    """perf_counter stand-in: 1 s per forward pass."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch_stats(v: int, collapsed: bool) -> RoutingStats:
    """Batch v's routing counts on the one MoE layer (modalities image, text; 4 experts): image
    tokens 2v split over experts 0 and 1, text tokens 2v over 2 and 3, one text route of expert 3
    dropped per batch; collapsed: every image token on expert 0."""
    image = [2 * v, 0, 0, 0] if collapsed else [v, v, 0, 0]
    routed = torch.tensor([image, [0, 0, v, v]], dtype=torch.float64)
    kept = routed.clone()
    kept[1, 3] -= 1
    return RoutingStats(tokens=torch.tensor([2.0 * v, 2.0 * v], dtype=torch.float64), routed=routed, kept=kept,
                        entropy=torch.tensor([0.5, 0.25], dtype=torch.float64))


class FakeEngine(torch.nn.Module):
    """The engine's surface the trainer uses; batch i (its input_ids hold i) has loss i."""

    device = torch.device("cpu")

    def __init__(self, clock: Clock, gas: int = 1, collapsed: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.clock, self.gas, self.collapsed = clock, gas, collapsed
        self.seen: list[int] = []  # batch numbers, in order
        self.draws: list[float] = []  # the training random stream (as router jitter draws from it)
        self.micro_steps = 0

    def forward(self, input_ids, **_):
        v = int(input_ids[0, 0])
        self.seen.append(v)
        self.draws.append(torch.rand(()).item())
        self.clock.now += 1.0
        return SimpleNamespace(loss=self.weight * v, text_loss=torch.tensor(v / 2), aux_loss=torch.tensor(v / 100),
                               image_loss=None, routing_stats=[batch_stats(v, self.collapsed)])

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [0.01 * self.micro_steps]

    def gradient_accumulation_steps(self) -> int:
        return self.gas


class FakeLoader:
    """Batches numbered from `first`; every even-numbered batch met one bad image."""

    def __init__(self, first: int = 1):
        self.first, self.skips = first, SkipLog()

    def __iter__(self):
        v = self.first
        while True:
            if v % 2 == 0:
                self.skips.add("bad_image", "a.tar", f"k{v}")
            yield {"input_ids": torch.full((3, 4), v), "attention_mask": torch.ones(3, 4), "keys": ["not an input"]}
            v += 1

    def skip_log(self) -> SkipLog:
        return self.skips


class MirrorDist:
    """Two ranks; the other one does what this one does (an all_reduce doubles), unless `peer_eval_fails`:
    then its evaluation fails (evaluation's vectors, the failure flag first, are [1, 0, ...] there)."""

    def __init__(self, peer_eval_fails: bool = False, eval_lengths: tuple[int, ...] = (1, 3)):
        self.peer_eval_fails, self.eval_lengths = peer_eval_fails, eval_lengths

    def all_reduce(self, t: torch.Tensor) -> None:
        peer = t.clone()
        if self.peer_eval_fails and t.numel() in self.eval_lengths:
            peer.zero_()
            peer[0] = 1.0
        t.add_(peer)

    def all_gather_object(self, out: list, obj) -> None:
        out[:] = [obj] * len(out)


class RecordingCheckpointer:
    def __init__(self, events: list):
        self.events = events

    def save(self, step: int, metrics: dict) -> str:
        self.events.append(("save", step, dict(metrics)))
        return f"step{step:08d}"

    def record_eval(self, tag: str, metrics: dict) -> None:
        self.events.append(("record_eval", tag, dict(metrics)))


class RecordingEvaluator:
    """Sums [step, 10] per rank -> caption_loss = step / 10; `fail` = {step: "prepare" | "forward"}."""

    num_sums = 2

    def __init__(self, events: list, fail: dict[int, str] | None = None):
        self.events, self.fail = events, fail or {}
        self.draws: list[float] = []

    def prepare(self, step: int) -> None:
        self.events.append(("prepare", step))
        self.draws.append(torch.rand(()).item())
        if self.fail.get(step) == "prepare":
            raise OSError("validation shard unreadable")

    def forward(self, step: int) -> list[float]:
        self.events.append(("forward", step))
        if self.fail.get(step) == "forward":
            raise RuntimeError("forward failed")
        return [float(step), 10.0]

    def finish(self, totals) -> dict:
        self.events.append(("finish", list(totals)))
        return {"caption_loss": totals[0] / totals[1]}

    def write_report(self, out_dir: Path) -> list[Path]:
        self.events.append(("write_report", out_dir))
        return [out_dir / "routing_report.md"]


def run(tmp_path, monkeypatch, *, steps=5, log_every=2, checkpoint_every=2, eval_every=3, gas=1, start_step=0,
        fail=None, collapsed=False, peer_eval_fails=False):
    """Train with the fakes; returns (records of metrics.jsonl, events, log lines, engine, evaluator, result)."""
    tmp_path.mkdir(exist_ok=True)
    clock = Clock()
    monkeypatch.setattr(trainer_module, "perf_counter", clock)
    recipe = Recipe.from_dict({"train": {"output_dir": str(tmp_path), "steps": steps, "log_every": log_every,
                                         "checkpoint_every": checkpoint_every, "eval_every": eval_every,
                                         "seed": SEED, "progress_bar": False},
                               "data": {"composition": COMPOSITION}})
    events, messages = [], []
    engine, evaluator = FakeEngine(clock, gas, collapsed), RecordingEvaluator(events, fail)
    trainer = Trainer(recipe, world_size=WORLD_SIZE, rank=0, dist=MirrorDist(peer_eval_fails), engine=engine,
                      loader=FakeLoader(first=start_step * gas + 1), evaluator=evaluator,
                      checkpointer=RecordingCheckpointer(events),
                      metrics=MetricsWriter(tmp_path / "metrics.jsonl", enabled=True),
                      model_config=MmoeConfig(num_hidden_layers=2, num_local_experts=4, moe_layer_frequency=2),
                      out=tmp_path, start_step=start_step, log=messages.append)
    torch.manual_seed(0)
    result = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return records, events, messages, engine, evaluator, result


def routing_of(batches: list[int]) -> dict:
    """The routing entry of a window of these batches on both ranks, by hand from `batch_stats`."""
    n, d = WORLD_SIZE * sum(batches), WORLD_SIZE * len(batches)  # each rank: routes sum(batches), drops one a batch
    return {"image": {"tokens": 2 * n, "routed_per_expert": [n, n, 0, 0], "kept_per_expert": [n, n, 0, 0],
                      "dropped": 0, "entropy": 0.5},
            "text": {"tokens": 2 * n, "routed_per_expert": [0, 0, n, n], "kept_per_expert": [0, 0, n, n - d],
                     "dropped": d, "entropy": 0.25}}


def test_records_and_checkpoints_of_a_run(tmp_path, monkeypatch):
    records, events, messages, engine, _, result = run(tmp_path, monkeypatch)
    assert engine.seen == [1, 2, 3, 4, 5]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("eval", 3), ("train", 4), ("train", 5),
                                                         ("eval", 5)]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    # windows: steps 1-2, 3-4 and the last step alone; means over the window's micro batches and the ranks
    for step, batches in ((2, [1, 2]), (4, [3, 4]), (5, [5])):
        r = train[step]
        mean = sum(batches) / len(batches)
        assert r["loss"] == pytest.approx(mean) and r["text_loss"] == pytest.approx(mean / 2)
        assert r["aux_loss"] == pytest.approx(mean / 100) and r["image_loss"] == 0.0
        assert r["lr"] == pytest.approx(0.01 * step)  # read at the log step, after its optimizer step
        # samples of the window on both ranks (micro batch 3) over its seconds (1 per forward pass)
        assert r["samples_per_s"] == pytest.approx(len(batches) * 3 * WORLD_SIZE / len(batches))
        assert r["skipped"]["bad_image"] == step // 2 and sum(r["skipped"].values()) == step // 2
        assert r["routing"] == [routing_of(batches)]
        assert r["alarm_total"] == 0 and r["alarms"] == []
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert evals[3] == {"caption_loss": pytest.approx(0.3), "kind": "eval", "step": 3}  # [2*3, 2*10] over ranks
    assert evals[5]["caption_loss"] == pytest.approx(0.5)
    # checkpoints at checkpoint_every and the last step, each before that step's evaluation, with the
    # last successful evaluation's metrics; the last step's own evaluation is recorded into its checkpoint
    assert [e[:2] for e in events] == [("save", 2), ("prepare", 3), ("forward", 3), ("finish", [6.0, 20.0]),
                                       ("save", 4), ("save", 5), ("prepare", 5), ("forward", 5),
                                       ("finish", [10.0, 20.0]), ("record_eval", "step00000005"),
                                       ("write_report", tmp_path / "report")]
    saves = {e[1]: e[2] for e in events if e[0] == "save"}
    assert saves[2] == {} and saves[4] == saves[5] == {"caption_loss": pytest.approx(0.3)}
    assert events[-2][2] == {"caption_loss": pytest.approx(0.5)}
    assert result == {"eval": {"caption_loss": pytest.approx(0.5)}, "report": [tmp_path / "report/routing_report.md"]}
    assert [m for m in messages if m.startswith("checkpoint")] == [f"checkpoint step{s:08d}" for s in (2, 4, 5)]


def test_gradient_accumulation_windows_count_micro_batches(tmp_path, monkeypatch):
    records, events, _, engine, _, _ = run(tmp_path, monkeypatch, steps=3, log_every=2, checkpoint_every=10,
                                           eval_every=10, gas=2)
    assert engine.seen == [1, 2, 3, 4, 5, 6]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 3]
    assert [r["loss"] for r in train] == pytest.approx([2.5, 5.5])  # batches 1-4, then 5-6
    assert [r["lr"] for r in train] == pytest.approx([0.04, 0.06])
    assert [r["samples_per_s"] for r in train] == pytest.approx([3 * WORLD_SIZE, 3 * WORLD_SIZE])
    assert [r["routing"] for r in train] == [[routing_of([1, 2, 3, 4])], [routing_of([5, 6])]]
    assert [e[:2] for e in events if e[0] == "save"] == [("save", 3)]  # only the last step


def test_failed_evaluations_are_recorded_and_training_goes_on(tmp_path, monkeypatch):
    records, events, messages, engine, _, result = run(tmp_path, monkeypatch, eval_every=1,
                                                       fail={2: "prepare", 4: "forward"})
    assert engine.seen == [1, 2, 3, 4, 5]
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 1), ("train", 2), ("eval_error", 2), ("eval", 3),
                                                         ("train", 4), ("eval_error", 4), ("train", 5), ("eval", 5)]
    errors = [r for r in records if r["kind"] == "eval_error"]
    assert errors == [
        {"kind": "eval_error", "step": 2, "failed_ranks": 2, "error": "OSError: validation shard unreadable"},
        {"kind": "eval_error", "step": 4, "failed_ranks": 2, "error": "RuntimeError: forward failed"}]
    assert ("forward", 2) not in events  # the ranks agreed to stop after prepare failed
    # a failed evaluation is not recorded into its step's checkpoint, and the next one keeps the last good metrics
    assert [e for e in events if e[0] in ("save", "record_eval")] == [
        ("save", 2, {"caption_loss": pytest.approx(0.1)}), ("save", 4, {"caption_loss": pytest.approx(0.3)}),
        ("save", 5, {"caption_loss": pytest.approx(0.3)}), ("record_eval", "step00000005", {"caption_loss": 0.5})]
    assert any("step 4: evaluation failed on 2 rank(s): RuntimeError: forward failed" in m for m in messages)
    assert result["eval"] == {"caption_loss": pytest.approx(0.5)}


def test_an_evaluation_failing_on_the_other_rank_only(tmp_path, monkeypatch):
    records, events, _, engine, _, result = run(tmp_path, monkeypatch, steps=2, eval_every=2, peer_eval_fails=True)
    assert engine.seen == [1, 2]
    assert records[-1] == {"kind": "eval_error", "step": 2, "failed_ranks": 1,
                           "error": "on other ranks (see their stderr)"}
    assert ("forward", 2) not in events and ("prepare", 2) in events
    assert [e for e in events if e[0] in ("save", "record_eval")] == [("save", 2, {})]
    assert result["eval"] == {}


def test_resume_trains_the_steps_after_start_step(tmp_path, monkeypatch):
    records, events, _, engine, _, _ = run(tmp_path, monkeypatch, start_step=3)
    assert engine.seen == [4, 5]  # the loader continues where the checkpoint left it
    assert [(r["kind"], r["step"]) for r in records] == [("train", 4), ("train", 5), ("eval", 5)]
    assert [r["loss"] for r in records if r["kind"] == "train"] == pytest.approx([4.0, 5.0])  # step 4's window: itself
    assert [e[:2] for e in events if e[0] in ("save", "prepare")] == [("save", 4), ("save", 5), ("prepare", 5)]


def test_routing_alarms_are_recorded_and_logged(tmp_path, monkeypatch):
    records, _, messages, _, _, _ = run(tmp_path, monkeypatch, steps=2, collapsed=True)
    (train,) = [r for r in records if r["kind"] == "train"]
    kinds = sorted((a["kind"], a["layer"], a["modality"], a["expert"]) for a in train["alarms"])
    # expert 1 gets no route; expert 0 takes every image token; images use one expert (layer 1 is the MoE layer)
    assert kinds == [("dead_expert", 1, None, 1), ("few_experts", 1, "image", None), ("monopoly", 1, "image", 0)]
    assert train["alarm_total"] == 3 and train["alarm_monopoly"] == 1
    assert any(m.startswith("step 2: 3 routing alarm(s); first: layer 1:") for m in messages)


def test_evaluation_has_its_own_random_stream(tmp_path, monkeypatch):
    _, _, _, often, evaluator, _ = run(tmp_path / "a", monkeypatch, eval_every=1)
    _, _, _, once, _, _ = run(tmp_path / "b", monkeypatch, eval_every=10)
    assert often.draws == once.draws  # five evaluations against one (the last step's): the same training draws
    torch.manual_seed(SEED * 1000 + 777 + 0)
    expected = torch.rand(()).item()
    assert evaluator.draws == [expected] * 5  # the same seed at every evaluation
