"""train.init_from / train.freeze / train.reinit through the real trainer on 2 CPU processes.

The source is an export (`save_export`, what `mmoe-ds export` writes) of a tiny model whose weights
are far from any fresh initialisation. Expectations come from that export loaded with plain
`from_pretrained` on the same batches, and from hand-listed parameter names, never from the trainer.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch_util import REPO, deepspeed_launch

from mmoe_ds.config.recipe import DataSection, Recipe
from mmoe_ds.data import MmoeProcessor
from mmoe_ds.errors import ConfigError
from mmoe_ds.export import save_export
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.training.data_plan import load_processor, make_train_loader

COMPOSITION = {"image_text": 4, "text": 1, "image": 1}
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2},
             moe_layer_frequency=1, max_position_embeddings=64, image_loss_coef=0.1,
             router={"mode": "modality_bias", "drop_tokens": False, "modality_load_balance_coef": 0.01})
GATES = [f"model.layers.{i}.ffn.deepspeed_moe.gate.{p}" for i in (0, 1) for p in ("modality_bias", "wg.weight")]
EXPERT = "model.layers.{}.ffn.deepspeed_moe.experts.deepspeed_experts.{}.{}.weight"
STEPS = 4


def data_section(data_dir) -> DataSection:
    return DataSection(dir=str(data_dir), composition=dict(COMPOSITION), max_length=48)


@pytest.fixture(scope="module")
def source(small_dataset, tmp_path_factory) -> Path:
    """An export of a model whose every weight is its fresh value plus N(0, 0.3) noise (routers decisive)."""
    processor = load_processor(data_section(small_dataset))
    tok = processor.tokenizer
    config = MmoeConfig(**MODEL, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, image_token_id=processor.image_token_id,
                        image_size=processor.image_size, patch_size=processor.patch_size,
                        num_channels=processor.num_channels)
    torch.manual_seed(1234)
    model = MmoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return save_export(model, tmp_path_factory.mktemp("init") / "export", processor_dir=small_dataset / "processor")


def write_recipe(path: Path, data_dir, out: Path, init_from, ep: int, freeze=(), reinit=(), model=None,
                 checkpoint_every: int = STEPS) -> Path:
    recipe = {"data": {"dir": str(data_dir), "composition": COMPOSITION, "max_length": 48, "eval_batches": 1,
                       "retrieval_candidates": 0, "eval_metrics": ["caption_loss"]},
              "model": model or {},
              "train": {"output_dir": str(out), "steps": STEPS, "expert_parallel_size": ep, "log_every": 1,
                        "eval_every": 100, "checkpoint_every": checkpoint_every, "keep_last": 5,
                        "progress_bar": False, "init_from": str(init_from) if init_from else None,
                        "freeze": list(freeze), "reinit": list(reinit)}}
    path.write_text(json.dumps(recipe))
    return path


def ds_config(tmp_path: Path, stage: int) -> Path:
    config = json.loads((REPO / "ds_configs/cpu_zero1_fp32.json").read_text())
    config["zero_optimization"] = dict(config.get("zero_optimization", {}), stage=stage)
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def launch(recipe: Path, config: Path, out_prefix: Path) -> list[dict]:
    deepspeed_launch([str(REPO / "tests/init_from_worker.py"), "--recipe", str(recipe), "--deepspeed_config",
                      str(config), "--out", str(out_prefix)])
    ranks = []
    for r in range(2):
        record = json.loads(Path(f"{out_prefix}.rank{r}.json").read_text())
        record["before"] = torch.load(f"{out_prefix}.rank{r}.before.pt")
        record["after"] = torch.load(f"{out_prefix}.rank{r}.after.pt")
        ranks.append(record)
    return ranks


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def first_step_loss(model: MmoeForCausalLM, data_dir) -> float:
    """The mean over the 2 ranks of `model`'s training-mode loss on each rank's first batch."""
    processor = MmoeProcessor.from_pretrained(Path(data_dir) / "processor")
    model.train()
    total = 0.0
    for rank in range(2):
        batch = next(iter(make_train_loader(data_section(data_dir), processor, rank, 2, seed=0)))
        keep = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches")
        with torch.no_grad():
            total += model(**{k: batch[k] for k in keep}).loss.item()
    return total / 2


def merged(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    out = {}
    for r in ranks:
        out.update(r[key])
    return out


@pytest.fixture(scope="module")
def ep2_run(source, small_dataset, tmp_path_factory):
    """ep 2, ZeRO-1: routers frozen, plus global expert 3 of layer 1 (it lives on rank 1 as local expert 1)."""
    base = tmp_path_factory.mktemp("ep2")
    freeze = ["*.deepspeed_moe.gate.*", EXPERT.format(1, 3, "*")]
    recipe = write_recipe(base / "r.json", small_dataset, base / "run", source, ep=2, freeze=freeze, checkpoint_every=2)
    return base, recipe, launch(recipe, ds_config(base, 1), base / "w")


def test_ep2_starts_from_the_export_and_frozen_params_stay_out_of_the_optimizer(ep2_run, source, small_dataset):
    base, _, ranks = ep2_run
    exported = MmoeForCausalLM.from_pretrained(source)
    reference = exported.state_dict()
    before, after = merged(ranks, "before"), merged(ranks, "after")
    assert set(before) == set(reference)  # the two ranks' experts together are the whole model, by global id
    for name, value in before.items():
        assert torch.equal(value, reference[name]), name
    assert [r["ep_rank"] for r in ranks] == [0, 1]
    frozen_expert = [EXPERT.format(1, 3, w) for w in ("w1", "w3", "w2")]
    assert ranks[0]["frozen"] == sorted(GATES)
    assert ranks[1]["frozen"] == sorted(GATES + frozen_expert)
    for r in ranks:
        names = set(r["before"])
        assert set(r["in_optimizer"]) == names - set(r["frozen"])
    for name in GATES + frozen_expert:
        assert torch.equal(after[name], reference[name]), name
    moved = [n for n in before if n not in GATES + frozen_expert and not torch.equal(after[n], before[n])]
    assert len(moved) == len(before) - len(GATES) - len(frozen_expert)  # every other parameter trained
    assert losses(base / "run")[1] == pytest.approx(first_step_loss(exported, small_dataset), rel=1e-5)


def test_a_checkpoint_takes_precedence_over_init_from(ep2_run, source, small_dataset, tmp_path):
    """Resume at step 2 (as after a kill there): the run continues from its checkpoint, not from the
    export, and steps 3-4 repeat the uninterrupted run's losses."""
    base, _, _ = ep2_run
    run = tmp_path / "run"
    shutil.copytree(base / "run" / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step00000002")
    freeze = ["*.deepspeed_moe.gate.*", EXPERT.format(1, 3, "*")]
    recipe = write_recipe(tmp_path / "r.json", small_dataset, run, source, ep=2, freeze=freeze, checkpoint_every=2)
    ranks = launch(recipe, ds_config(tmp_path, 1), tmp_path / "w")
    assert [r["resumed_from"] for r in ranks] == [2, 2]
    reference = losses(base / "run")
    resumed = losses(run)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_ep1_zero2_reinit_changes_exactly_the_matched_params(source, small_dataset, tmp_path):
    frozen_expert = [EXPERT.format(0, 1, w) for w in ("w1", "w3", "w2")]
    recipe = write_recipe(tmp_path / "r.json", small_dataset, tmp_path / "run", source, ep=1,
                          freeze=[EXPERT.format(0, 1, "*")], reinit=["*.deepspeed_moe.gate.*"],
                          model={"router_aux_loss_coef": 0.5})
    ranks = launch(recipe, ds_config(tmp_path, 2), tmp_path / "w")
    exported = MmoeForCausalLM.from_pretrained(source)
    reference = exported.state_dict()
    for r in ranks:
        assert set(r["before"]) == set(reference)
        changed = sorted(n for n, v in r["before"].items() if not torch.equal(v, reference[n]))
        assert changed == sorted(GATES)
        assert r["frozen"] == sorted(frozen_expert)
        assert set(r["in_optimizer"]) == set(reference) - set(frozen_expert)
    for name in GATES:  # the fresh init (std 0.02 or zeros), not the export's (std ~0.3)
        assert torch.equal(ranks[0]["before"][name], ranks[1]["before"][name])
        assert ranks[0]["before"][name].std() < 0.05 < reference[name].std()
    for name in frozen_expert:
        assert torch.equal(ranks[0]["after"][name], reference[name])
    # step 1 = the export with the re-initialised routers and the overridden aux coefficient
    exported.config.router_aux_loss_coef = 0.5
    with torch.no_grad():
        for name in GATES:
            exported.get_parameter(name).copy_(ranks[0]["before"][name])
    assert losses(tmp_path / "run")[1] == pytest.approx(first_step_loss(exported, small_dataset), rel=1e-5)


# -- errors, without a launch ------------------------------------------------------------------------
def test_recipe_may_override_only_routing_and_loss_fields(tmp_path):
    raw = {"model": {"hidden_size": 64, "router": {"mode": "agnostic"}}, "train": {"init_from": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"model\.hidden_size cannot be changed .*train\.init_from"):
        Recipe.from_dict(raw)
    with pytest.raises(ConfigError, match=r"train\.reinit .*train\.init_from.*not set"):
        Recipe.from_dict({"train": {"reinit": ["*.gate.*"]}})
    with pytest.raises(ConfigError, match=r"train\.freeze must be a list"):
        Recipe.from_dict({"train": {"freeze": "*.gate.*"}})
    Recipe.from_dict({"model": {"router": {"capacity_factor": 2.0}, "num_experts_per_tok": 2},
                      "train": {"init_from": str(tmp_path)}})


def test_check_names_a_missing_or_foreign_init_from(source, small_dataset, tmp_path, capsys):
    from mmoe_ds.training.main import main

    config = str(REPO / "ds_configs/cpu_zero1_fp32.json")
    later = tmp_path / "not_yet"
    recipe = write_recipe(tmp_path / "a.json", small_dataset, tmp_path / "run", later, ep=2)
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "2"]) == 0
    assert f"init_from: {later} is not there yet" in capsys.readouterr().out
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    recipe = write_recipe(tmp_path / "b.json", small_dataset, tmp_path / "run", llama, ep=2)
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "2"]) == 2
    err = capsys.readouterr().err
    assert "a 'llama' model, not an mmoe-ds one" in err and "mmoe-ds upcycle --lm" in err
    recipe = write_recipe(tmp_path / "c.json", small_dataset, tmp_path / "run", source, ep=3)
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "3"]) == 2
    assert "train.expert_parallel_size=3 must divide the 4 experts" in capsys.readouterr().err
    recipe = write_recipe(tmp_path / "d.json", small_dataset, tmp_path / "run", source, ep=2, freeze=["*.router.*"])
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "2"]) == 2
    assert "train.freeze: pattern '*.router.*' matches no parameter" in capsys.readouterr().err  # before any launch


def test_patterns_that_match_nothing_and_weights_that_do_not_fit_are_named(source, tmp_path):
    from mmoe_ds.training.init_from import freeze, load_init_weights, read_init_source

    src = read_init_source(source)

    def model(mode: str) -> MmoeForCausalLM:
        return MmoeForCausalLM(MmoeConfig(**{**src.config, "router": dict(src.config["router"], mode=mode)}))

    agnostic = model("agnostic")
    with pytest.raises(ConfigError, match=r"train\.freeze: pattern '\*\.router\.\*' matches no parameter.*gate"):
        freeze(agnostic, ["*.router.*"], 0, 1, 4)
    with pytest.raises(ConfigError, match=r"holds 2 tensor\(s\) .*no place for .*modality_bias"):
        load_init_weights(agnostic, src, 0, 1, [])  # an agnostic router has no modality bias
    agnostic_src = read_init_source(save_export(agnostic, tmp_path / "agnostic"))
    aware = model("modality_bias")
    with pytest.raises(ConfigError, match=r"no weights for 2 parameter\(s\) .*modality_bias.*train\.reinit"):
        load_init_weights(aware, agnostic_src, 0, 1, [])
    assert load_init_weights(aware, agnostic_src, 0, 1, ["*.modality_bias"]).reinitialised == [
        "model.layers.0.ffn.deepspeed_moe.gate.modality_bias", "model.layers.1.ffn.deepspeed_moe.gate.modality_bias"]
    separate = model("separate_routers")  # one [E, d] router per modality: wg is [8, 32]
    with pytest.raises(ConfigError, match=r"gate\.wg\.weight has shape \[4, 32\] in the folder but \[8, 32\]"):
        load_init_weights(separate, agnostic_src, 0, 1, [])
    load_init_weights(separate, agnostic_src, 0, 1, ["*.gate.wg.weight"])


def test_the_gpu_recipe_passes_check_on_8_processes_without_any_weights(tmp_path, capsys):
    """recipes/upcycle_gpu.json: before the models are fetched, and with only the config.json that
    `mmoe-ds upcycle` writes for Qwen2-1.5B + SigLIP base (built from their public shapes, no weights)."""
    from types import SimpleNamespace

    from transformers import Qwen2Config, SiglipVisionConfig

    from mmoe_ds.export.upcycle import PreparedTokenizer, UpcycleOptions, build_config
    from mmoe_ds.model.vision import vision_config_from_pretrained
    from mmoe_ds.training.main import main

    config = str(REPO / "ds_configs/finetune_zero1_bf16.json")
    recipe_file = str(REPO / "recipes/upcycle_gpu.json")
    assert main(["--check", "--recipe", recipe_file, "--deepspeed_config", config, "--world_size", "8"]) == 0
    assert "init_from: runs/upcycled/qwen2-1.5b-siglip is not there yet" in capsys.readouterr().out

    SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16).save_pretrained(tmp_path / "siglip")
    qwen2 = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                        rope_theta=1e6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
    tokenizer = SimpleNamespace(pad_token_id=151643)  # test double: build_config reads only this
    options = UpcycleOptions(experts=8, top_k=2, moe_layer_frequency=2, router_mode="modality_bias", dtype="bfloat16")
    upcycled = build_config(qwen2, "Qwen2ForCausalLM", PreparedTokenizer(tokenizer, 151646, 151936, []), options,
                            vision_config_from_pretrained(tmp_path / "siglip"))
    upcycled.save_pretrained(tmp_path / "moe")  # config.json only
    recipe = json.loads((REPO / "recipes/upcycle_gpu.json").read_text())
    recipe["train"]["init_from"] = str(tmp_path / "moe")
    (tmp_path / "gpu.json").write_text(json.dumps(recipe))
    assert main(["--check", "--recipe", str(tmp_path / "gpu.json"), "--deepspeed_config", config,
                 "--world_size", "8"]) == 0
    assert f"init_from: {tmp_path / 'moe'} (8 experts, hidden 1536, the data's processor)" in capsys.readouterr().out
    assert main(["--check", "--recipe", str(tmp_path / "gpu.json"), "--deepspeed_config", config,
                 "--world_size", "6"]) == 2  # 6 processes cannot hold expert-parallel groups of 8
