"""The memory and compute plan (`mmoe-ds plan`, `train --check`): exact parameter counts, the ZeRO /
expert-parallel layout against DeepSpeed's own estimator, the upcycled GPU recipe's table, and the
one-line refusal. The optimizer term against a real engine: tests/test_ds_configs.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from launch_util import REPO

from mmoe_ds.config.recipe import Recipe, load_ds_config
from mmoe_ds.errors import ConfigError
from mmoe_ds.training.main import main as train_main
from mmoe_ds.training.plan import count_parameters, parse_bytes, plan_run

DEMO = Recipe.load(REPO / "recipes/demo_cpu.json")
DEMO_MODEL = dict(DEMO.model, vocab_size=64)
BF16_ZERO2 = load_ds_config(REPO / "ds_configs/zero2_bf16.json")


def test_parameter_counts_are_the_models_own():
    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

    counts = count_parameters(DEMO_MODEL, freeze=["*.deepspeed_moe.gate.*"])
    config = MmoeConfig(**DEMO_MODEL)
    model = MmoeForCausalLM(config)
    named = dict(model.named_parameters())
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    per_layer = config.num_local_experts * 3 * config.hidden_size * config.moe_intermediate_size  # w1, w3, w2 each
    gates = sum(p.numel() for n, p in named.items() if ".deepspeed_moe.gate." in n)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.expert_trained == len(moe_layers) * per_layer > 0 and counts.expert_frozen == 0
    assert counts.dense_frozen == gates > 0
    # every expert of one layer, by per-expert names or by the 3-D parameters' names
    first = f"model.layers.{moe_layers[0]}.ffn.deepspeed_moe.experts."
    for pattern in (first + "deepspeed_experts.*", first + "w*"):
        frozen = count_parameters(DEMO_MODEL, freeze=[pattern])
        assert frozen.expert_frozen == per_layer and frozen.expert_trained == (len(moe_layers) - 1) * per_layer
        assert frozen.total == counts.total


def test_freezing_part_of_a_layers_experts_is_refused_with_the_fix():
    layer = "model.layers.1.ffn.deepspeed_moe"
    with pytest.raises(ConfigError, match=rf"pattern '{layer}\.experts\.deepspeed_experts\.3\.\*' covers part of "
                                          rf"the experts of {layer}: 2 of the 8 per-expert weights held in "
                                          rf"{layer}\.experts\.w13 .*e\.g\. '{layer}\.experts\.\*', or none"):
        count_parameters(DEMO_MODEL, freeze=[f"{layer}.experts.deepspeed_experts.3.*"])
    with pytest.raises(ConfigError, match=r"w13 = every expert's w1 and w3"):  # w1 without w3
        count_parameters(DEMO_MODEL, freeze=["*.deepspeed_experts.*.w1.weight"])


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero2_model_states_equal_deepspeeds_estimator_without_expert_parallelism(gpus):
    """DeepSpeed's estimator (no offload): 2·P + 18·P/N bytes at ZeRO-2 in 16-bit precision. At EP 1
    experts are partitioned like dense weights, so the plan's six model-state terms must add up to it."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = plan_run(DEMO_MODEL, BF16_ZERO2, gpus, 1, 8, 48)
    states = sum(v for k, v in plan.terms.items() if not k.startswith("activations"))
    _, expected = estimate_zero2_model_states_mem_needs(plan.params.total, num_gpus_per_node=gpus, cpu_offload=False)
    assert abs(states - expected) <= 8, (states, expected)  # int rounding of six terms


def test_expert_states_are_split_by_the_expert_parallel_and_expert_data_parallel_groups():
    """8 GPUs, EP 4: a GPU holds E/4 experts; their optimizer states are partitioned over the 8/4 = 2
    GPUs of the expert-data-parallel group, the dense ones over all 8."""
    zero1 = dict(BF16_ZERO2, zero_optimization={"stage": 1})
    one = plan_run(DEMO_MODEL, zero1, 8, 1, 8, 48)
    four = plan_run(DEMO_MODEL, zero1, 8, 4, 8, 48)
    experts = one.params.expert_trained
    assert four.terms["weights (experts)"] == experts * 2 // 4
    assert four.terms["optimizer (experts)"] == int(experts / 4 * 12 / 2)
    assert one.terms["optimizer (experts)"] == int(experts * 12 / 8)
    assert four.terms["optimizer (dense)"] == one.terms["optimizer (dense)"] == int(one.params.dense_trained * 12 / 8)
    assert four.terms["gradients (experts)"] == int(experts / 4 * 2 + experts / 4 * 4 / 2)  # ZeRO-1: 16-bit full


def test_activation_terms_grow_with_the_micro_batch_and_flops_count_the_active_experts():
    small, large = plan_run(DEMO_MODEL, BF16_ZERO2, 2, 2, 4, 48), plan_run(DEMO_MODEL, BF16_ZERO2, 2, 2, 8, 48)
    for name in ("activations: attention", "activations: MoE FFN", "activations: embeddings + logits"):
        assert large.terms[name] == 2 * small.terms[name] > 0
    c = small.params
    k = max(DEMO.model["num_experts_per_tok"].values()) if isinstance(DEMO.model.get("num_experts_per_tok"), dict) \
        else DEMO.model.get("num_experts_per_tok", 1)
    per_expert = c.expert_trained * k / DEMO.model["num_local_experts"]
    assert small.flops_per_token["active experts"] == pytest.approx(2 * per_expert)


def upcycled_gpu_recipe(tmp_path, width: int = 1, depth: int = 1):
    """recipes/upcycle_gpu.json pointing at the config.json `mmoe-ds upcycle` writes for Qwen2-1.5B +
    SigLIP base (public shapes, no weights); `width` and `depth` multiply the LM's (a made-up model)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from mmoe_ds.export.upcycle import PreparedTokenizer, UpcycleOptions, build_config
    from mmoe_ds.model.vision import vision_config_from_pretrained

    SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16).save_pretrained(tmp_path / "siglip")
    qwen2 = Qwen2Config(vocab_size=151936, hidden_size=1536 * width, intermediate_size=8960 * width,
                        num_hidden_layers=28 * depth, num_attention_heads=12 * width, num_key_value_heads=2,
                        max_position_embeddings=131072, rope_theta=1e6, tie_word_embeddings=True,
                        bos_token_id=151643, eos_token_id=151643)
    options = UpcycleOptions(experts=8, top_k=2, moe_layer_frequency=2, router_mode="modality_bias", dtype="bfloat16")
    tokenizer = PreparedTokenizer(SimpleNamespace(pad_token_id=151643), 151646, 151936, [])  # build_config reads these
    build_config(qwen2, "Qwen2ForCausalLM", tokenizer, options,
                 vision_config_from_pretrained(tmp_path / "siglip")).save_pretrained(tmp_path / "moe")
    recipe = json.loads((REPO / "recipes/upcycle_gpu.json").read_text())
    recipe["train"]["init_from"] = str(tmp_path / "moe")
    (tmp_path / "gpu.json").write_text(json.dumps(recipe))
    return str(tmp_path / "gpu.json")


CHECK = ["--check", "--deepspeed_config", str(REPO / "ds_configs/finetune_zero1_bf16.json"), "--world_size", "8"]


def test_check_prints_the_per_gpu_table_of_the_upcycled_gpu_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/embedded not prepared here, as on a fresh GPU node, even after `make demo`
    assert train_main([*CHECK, "--recipe", str(REPO / "recipes/upcycle_gpu.json")]) == 0
    assert "no memory plan yet: it needs runs/upcycled/qwen2-1.5b-siglip/config.json" in capsys.readouterr().out
    recipe = upcycled_gpu_recipe(tmp_path)
    assert train_main([*CHECK, "--recipe", recipe, "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per GPU: 8 GPUs, expert-parallel 8, ZeRO-1, bf16, micro batch 16 x 288 tokens" in out
    assert "parameters: 5.68B in all (4.62B in experts, 89.3M vision)" in out  # the recipe says ~5.7B
    assert "(fits, 10% kept for buffers)" in out
    for term in ("weights (experts)", "optimizer (dense)", "activations: MoE FFN", "activations: vision projector"):
        assert term in out


def test_a_model_ten_times_larger_is_refused_in_one_line_naming_the_largest_term_and_two_ways_out(tmp_path, capsys):
    recipe = upcycled_gpu_recipe(tmp_path, width=2, depth=3)  # 2x wide, 3x deep
    from mmoe_ds.training.plan import main as plan_main

    rc = plan_main([recipe, str(REPO / "ds_configs/finetune_zero1_bf16.json"), "--world_size", "8",
                    "--gpu-memory", "80GB"])
    captured = capsys.readouterr()
    assert rc == 2
    total = float(captured.out.split("parameters: ")[1].split("B in all")[0])
    assert total >= 10 * 5.68, total  # at least 10x the recipe's model
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "does not fit" in err[0] and "the largest term is optimizer (experts)" in err[0], err
    assert "raise the ZeRO stage (now 1" in err[0] and "a larger expert-parallel size or more processes" in err[0]
    assert train_main([*CHECK, "--recipe", recipe, "--gpu-memory", "80GB"]) == 2


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("24GiB") == 24 * 2 ** 30
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes("lots")
