"""HF compatibility of the model: save/load, remote-code export without mmoe_ds or DeepSpeed, generation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmoe_ds.export import save_export
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

P = 16  # patches of a 28x28 image with 7x7 patches


def tiny_config(**kw) -> MmoeConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok={"image": 1, "text": 2},
                router={"mode": "masked_pools", "pools": {"image": [0, 1, 2], "text": [2, 3]}}, image_loss_coef=0.1)
    base.update(kw)
    return MmoeConfig(**base)


def batch(num=3, text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 64, (num, text_len), generator=g)
    ids = torch.cat([torch.ones(num, 1, dtype=torch.long), torch.full((num, P), 3), text], 1)
    labels = ids.clone()
    labels[:, : P + 1] = -100
    return {"input_ids": ids, "pixel_patches": torch.randn(num, P, 49, generator=g),
            "attention_mask": torch.ones_like(ids), "labels": labels}


def test_save_pretrained_from_pretrained_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = MmoeForCausalLM(tiny_config()).eval()
    b = batch()
    model.save_pretrained(tmp_path)
    loaded = MmoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, c = model(**b), loaded(**b)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.loss, c.loss)
    assert a.image_loss is not None and a.aux_loss is not None and len(a.routing_stats) == 1


def test_outputs_follow_hf_moe_conventions():
    model = MmoeForCausalLM(tiny_config(output_router_logits=True))
    out = model(**batch())
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (3 * (1 + P + 5), 4)
    c = model.config
    expected = out.text_loss + c.router_aux_loss_coef * out.aux_loss + c.image_loss_coef * out.image_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.patch_embed.weight.grad.abs().sum() > 0


def test_generate_with_kv_cache_matches_full_recompute():
    torch.manual_seed(1)
    model = MmoeForCausalLM(tiny_config()).eval()
    b = batch(num=2)
    prompt = {"input_ids": b["input_ids"][:, : P + 1], "attention_mask": b["attention_mask"][:, : P + 1],
              "pixel_patches": b["pixel_patches"]}
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(6):  # greedy without any cache
            logits = model(input_ids=ids, pixel_patches=b["pixel_patches"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids)


def test_export_loads_with_trust_remote_code_without_mmoe_ds_or_deepspeed(tmp_path):
    torch.manual_seed(2)
    model = MmoeForCausalLM(tiny_config()).eval()
    b = batch(seed=3)
    with torch.no_grad():
        expected = model(**b).logits
    export_dir = save_export(model, tmp_path / "export")
    torch.save(b, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["deepspeed"] = None   # any import of these now raises ImportError
        sys.modules["mmoe_ds"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        b = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            torch.save(model(**b).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    config = json.loads((export_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmoe.MmoeForCausalLM"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mmoe.MmoeForCausalLM"  # the pipeline's class
    assert config["moe_backend"] == "torch"
    assert (export_dir / "generation_config.json").exists() and (export_dir / "README.md").exists()


@pytest.mark.parametrize("kwargs,words", [
    (dict(hidden_size=30, num_attention_heads=4), ["hidden_size", "num_attention_heads"]),
    (dict(moe_backend="tutel"), ["moe_backend"]),
    (dict(router={"mode": "agnostic", "num_experts": 8}), ["router", "num_local_experts"]),
    (dict(num_experts_per_tok=5), ["top_k", "pool"]),
    (dict(num_key_value_heads=3), ["num_key_value_heads", "num_attention_heads"]),
    (dict(position_embedding_type="alibi"), ["position_embedding_type", "rope"]),
    (dict(position_embedding_type="rope", rope_scaling={"rope_type": "ntk"}), ["rope_scaling", "rope_type"]),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), ["rope_scaling", "position_embedding_type"]),
    (dict(moe_layers=[1, 2]), ["moe_layers", "0..1"]),
    (dict(moe_layers=[]), ["moe_layers", "one or more"]),
    (dict(vision_encoder="clip"), ["vision_encoder", "hf"]),
    (dict(vision_encoder="hf", image_loss_coef=0.0), ["vision_config", "model_type"]),
    (dict(vision_projector="mlp3x"), ["vision_projector", "mlp2x_gelu"]),
    (dict(sliding_window=0), ["sliding_window"]),
])
def test_bad_model_config_fails_at_construction(kwargs, words):
    with pytest.raises(ValueError) as err:
        tiny_config(**kwargs)
    for w in words:
        assert w in str(err.value)


LLAMA_STYLE = dict(position_embedding_type="rope", rope_theta=500.0, num_attention_heads=4, num_key_value_heads=2,
                   attention_bias=True, tie_word_embeddings=True, modality_embedding=False, moe_layers=[0])


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_rope_gqa_model_generates_with_cache_like_full_recompute_and_round_trips(tmp_path, extra):
    torch.manual_seed(4)
    model = MmoeForCausalLM(tiny_config(**LLAMA_STYLE, **extra)).eval()
    attn = model.model.layers[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32) and attn.qkv.bias.shape == (64,)
    assert model.model.position_embed is None and model.lm_head.weight is model.model.embed_tokens.weight
    b = batch(num=2)
    prompt = {"input_ids": b["input_ids"][:, : P + 3], "pixel_patches": b["pixel_patches"]}
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, pixel_patches=b["pixel_patches"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids)
    model.save_pretrained(tmp_path)
    loaded = MmoeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, model(**b).logits)
