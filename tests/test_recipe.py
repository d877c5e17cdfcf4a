"""Every invalid configuration fails before any worker starts, naming file, field and fix."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmoe_ds.config.recipe import Recipe, load_ds_config, validate_launch
from mmoe_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = json.loads((REPO / "recipes/demo_cpu.json").read_text())
DS = json.loads((REPO / "ds_configs/cpu_zero1_fp32.json").read_text())


def _recipe(tmp_path, **changes) -> Path:
    raw = json.loads(json.dumps(DEMO))
    for dotted, value in changes.items():
        section, key, *rest = dotted.split("__")
        target = raw[section]
        if rest:
            target = target.setdefault(key, {})
            key = rest[0]
        target[key] = value
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


def _ds(tmp_path, **changes) -> Path:
    raw = dict(DS, **changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    return path


def check(recipe_path, ds_path, world_size=2):
    return validate_launch(Recipe.load(recipe_path), load_ds_config(ds_path), str(ds_path), world_size)


@pytest.mark.parametrize("recipe_changes,ds_changes,world,words", [
    ({"model__num_local_experts": 5}, {}, 2, ["expert_parallel_size=2", "num_local_experts=5"]),
    ({"train__expert_parallel_size": 4, "model__num_local_experts": 8}, {}, 2, ["expert_parallel_size=4", "world size 2"]),  # noqa: E501
    ({}, {"zero_optimization": {"stage": 3}}, 2, ["ds.json", "stage=3", "stage 0, 1 or 2"]),
    ({}, {"train_micro_batch_size_per_gpu": 16}, 2, ["train_micro_batch_size_per_gpu=16", "composition", "8"]),
    ({}, {"train_batch_size": 20}, 2, ["train_batch_size=20", "gradient_accumulation_steps"]),
    ({"data__composition": {"image_text": 6, "video": 2}}, {}, 2, ["data.composition", "video"]),
    ({"model__router__modalities": ["text", "image"]}, {}, 2, ["model.router.modalities", "['image', 'text']"]),
    ({"model__ep_size": 2}, {}, 2, ["model.ep_size", "expert_parallel_size"]),
    ({"train__steps": 0}, {}, 2, ["train.steps", ">= 1"]),
    ({"train__stpes": 10}, {}, 2, ["train.stpes", "valid"]),
    ({}, {"bf16": {"enabled": True}, "fp16": {"enabled": True}}, 2, ["fp16.enabled", "bf16.enabled"]),
    ({"data__retrieval_candidates": 1}, {}, 2, ["data.retrieval_candidates", ">= 2"]),
    ({"data__eval_metrics": ["bleu"]}, {}, 2, ["data.eval_metrics", "retrieval", "bleu"]),
    ({"data__max_caption_bytes": 0}, {}, 2, ["data.max_caption_bytes", ">= 1"]),
])
def test_invalid_configuration_is_named(tmp_path, recipe_changes, ds_changes, world, words):
    with pytest.raises(ConfigError) as err:
        check(_recipe(tmp_path, **recipe_changes), _ds(tmp_path, **ds_changes), world)
    message = str(err.value)
    for w in words:
        assert w in message, message
    assert str(tmp_path) in message  # the file is named


def test_router_errors_surface_at_model_config(tmp_path):
    from mmoe_ds.model import MmoeConfig

    recipe = Recipe.load(_recipe(tmp_path, model__router__capacity_factor=0))
    with pytest.raises(ValueError, match="capacity_factor"):
        MmoeConfig(**recipe.model)


def test_every_shipped_recipe_and_ds_config_is_valid():
    from mmoe_ds.model import MmoeConfig

    for recipe_path in sorted(p for p in (REPO / "recipes").rglob("*.json") if "experiments" not in p.parts):
        recipe = Recipe.load(recipe_path)
        MmoeConfig(**recipe.model)
        world = max(2, recipe.train.expert_parallel_size)
        for ds_path in sorted((REPO / "ds_configs").glob("*.json")):
            config = validate_launch(recipe, load_ds_config(ds_path), str(ds_path), world)
            assert config["train_micro_batch_size_per_gpu"] == recipe.micro_batch_size


def test_check_cli_fails_before_any_worker(tmp_path):
    bad = _ds(tmp_path, zero_optimization={"stage": 3})
    proc = subprocess.run([sys.executable, "-m", "mmoe_ds.train", "--check", "--recipe", str(REPO / "recipes/demo_cpu.json"),  # noqa: E501
                           "--deepspeed_config", str(bad), "--world_size", "2"], capture_output=True, text=True, cwd=REPO)  # noqa: E501
    assert proc.returncode == 2 and "zero_optimization.stage=3" in proc.stderr
    # the check itself never imports DeepSpeed
    probe = subprocess.run([sys.executable, "-c", "import sys, mmoe_ds.train as t; "
                            "sys.exit(t.main(['--check', '--recipe', 'recipes/demo_cpu.json', '--deepspeed_config', "
                            "'ds_configs/cpu_zero1_fp32.json', '--world_size', '2']) or ('deepspeed' in sys.modules))"],
                           capture_output=True, text=True, cwd=REPO)
    assert probe.returncode == 0, probe.stdout + probe.stderr
