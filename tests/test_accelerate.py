"""`accelerate launch --use_deepspeed` as the launcher: 2 CPU processes, expert-parallel size 2.

accelerate starts the workers with torchrun and hands its DeepSpeed settings over as ACCELERATE_*
variables; the trainer takes the config file from there and checkpoints through its own
`checkpoint.save` (DeepSpeed's per-expert files), never accelerate's rank-local `save_model`.
The launcher is run as `python -m accelerate.commands.launch`, which is what the `accelerate
launch` console script calls, so that it is this interpreter's accelerate.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launch_util import LaunchResult, child_env, free_port, run_process
from test_slurm import assert_two_rank_run
from test_training import DS_CONFIG, write_recipe

from mmoe_ds.config.launch_env import deepspeed_config_path
from mmoe_ds.errors import ConfigError

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")

ZERO3 = "zero_optimization.stage=3 is not supported with DeepSpeed's native MoE"


def accelerate_launch(launch_args: list[str], script_args: list[str], home: Path, timeout: int = 240) -> LaunchResult:
    """`accelerate launch --use_deepspeed --num_processes 2 LAUNCH_ARGS -m mmoe_ds.train SCRIPT_ARGS`; never raises.

    HF_HOME points into the test's folder so that a user's `accelerate config` default file
    cannot change the launch.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
           "--main_process_port", str(free_port())] + launch_args + ["-m", "mmoe_ds.train"] + script_args
    return run_process(cmd, child_env(HF_HOME=str(home)), timeout)


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_accelerate_trains_at_ep2_and_resumes(small_dataset, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=2, steps=2, checkpoint_every=2)
    first = accelerate_launch(["--deepspeed_config_file", DS_CONFIG], ["--recipe", str(recipe)], tmp_path)
    assert_two_rank_run(run, 2, first)
    assert "resumed from step" not in first.output
    first_losses = {r["step"]: r["loss"] for r in train_records(run)}

    write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=2, steps=4, checkpoint_every=2)
    second = accelerate_launch(["--deepspeed_config_file", DS_CONFIG], ["--recipe", str(recipe)], tmp_path)
    assert_two_rank_run(run, 4, second)  # steps 1..4 exactly once: 3 and 4 appended after the saved 2
    assert "[mmoe-ds] resumed from step 2 (written at ep_size=2)" in second.output
    assert "[mmoe-ds] checkpoint step00000002" not in second.output  # steps 1-2 were not trained again
    assert {r["step"]: r["loss"] for r in train_records(run) if r["step"] <= 2} == first_losses


def test_accelerate_refuses_zero3_before_training(small_dataset, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.json", small_dataset, run, ep=2, steps=2)
    zero3 = dict(json.loads(Path(DS_CONFIG).read_text()), zero_optimization={"stage": 3})
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    result = accelerate_launch(["--deepspeed_config_file", str(tmp_path / "zero3.json")], ["--recipe", str(recipe)],
                               tmp_path, timeout=120)
    assert result.returncode != 0, result.failure_message()
    errors = [line for line in result.output.splitlines() if line.startswith("mmoe-ds train: configuration error:")]
    assert len(errors) == 2, result.output  # one line per worker
    assert errors[0] == (f"mmoe-ds train: configuration error: {tmp_path / 'zero3.json'}: {ZERO3} "
                         "(expert parallelism); use stage 0, 1 or 2.")
    assert "ep_size_2" not in result.output and not run.exists()  # DeepSpeed never initialised, nothing written


def test_accelerate_zero_stage_3_flag_is_refused():
    """`accelerate launch --zero_stage 3` reaches the workers as ACCELERATE_DEEPSPEED_ZERO_STAGE=3."""
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
               "ACCELERATE_DEEPSPEED_CONFIG_FILE": DS_CONFIG}
    with pytest.raises(ConfigError) as info:
        deepspeed_config_path(None, environ)
    assert str(info.value) == f"accelerate launch --zero_stage 3: {ZERO3} (expert parallelism); use stage 0, 1 or 2."


def test_config_path_comes_from_accelerate_when_not_given():
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no",
               "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero2_bf16.json"}
    assert deepspeed_config_path(None, environ) == "ds_configs/zero2_bf16.json"
    assert deepspeed_config_path("ds_configs/zero2_bf16.json", environ) == "ds_configs/zero2_bf16.json"
    assert deepspeed_config_path("ds_configs/zero0_fp32.json", {}) == "ds_configs/zero0_fp32.json"


@pytest.mark.parametrize("cli, environ, expected", [
    (None, {}, "no DeepSpeed config; pass --deepspeed_config"),
    ("ds_configs/zero1_fp32.json", {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero2_fp32.json"},
     "two DeepSpeed configs: --deepspeed_config ds_configs/zero1_fp32.json and accelerate's --deepspeed_config_file "
     "ds_configs/zero2_fp32.json; pass one of them."),
    (None, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "x.json"},
     "accelerate launch --gradient_accumulation_steps, --mixed_precision: this trainer takes DeepSpeed settings only"),
])
def test_config_path_errors_name_the_fix(cli, environ, expected):
    with pytest.raises(ConfigError) as info:
        deepspeed_config_path(cli, environ)
    assert str(info.value).startswith(expected)
