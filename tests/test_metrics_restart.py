"""metrics.jsonl and TensorBoard after a restart (issue 23): every step once.

A run that stops and starts again continues after its last checkpoint's step (0 without one);
`MetricsWriter.restart` must drop what the stopped attempt logged past that step, in the file and
in TensorBoard (read back with TensorBoard's own EventAccumulator). The end-to-end kill -9 runs
are in tests/test_training.py."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from mmoe_ds.training.metrics_writer import MetricsWriter


class TensorBoardOnly:
    """DeepSpeed's MonitorMaster with TensorBoard alone, as `engine.monitor` lays it out (a
    `tb_monitor` whose `summary_writer` is torch's SummaryWriter), one writer per attempt."""
    enabled = True

    def __init__(self, log_dir: Path, attempt: int):
        self.tb_monitor = SimpleNamespace(summary_writer=SummaryWriter(str(log_dir), filename_suffix=f".{attempt}"))

    def write_events(self, events):
        for event in events:
            self.tb_monitor.summary_writer.add_scalar(*event)
        self.tb_monitor.summary_writer.flush()


def attempt(out: Path, number: int, resume_step: int, steps: range) -> None:
    writer = MetricsWriter(out / "metrics.jsonl", enabled=True, monitor=TensorBoardOnly(out / "tb", number))
    writer.restart(resume_step)
    for step in steps:
        writer.write({"kind": "train", "step": step, "loss": 100.0 * number + step})
        if step % 4 == 0:
            writer.write({"kind": "eval", "step": step, "caption_loss": 10.0 * number + step})
    writer.monitor.tb_monitor.summary_writer.close()


def logged(out: Path, kind: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "loss" if kind == "train" else "caption_loss"
    return [(r["step"], r[key]) for r in records if r["kind"] == kind]


def shown(out: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_restart_without_a_checkpoint_starts_anew(tmp_path):
    attempt(tmp_path, 1, 0, range(1, 6))  # killed at step 5, before its first checkpoint
    attempt(tmp_path, 2, 0, range(1, 9))
    expected = [(s, 200.0 + s) for s in range(1, 9)]
    assert logged(tmp_path, "train") == expected and shown(tmp_path, "train/loss") == expected
    assert logged(tmp_path, "eval") == [(4, 24.0), (8, 28.0)] == shown(tmp_path, "eval/caption_loss")


def test_restart_after_a_checkpoint_keeps_the_steps_up_to_it(tmp_path):
    attempt(tmp_path, 1, 0, range(1, 11))  # checkpoint at 4 (its eval logged), killed at step 10
    attempt(tmp_path, 2, 4, range(5, 13))
    expected = [(s, 100.0 + s) for s in range(1, 5)] + [(s, 200.0 + s) for s in range(5, 13)]
    assert logged(tmp_path, "train") == expected and shown(tmp_path, "train/loss") == expected
    assert logged(tmp_path, "eval") == [(4, 14.0), (8, 28.0), (12, 32.0)] == shown(tmp_path, "eval/caption_loss")


def test_a_line_cut_short_by_the_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + '\n{"kind": "train", "st')
    MetricsWriter(path, enabled=True).restart(3)
    assert path.read_text() == json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n"


@pytest.mark.parametrize("step", [0, 7])
def test_other_ranks_leave_the_file_alone(tmp_path, step):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 9}\n')
    MetricsWriter(path, enabled=False).restart(step)
    assert path.read_text() == '{"kind": "train", "step": 9}\n'
