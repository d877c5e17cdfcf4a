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
from mmoe_ds.moe.experts import to_per_expert
from mmoe_ds.training.data_plan import load_processor, make_train_loader

COMPOSITION = {"image_text": 4, "text": 1, "image": 1}
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2},
             moe_layer_frequency=1, max_position_embeddings=64, image_loss_coef=0.1,
             router={"mode": "modality_bias", "drop_tokens": False, "modality_load_balance_coef": 0.01})
GATES = [f"model.layers.{i}.ffn.deepspeed_moe.gate.{p}" for i in (0, 1) for p in ("modality_bias", "wg.weight")]
EXPERT = "model.layers.{}.ffn.deepspeed_moe.experts.deepspeed_experts.{}.{}.weight"
EXPERTS_OF = "model.layers.{}.ffn.deepspeed_moe.experts.*"  # every expert of a layer: its w13 and w2


def experts_of(layer: int, ids) -> list[str]:
    """Per-expert names of `ids` in `layer`, as an export names them."""
    return [EXPERT.format(layer, e, w) for e in ids for w in ("w1", "w3", "w2")]


def reference_state(model: MmoeForCausalLM) -> dict[str, torch.Tensor]:
    """`model`'s state dict with per-expert names (as the export holds it)."""
    return to_per_expert(model.state_dict())
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
    """ep 2, ZeRO-1: routers frozen, plus every expert of layer 1 (global 0, 1 on rank 0; 2, 3 on rank 1)."""
    base = tmp_path_factory.mktemp("ep2")
    freeze = ["*.deepspeed_moe.gate.*", EXPERTS_OF.format(1)]
    recipe = write_recipe(base / "r.json", small_dataset, base / "run", source, ep=2, freeze=freeze, checkpoint_every=2)
    return base, recipe, launch(recipe, ds_config(base, 1), base / "w")


def test_ep2_starts_from_the_export_and_frozen_params_stay_out_of_the_optimizer(ep2_run, source, small_dataset):
    base, _, ranks = ep2_run
    exported = MmoeForCausalLM.from_pretrained(source)
    reference = reference_state(exported)
    before, after = merged(ranks, "before"), merged(ranks, "after")
    assert set(before) == set(reference)  # the two ranks' experts together are the whole model, by global id
    for name, value in before.items():
        assert torch.equal(value, reference[name]), name
    assert [r["ep_rank"] for r in ranks] == [0, 1]
    layer1 = "model.layers.1.ffn.deepspeed_moe.experts."
    for r, ids in zip(ranks, ([0, 1], [2, 3])):
        assert r["frozen"] == sorted(GATES + experts_of(1, ids))
        assert r["frozen_parameters"] == sorted(GATES + [layer1 + "w13", layer1 + "w2"])
        assert set(r["in_optimizer"]) == set(r["before"]) - set(r["frozen"])
    frozen = GATES + experts_of(1, range(4))
    for name in frozen:
        assert torch.equal(after[name], reference[name]), name
    moved = [n for n in before if n not in frozen and not torch.equal(after[n], before[n])]
    assert len(moved) == len(before) - len(frozen)  # every other tensor trained, layer 0's experts each on its own
    assert losses(base / "run")[1] == pytest.approx(first_step_loss(exported, small_dataset), rel=1e-5)


def test_a_checkpoint_takes_precedence_over_init_from(ep2_run, source, small_dataset, tmp_path):
    """Resume at step 2 (as after a kill there): the run continues from its checkpoint, not from the
    export, and steps 3-4 repeat the uninterrupted run's losses."""
    base, _, _ = ep2_run
    run = tmp_path / "run"
    shutil.copytree(base / "run" / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step00000002")
    freeze = ["*.deepspeed_moe.gate.*", EXPERTS_OF.format(1)]
    recipe = write_recipe(tmp_path / "r.json", small_dataset, run, source, ep=2, freeze=freeze, checkpoint_every=2)
    ranks = launch(recipe, ds_config(tmp_path, 1), tmp_path / "w")
    assert [r["resumed_from"] for r in ranks] == [2, 2]
    reference = losses(base / "run")
    resumed = losses(run)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_ep1_zero2_reinit_changes_exactly_the_matched_params(source, small_dataset, tmp_path):
    frozen_experts = experts_of(0, range(4))
    recipe = write_recipe(tmp_path / "r.json", small_dataset, tmp_path / "run", source, ep=1,
                          freeze=[EXPERTS_OF.format(0)], reinit=["*.deepspeed_moe.gate.*"],
                          model={"router_aux_loss_coef": 0.5})
    ranks = launch(recipe, ds_config(tmp_path, 2), tmp_path / "w")
    exported = MmoeForCausalLM.from_pretrained(source)
    reference = reference_state(exported)
    for r in ranks:
        assert set(r["before"]) == set(reference)
        changed = sorted(n for n, v in r["before"].items() if not torch.equal(v, reference[n]))
        assert changed == sorted(GATES)
        assert r["frozen"] == sorted(frozen_experts)
        assert set(r["in_optimizer"]) == set(reference) - set(frozen_experts)
    for name in GATES:  # the fresh init (std 0.02 or zeros), not the export's (std ~0.3)
        assert torch.equal(ranks[0]["before"][name], ranks[1]["before"][name])
        assert ranks[0]["before"][name].std() < 0.05 < reference[name].std()
    for name in frozen_experts:
        assert torch.equal(ranks[0]["after"][name], reference[name])
    assert not torch.equal(ranks[0]["after"][EXPERT.format(1, 0, "w1")], reference[EXPERT.format(1, 0, "w1")])
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


def ep2_rank_model(src, rank: int) -> MmoeForCausalLM:
    """What expert-parallel rank `rank` of 2 builds (DeepSpeed backend: 2 of the 4 experts per layer), seeded."""
    torch.manual_seed(rank)
    return MmoeForCausalLM(MmoeConfig(**src.config, moe_backend="deepspeed", ep_size=2))


def test_freezing_part_of_a_layers_experts_is_refused_and_all_of_them_freezes_its_3d_weights(source):
    """requires_grad is per tensor and a layer's experts are two tensors (w13, w2): one expert, or w1
    without w3, cannot be frozen; every rank refuses alike, whether it holds the expert or not."""
    from mmoe_ds.training.init_from import freeze, read_init_source

    src = read_init_source(source)
    layer = "model.layers.1.ffn.deepspeed_moe"
    for rank in (0, 1):  # global expert 3 lives on rank 1
        one = rf"{layer}\.experts\.deepspeed_experts\.3\.\*\.weight"
        with pytest.raises(ConfigError, match=rf"train\.freeze: pattern '{one}' "
                                              rf"covers part of the experts of {layer}: 2 of the 8 per-expert weights "
                                              rf"held in {layer}\.experts\.w13 .*e\.g\. '{layer}\.experts\.\*', "
                                              rf"or none of them"):
            freeze(ep2_rank_model(src, rank), [EXPERT.format(1, 3, "*")], rank, 2, 2)
        with pytest.raises(ConfigError, match=r"pattern '\*\.deepspeed_experts\.\*\.w1\.weight' covers part of the "
                                              r"experts of model\.layers\.0\.ffn\.deepspeed_moe"):
            freeze(ep2_rank_model(src, rank), ["*.deepspeed_experts.*.w1.weight"], rank, 2, 2)
    for pattern in (EXPERTS_OF.format(1), f"{layer}.experts.deepspeed_experts.*"):
        model = ep2_rank_model(src, 1)
        assert freeze(model, [pattern], 1, 2, 2) == [f"{layer}.experts.w13", f"{layer}.experts.w2"]
        assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == [
            f"{layer}.experts.w13", f"{layer}.experts.w2"]
    model = ep2_rank_model(src, 0)  # a 3-D weight by its own name: every expert's w1 and w3 of every layer
    assert freeze(model, ["*.experts.w13"], 0, 2, 2) == [f"model.layers.{i}.ffn.deepspeed_moe.experts.w13"
                                                          for i in (0, 1)]


def test_each_global_expert_is_loaded_into_its_slice_and_reinit_keeps_the_fresh_slice(source):
    """EP 2, rank 1: local experts 0, 1 are global 2, 3. The folder's expert 2 goes to w13[0] (w1 in the
    first f rows, w3 in the rest) and w2[0]; expert 3 of layer 1 is re-initialised (its fresh slice
    stays), and so is every expert's w1 / w3 of layer 0 through the 3-D weight's name."""
    from safetensors.torch import load_file

    from mmoe_ds.training.init_from import load_init_weights, read_init_source

    src = read_init_source(source)
    disk = load_file(str(source / "model.safetensors"))
    model = ep2_rank_model(src, 1)
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    reinit = [EXPERT.format(1, 3, "*"), "model.layers.0.ffn.deepspeed_moe.experts.w13"]
    report = load_init_weights(model, src, 1, 2, reinit)
    assert report.reinitialised == sorted(experts_of(1, [3]) + [EXPERT.format(0, e, w) for e in (2, 3)
                                                                for w in ("w1", "w3")])
    assert not set(report.loaded) & set(report.reinitialised)
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.ffn.deepspeed_moe.experts."
        experts = model.get_submodule(prefix[:-1])
        for local, glob in ((0, 2), (1, 3)):
            w1_w3_fresh = layer == 0 or glob == 3
            expect_w13 = fresh[prefix + "w13"][local] if w1_w3_fresh else torch.cat(
                [disk[EXPERT.format(layer, glob, "w1")], disk[EXPERT.format(layer, glob, "w3")]])
            w2_fresh = (layer, glob) == (1, 3)
            expect_w2 = fresh[prefix + "w2"][local] if w2_fresh else disk[EXPERT.format(layer, glob, "w2")]
            assert torch.equal(experts.w13[local], expect_w13), (layer, glob)
            assert torch.equal(experts.w2[local], expect_w2), (layer, glob)
        assert not torch.equal(experts.w2[0], disk[EXPERT.format(layer, 0, "w2")])  # global 2, not rank 0's expert 0
    assert torch.equal(model.get_parameter(GATES[1]), disk[GATES[1]])  # dense weights too


def test_check_takes_per_expert_patterns_and_refuses_part_of_a_layers_experts(source, small_dataset, tmp_path,
                                                                             capsys):
    """`--check` (before any launch) judges freeze / reinit patterns as the run does: per-expert names
    are the export's names, so a pattern over them is valid; freezing one expert is refused there."""
    from mmoe_ds.training.main import main

    config = str(REPO / "ds_configs/cpu_zero1_fp32.json")
    every = "model.layers.1.ffn.deepspeed_moe.experts.deepspeed_experts.*"
    recipe = write_recipe(tmp_path / "a.json", small_dataset, tmp_path / "run", source, ep=2, freeze=[every],
                          reinit=[EXPERT.format(0, 3, "*")])
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "2"]) == 0
    capsys.readouterr()
    recipe = write_recipe(tmp_path / "b.json", small_dataset, tmp_path / "run", source, ep=2,
                          freeze=[EXPERT.format(1, 3, "*")])
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "2"]) == 2
    err = capsys.readouterr().err
    assert "covers part of the experts of model.layers.1.ffn.deepspeed_moe" in err
    assert "'model.layers.1.ffn.deepspeed_moe.experts.*', or none of them" in err


def test_the_gpu_recipe_passes_check_on_8_processes_without_any_weights(tmp_path, capsys, monkeypatch):
    """recipes/upcycle_gpu.json: before the models are fetched, and with only the config.json that
    `mmoe-ds upcycle` writes for Qwen2-1.5B + SigLIP base (built from their public shapes, no weights).
    Run from an empty folder: the recipe's relative data.dir (data/embedded) is not prepared there, as on
    a fresh GPU node, whether or not this checkout's own data/embedded exists (`make demo` builds it)."""
    from types import SimpleNamespace

    from transformers import Qwen2Config, SiglipVisionConfig

    from mmoe_ds.export.upcycle import PreparedTokenizer, UpcycleOptions, build_config
    from mmoe_ds.model.vision import vision_config_from_pretrained
    from mmoe_ds.training.main import main

    config = str(REPO / "ds_configs/finetune_zero1_bf16.json")
    recipe_file = str(REPO / "recipes/upcycle_gpu.json")
    monkeypatch.chdir(tmp_path)
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


def test_check_with_prepared_data_and_init_from_still_to_fetch_defers_the_model_to_that_folder(
        tmp_path, capsys, small_dataset):
    """Data prepared (e.g. after `make demo`) but train.init_from not fetched yet: the model's shape is
    the folder's, unknown before it arrives, so `--check` does not build one from the recipe's overrides
    (which once refused the 8-expert GPU recipe as '4 experts not divisible by ep_size 8')."""
    from mmoe_ds.training.main import main

    recipe = write_recipe(tmp_path / "r.json", small_dataset, tmp_path / "run", tmp_path / "not_fetched_yet", ep=8)
    config = str(REPO / "ds_configs/finetune_zero1_bf16.json")
    assert main(["--check", "--recipe", str(recipe), "--deepspeed_config", config, "--world_size", "8"]) == 0
    assert f"init_from: {tmp_path / 'not_fetched_yet'} is not there yet" in capsys.readouterr().out
