"""The `modality_embedding` config switch: on by default (old behaviour, old checkpoints), off = no parameter,
and then an agnostic router cannot tell a token's modality from its representation."""
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
IMAGE, TEXT = 0, 1


def config(**kw) -> MmoeConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=1,
                router={"mode": "agnostic", "drop_tokens": False}, image_loss_coef=0.1)
    base.update(kw)
    return MmoeConfig(**base)


def image_text_batch(num=2, text_len=5):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(num, 1, dtype=torch.long), torch.full((num, P), 3),
                     torch.randint(4, 64, (num, text_len), generator=g)], 1)
    labels = ids.clone()
    labels[:, : P + 1] = -100
    return {"input_ids": ids, "pixel_patches": torch.randn(num, P, 49, generator=g),
            "attention_mask": torch.ones_like(ids), "labels": labels}


def text_only_logits(model, flip_to_image: bool) -> torch.Tensor:
    """Logits of a text-only batch; optionally every token is labelled IMAGE instead of TEXT."""
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    modality_ids = torch.full_like(ids, IMAGE if flip_to_image else TEXT)
    with torch.no_grad():
        return model(input_ids=ids, modality_ids=modality_ids, use_cache=False).logits


def build(seed=0, **kw) -> MmoeForCausalLM:
    torch.manual_seed(seed)
    return MmoeForCausalLM(config(**kw)).eval()


def test_default_is_on_and_identical_to_explicit_true():
    default, explicit = build(), build(modality_embedding=True)
    assert default.config.modality_embedding is True
    assert "model.modality_embed.weight" in default.state_dict()
    b = image_text_batch()
    with torch.no_grad():
        assert torch.equal(default(**b).logits, explicit(**b).logits)


def test_old_config_without_the_field_loads_with_embedding(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("modality_embedding")  # a checkpoint written before the switch existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = MmoeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.modality_embedding is True
    b = image_text_batch()
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded(**b).logits)


def test_off_has_no_parameter_and_trains():
    model = build(modality_embedding=False).train()
    assert model.model.modality_embed is None
    assert not [k for k in model.state_dict() if "modality_embed" in k]
    out = model(**image_text_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.patch_embed.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_agnostic_router_without_embedding_is_blind_to_modality_ids():
    # With the embedding on, relabelling text tokens as image changes the output (the confound) ...
    on = build(modality_embedding=True)
    assert not torch.allclose(text_only_logits(on, False), text_only_logits(on, True))
    # ... with it off, an agnostic router has no way to see the label: outputs are bit-identical.
    off = build(modality_embedding=False)
    assert torch.equal(text_only_logits(off, False), text_only_logits(off, True))


def test_off_aware_router_still_sees_modality_through_the_router():
    # modality_bias starts at zero; give it a non-zero bias so the router's modality input matters.
    model = build(modality_embedding=False, router={"mode": "modality_bias", "drop_tokens": False})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modality_bias"):
                p.copy_(torch.tensor([[5.0, -5.0, -5.0, -5.0], [-5.0, -5.0, -5.0, 5.0]]).reshape(p.shape))
                break
        else:
            pytest.fail("no modality bias parameter found: " + ", ".join(n for n, _ in model.named_parameters()))
    assert not torch.allclose(text_only_logits(model, False), text_only_logits(model, True))


def test_round_trip_keeps_flag(tmp_path):
    model = build(modality_embedding=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["modality_embedding"] is False
    loaded = MmoeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.modality_embedding is False and loaded.model.modality_embed is None
    b = image_text_batch()
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded(**b).logits)


def test_export_without_embedding_loads_by_remote_code(tmp_path):
    # The export ships modeling_mmoe.py; a fresh process without mmoe_ds must rebuild the model with no embedding.
    model = build(modality_embedding=False)
    b = image_text_batch()
    with torch.no_grad():
        expected = model(**b).logits
    export_dir = save_export(model, tmp_path / "export")
    torch.save(b, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["deepspeed"] = None
        sys.modules["mmoe_ds"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export_dir)!r}, trust_remote_code=True).eval()
        assert model.config.modality_embedding is False and model.model.modality_embed is None
        b = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            torch.save(model(**b).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_non_bool_is_rejected_naming_field(bad):
    with pytest.raises(ValueError, match="MmoeConfig.modality_embedding"):
        config(modality_embedding=bad)
