"""End-to-end training with the real deepspeed launcher on 2 CPU processes (gloo, ep_size=2):
loss falls, metrics/report written, kill -9 exact resume, ep_size change, export equality."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_util import REPO, deepspeed_launch, free_port

DS_CONFIG = str(REPO / "ds_configs/cpu_zero1_fp32.json")


def write_recipe(path: Path, data_dir: Path, out: Path, ep: int = 2, steps: int = 30,
                 checkpoint_every: int = 10) -> Path:
    recipe = {
        "data": {"dir": str(data_dir), "composition": {"image_text": 6, "text": 1, "image": 1}, "max_length": 48,
                 "eval_batches": 2, "ranking_images": 20, "retrieval_candidates": 12},
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                  "moe_intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": {"image": 1, "text": 2},
                  "moe_layer_frequency": 2, "max_position_embeddings": 64, "image_loss_coef": 0.1,
                  "router": {"mode": "modality_bias", "capacity_factor": 1.0, "modality_load_balance_coef": 0.01,
                             "drop_policy": "random"}},
        "train": {"output_dir": str(out), "steps": steps, "expert_parallel_size": ep, "log_every": 1, "eval_every": 15,
                  "checkpoint_every": checkpoint_every, "keep_last": 5, "progress_bar": False}}
    path.write_text(json.dumps(recipe))
    return path


def train(recipe: Path) -> None:
    deepspeed_launch(["mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG], module=True)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def set_latest(run: Path, tag: str) -> None:
    (run / "checkpoints" / "latest").write_text(tag)


@pytest.fixture(scope="module")
def run_a(small_dataset, tmp_path_factory):
    """The uninterrupted reference: 30 steps at ep_size=2, checkpoints at 10, 20, 30."""
    base = tmp_path_factory.mktemp("train")
    run = base / "a"
    train(write_recipe(base / "a.json", small_dataset, run))
    return run


def test_training_lowers_loss_and_writes_metrics_and_report(run_a):
    loss = losses(run_a)
    assert sorted(loss) == list(range(1, 31))
    assert sum(loss[s] for s in range(26, 31)) < 0.8 * sum(loss[s] for s in range(1, 6))
    records = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert {"caption_loss", "text_ppl", "caption_rank_acc", "retrieval_r1", "retrieval_r5"} <= set(evals[-1])
    assert evals[-1]["retrieval_candidates"] == evals[-1]["retrieval_queries"] == 12  # 6 distinct captions per rank
    train_record = records[0]
    assert set(train_record["routing"][0]) == {"image", "text"} and "skipped" in train_record
    png = run_a / "report" / "routing_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| image |" in (run_a / "report" / "routing_report.md").read_text()
    events = list((run_a / "tensorboard").rglob("events.out.tfevents*"))
    assert events, "DeepSpeed's monitor wrote no TensorBoard events"
    # routing alarms: in every train record, counted, and mirrored to the monitor as scalars
    for r in (r for r in records if r["kind"] == "train"):
        assert isinstance(r["alarms"], list) and r["alarm_total"] == len(r["alarms"])
        assert r["alarm_total"] == r["alarm_dead_expert"] + r["alarm_monopoly"] + r["alarm_few_experts"]
    assert any(b"train/alarm_total" in p.read_bytes() for p in events)
    tags = sorted(p.name for p in (run_a / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000010", "step00000020", "step00000030"]
    assert (run_a / "checkpoints" / "latest").read_text() == "step00000030"


def train_until_killed(recipe: Path, run: Path, step: int) -> None:
    """Launch the training of `recipe` and kill -9 the whole launch once `step` is in metrics.jsonl."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def train_steps(run: Path) -> list[int]:
    """The step of every train record in metrics.jsonl, in file order (a repeated step shows twice)."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def tensorboard_losses(run: Path) -> list[tuple[int, float]]:
    """(step, value) of `train/loss` as TensorBoard shows it (its restart purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [log_dir] = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents*")}
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars("train/loss")]


def test_kill_9_mid_training_then_resume_gives_identical_losses(run_a, small_dataset, tmp_path):
    """kill -9 before the first checkpoint (restart from scratch), then after the step-20 one (resume):
    every step once in metrics.jsonl and in TensorBoard, the losses those of the uninterrupted run."""
    run = tmp_path / "b"
    recipe = write_recipe(tmp_path / "b.json", small_dataset, run)
    train_until_killed(recipe, run, 5)
    assert not (run / "checkpoints" / "latest").exists() and 5 <= max(losses(run)) < 10
    train_until_killed(recipe, run, 23)  # starts anew: steps 1.. are not appended after the first attempt's
    assert max(losses(run)) < 30
    assert (run / "checkpoints" / "latest").read_text() == "step00000020"
    train(recipe)  # resumes from step 20
    resumed, reference = losses(run), losses(run_a)
    assert train_steps(run) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    shown = tensorboard_losses(run)
    assert [s for s, _ in shown] == list(range(1, 31))
    assert [v for _, v in shown] == pytest.approx([resumed[s] for s in range(1, 31)], rel=1e-6)


def test_checkpoint_moves_between_expert_parallel_sizes(run_a, small_dataset, tmp_path):
    # ep 2 -> 1: resume run A's step-20 checkpoint at ep_size=1; the first loss must match run A's.
    run_c = tmp_path / "c"
    shutil.copytree(run_a / "checkpoints", run_c / "checkpoints")
    set_latest(run_c, "step00000020")
    train(write_recipe(tmp_path / "c.json", small_dataset, run_c, ep=1, steps=23, checkpoint_every=1))
    assert losses(run_c)[21] == pytest.approx(losses(run_a)[21], rel=1e-5)
    kept = sorted(p.name for p in (run_c / "checkpoints").iterdir() if p.is_dir())
    assert "step00000010" not in kept and len(kept) == 5  # keep_last=5 pruned the oldest
    # ep 1 -> 2: resume run C's step-22 checkpoint (written at ep_size=1) at ep_size=2.
    run_d = tmp_path / "d"
    shutil.copytree(run_c / "checkpoints", run_d / "checkpoints")
    set_latest(run_d, "step00000022")
    meta = json.loads((run_d / "checkpoints/step00000022/meta.json").read_text())
    assert meta["ep_size"] == 1
    train(write_recipe(tmp_path / "d.json", small_dataset, run_d, ep=2, steps=23))
    assert losses(run_d)[23] == pytest.approx(losses(run_c)[23], rel=1e-5)


def test_export_of_ep2_checkpoint_matches_training_time_losses(run_a, small_dataset, tmp_path):
    """Export step 20 (ep_size=2) and recompute step 21's loss on both ranks' batches without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from mmoe_ds.config.recipe import DataSection
    from mmoe_ds.export import export
    from mmoe_ds.training.checkpoint import set_rng_state
    from mmoe_ds.training.data_plan import load_processor, make_train_loader

    out = export(run_a / "checkpoints" / "step00000020", tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    model.train()  # training-time routing (train capacity factor), as when the loss was logged
    data = DataSection(dir=str(small_dataset), composition={"image_text": 6, "text": 1, "image": 1}, max_length=48)
    processor = load_processor(data)
    per_rank = []
    for rank in range(2):
        loader = make_train_loader(data, processor, rank, 2, seed=0)
        state = torch.load(run_a / "checkpoints/step00000020" / f"rank{rank}_state.pt", weights_only=False)
        loader.load_state_dict(state["loader"])
        batch = next(iter(loader))
        set_rng_state(state["rng"])  # the recipe drops routes at random: same draws as that rank
        keep = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches")
        with torch.no_grad():
            per_rank.append(model(**{k: batch[k] for k in keep}).loss.item())
    assert sum(per_rank) / 2 == pytest.approx(losses(run_a)[21], rel=1e-5)
    card = (out / "README.md").read_text()
    assert "expert-parallel size 2" in card and (out / "routing_report.png").exists()
    assert (out / "tokenizer.json").exists() and (out / "processor_config.json").exists()
