"""Issue 8, acceptance 2: a user's folder of image+caption pairs (no text-only, no image-only
samples, no labels) goes through `mmoe-ds prepare --source folder`, passes `train --check`, trains
to its final step on 2 processes with the real deepspeed launcher, evaluates (retrieval among the
test captions), checkpoints and exports; `--check` rejects, before launch, a recipe the data cannot
serve. And an evaluation that fails never costs a checkpoint nor leaves the ranks out of step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch_util import REPO, deepspeed_launch
from PIL import Image

DS_CONFIG = str(REPO / "ds_configs/cpu_zero1_fp32.json")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = 6


def run_cli(*args: str, module: str = "mmoe_ds.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    """300 scikit-learn digits as a user would have them: digit_N/NNNN.png + NNNN.txt captions."""
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("folder")
    digits = load_digits()
    for i in range(300):
        label = int(digits.target[i])
        folder = base / "digits" / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.BILINEAR).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"a handwritten digit {WORDS[label]}\n")
    out = base / "prepared"
    proc = run_cli("prepare", "--source", "folder", "--input", str(base / "digits"), "--out", str(out),
                   "--samples-per-shard", "100", "--max-length", "32", "--vocab-size", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["text"] == counts["train"]["image"] == 0 and counts["test"]["image_text"] >= 8
    return out


def write_recipe(path: Path, data_dir: Path, out: Path, composition: dict, **data_fields) -> Path:
    recipe = {
        "data": {"dir": str(data_dir), "composition": composition, "max_length": 32, "eval_batches": 1,
                 "retrieval_candidates": 8, "prepare_if_missing": False, **data_fields},
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                  "moe_intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": {"image": 1, "text": 2},
                  "moe_layer_frequency": 2, "max_position_embeddings": 48},
        "train": {"output_dir": str(out), "steps": STEPS, "expert_parallel_size": 2, "log_every": 1,
                  "eval_every": STEPS, "checkpoint_every": 3, "keep_last": 5, "progress_bar": False}}
    path.write_text(json.dumps(recipe))
    return path


def check(recipe: Path) -> subprocess.CompletedProcess:
    """`train --check` in a fresh interpreter that then reports whether DeepSpeed was imported."""
    code = ("import sys, mmoe_ds.train as t; rc = t.main(['--check', '--recipe', sys.argv[1], '--deepspeed_config', "
            "sys.argv[2], '--world_size', '2']); print('deepspeed imported' if 'deepspeed' in sys.modules else "
            "'deepspeed not imported'); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, str(recipe), DS_CONFIG], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_check_passes_and_says_what_evaluation_measures(folder_data, tmp_path):
    proc = check(write_recipe(tmp_path / "r.json", folder_data, tmp_path / "run", {"image_text": 8}))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout and "deepspeed not imported" in proc.stdout
    assert "evaluation: caption_loss, retrieval (among up to 8 test captions)" in proc.stdout
    assert "text_ppl (no 'text' samples in split 'validation')" in proc.stdout  # named as not measured


def test_check_rejects_before_deepspeed_is_imported(folder_data, tmp_path):
    proc = check(write_recipe(tmp_path / "r.json", folder_data, tmp_path / "run", {"image_text": 7, "text": 1}))
    assert proc.returncode == 2 and "deepspeed not imported" in proc.stdout
    assert "'text' (1 per batch; no samples)" in proc.stderr


@pytest.mark.parametrize("composition,fields,words", [
    ({"image_text": 7, "text": 1}, {}, ["split 'train'", "'text' (1 per batch; no samples)",
                                        'set data.composition to {"image_text": 8}']),
    ({"image_text": 6, "text": 1, "image": 1}, {}, ["'text' (1 per batch; no samples)",
                                                    "'image' (1 per batch; no samples)"]),
    ({"image_text": 8}, {"eval_metrics": ["caption_loss", "text_ppl"]},
     ["data.eval_metrics asks for text_ppl", "no 'text' samples in split 'validation'", "remove 'text_ppl'"]),
])
def test_check_rejects_what_the_data_cannot_serve(folder_data, tmp_path, capsys, composition, fields, words):
    from mmoe_ds.training.main import main

    recipe = write_recipe(tmp_path / "r.json", folder_data, tmp_path / "run", composition, **fields)
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG, "--world_size", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmoe-ds train: configuration error: "), lines
    assert str(folder_data) in lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_folder_dataset_trains_to_the_end_evaluates_checkpoints_and_exports(folder_data, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.json", folder_data, run, {"image_text": 8})
    deepspeed_launch(["mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG], module=True)
    recs = records(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, STEPS + 1))
    (final,) = [r for r in recs if r["kind"] == "eval"]
    assert final["step"] == STEPS
    assert final["retrieval_candidates"] == 8 and final["retrieval_queries"] == 8  # 4 per rank
    assert 0.0 <= final["retrieval_r1"] <= final["retrieval_r5"] <= 1.0
    assert final["retrieval_r1"] * 8 == pytest.approx(round(final["retrieval_r1"] * 8))  # hits out of 8 queries
    assert np.isfinite(final["caption_loss"]) and final["caption_loss"] > 0
    assert "text_ppl" not in final and "caption_rank_acc" not in final  # no text-only data, no labels
    assert set(recs[0]["skipped"]) >= {"corrupt_tar", "bad_image"} and sum(recs[-2]["skipped"].values()) == 0
    assert (run / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    meta = json.loads((run / "checkpoints" / f"step{STEPS:08d}" / "meta.json").read_text())
    assert meta["metrics"]["retrieval_r1"] == final["retrieval_r1"]  # the step's own evaluation
    export_dir = tmp_path / "export"
    proc = run_cli("export", str(run), str(export_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (export_dir / "config.json").exists() and (export_dir / "processor_config.json").exists()
    proc = run_cli("caption", str(export_dir), "--data", str(folder_data), "--num", "6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    captions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(captions) == 6 and len({c["key"] for c in captions}) == 6
    assert len({c["reference"] for c in captions}) >= 3  # drawn across the test split, not its first files


def test_failed_evaluation_keeps_the_checkpoint_and_the_ranks_in_step(folder_data, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.json", folder_data, run, {"image_text": 8})
    raw = json.loads(recipe.read_text())
    raw["train"].update(steps=4, eval_every=1, checkpoint_every=2)
    recipe.write_text(json.dumps(raw))
    deepspeed_launch([str(REPO / "tests/eval_failure_worker.py"), "--recipe", str(recipe),
                      "--deepspeed_config", DS_CONFIG])
    by_step = {(r["kind"], r["step"]): r for r in records(run) if r["kind"] != "train"}
    assert sorted(by_step) == [("eval", 1), ("eval", 4), ("eval_error", 2), ("eval_error", 3)]
    assert by_step[("eval_error", 2)]["failed_ranks"] == 1  # rank 1 only; rank 0 did not hang
    assert by_step[("eval_error", 3)]["failed_ranks"] == 2
    assert "test double: forward failed" in by_step[("eval_error", 3)]["error"]
    assert "retrieval_r1" in by_step[("eval", 4)]
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000002", "step00000004"]  # step 2's checkpoint survived its failed evaluation
    meta = json.loads((run / "checkpoints/step00000002/meta.json").read_text())
    assert meta["metrics"]["retrieval_r1"] == by_step[("eval", 1)]["retrieval_r1"]  # the last good one


def test_img2dataset_shards_indexed_in_place_train_to_the_end(tmp_path):
    """Issue 8, acceptance 3: shards in img2dataset's layout (KEY.jpg + KEY.txt + KEY.json of
    url/caption fields, no modality) are indexed where they are and trained on, 2 processes, to
    the final step with retrieval evaluated — and the shard files stay byte-for-byte untouched."""
    from foreign_shards import digests, write_img2dataset_shards

    shards = tmp_path / "shards"
    write_img2dataset_shards(shards, shards=4, samples=30)  # train
    write_img2dataset_shards(shards, shards=1, samples=16, first=4)  # validation
    write_img2dataset_shards(shards, shards=1, samples=16, first=5)  # test
    before = digests(shards)
    data = tmp_path / "indexed"
    proc = run_cli("index", "--train", str(shards / "shard-{00000..00003}.tar"), "--validation",
                   str(shards / "shard-00004.tar"), "--test", str(shards / "shard-00005.tar"), "--out", str(data),
                   "--image-size", "32", "--patch-size", "8", "--max-length", "32", "--vocab-size", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.json", data, run, {"image_text": 8})
    assert check(recipe).returncode == 0
    deepspeed_launch(["mmoe_ds.train", "--recipe", str(recipe), "--deepspeed_config", DS_CONFIG], module=True)
    recs = records(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, STEPS + 1))
    (final,) = [r for r in recs if r["kind"] == "eval"]
    assert final["step"] == STEPS and final["retrieval_candidates"] == 8 and 0 <= final["retrieval_r1"] <= 1
    assert all(sum(r["skipped"].values()) == 0 for r in recs if r["kind"] == "train")
    assert digests(shards) == before and sorted(p.name for p in data.iterdir()) == ["manifest.json", "processor"]
