"""RGB images and other image/patch sizes end to end: processor layout against a hand-built image,
then a tiny model at 224 px / patch 16 and 32 px / patch 8 with 3 channels through forward,
backward, save/load, generation, captioning and the remote-code export."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.tokenizer import train_tokenizer
from mmoe_ds.export import save_export
from mmoe_ds.export.caption import caption_images
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM

CAPTIONS = ["red apple", "sunrise over mountains", "a pair of trousers", "an ankle boot", "grinning face"]
SIZES = [(224, 16), (32, 8)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 4, 300)


def rgb_images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_model(image_size: int, patch_size: int, vocab_size: int) -> MmoeForCausalLM:
    num_patches = (image_size // patch_size) ** 2
    config = MmoeConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, moe_intermediate_size=32, num_local_experts=4,
                        num_experts_per_tok={"image": 1, "text": 2}, router={"mode": "modality_bias"},
                        image_loss_coef=0.1, image_size=image_size, patch_size=patch_size, num_channels=3,
                        max_position_embeddings=num_patches + 24)
    torch.manual_seed(0)
    return MmoeForCausalLM(config)


def test_patch_layout_of_a_hand_built_rgb_image(tokenizer):
    # 4x4 RGB, 2x2 patches of 2x2 px. Red counts 0..15 row by row, green = red + 100, blue = red + 200.
    red = np.arange(16, dtype=np.uint8).reshape(4, 4)
    image = Image.fromarray(np.stack([red, red + 100, red + 200], axis=-1))
    processor = MmoeProcessor(tokenizer, image_size=4, patch_size=2, num_channels=3, image_mean=0.0, image_std=1.0,
                              max_length=8)
    expected = np.array([  # per patch (row-major): the red 2x2 block, then green, then blue, each row by row
        [0, 1, 4, 5, 100, 101, 104, 105, 200, 201, 204, 205],
        [2, 3, 6, 7, 102, 103, 106, 107, 202, 203, 206, 207],
        [8, 9, 12, 13, 108, 109, 112, 113, 208, 209, 212, 213],
        [10, 11, 14, 15, 110, 111, 114, 115, 210, 211, 214, 215]]) / 255.0
    np.testing.assert_allclose(processor.patchify(image).numpy(), expected, atol=1e-6)
    # Per-channel normalisation: subtract each channel's offset, scale by 255: every channel reads as red.
    centred = MmoeProcessor(tokenizer, image_size=4, patch_size=2, num_channels=3, image_mean=[0, 100 / 255, 200 / 255],
                            image_std=[1 / 255] * 3, max_length=8)
    np.testing.assert_allclose(centred.patchify(image).numpy(), np.tile([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                                                         [10, 11, 14, 15]], 3), atol=1e-3)
    # A grayscale image becomes RGB with three equal channels.
    gray = processor.patchify(Image.fromarray(red))
    np.testing.assert_allclose(gray.numpy()[0], np.array([0, 1, 4, 5] * 3) / 255.0, atol=1e-6)


@pytest.mark.parametrize("image_size,patch_size", SIZES)
def test_processor_shapes_for_rgb_sizes(tokenizer, image_size, patch_size):
    P, D = (image_size // patch_size) ** 2, 3 * patch_size ** 2
    processor = MmoeProcessor(tokenizer, image_size=image_size, patch_size=patch_size, num_channels=3,
                              max_length=P + 16)
    images = rgb_images(2, 50) + [Image.new("L", (28, 28), 255)]  # other sizes are resized; gray becomes RGB
    b = processor(images=images, texts=["red apple", None, "an ankle boot"])
    assert (processor.num_patches, processor.patch_dim) == (P, D)
    assert b["pixel_patches"].shape == (3, P, D)
    assert (b["input_ids"][:, 1:1 + P] == processor.image_token_id).all()
    assert torch.equal(b["pixel_patches"][2], torch.ones(P, D))  # white: (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match=f"at least {P + 3}"):
        MmoeProcessor(tokenizer, image_size=image_size, patch_size=patch_size, num_channels=3, max_length=P + 1)


@pytest.mark.parametrize("image_size,patch_size", SIZES)
def test_model_trains_saves_loads_and_generates_at_rgb_sizes(tokenizer, tmp_path, image_size, patch_size):
    P = (image_size // patch_size) ** 2
    processor = MmoeProcessor(tokenizer, image_size=image_size, patch_size=patch_size, num_channels=3,
                              max_length=P + 16)
    model = tiny_model(image_size, patch_size, len(tokenizer))
    assert model.model.patch_embed.weight.shape == (32, 3 * patch_size ** 2)
    b = processor(images=rgb_images(3, image_size, seed=1), texts=CAPTIONS[:3])
    out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches")})
    assert out.logits.shape == (3, b["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(out.loss)
    assert out.image_loss is not None and out.image_loss > 0
    out.loss.backward()
    assert model.model.patch_embed.weight.grad.abs().sum() > 0 and model.patch_head.weight.grad.abs().sum() > 0

    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = MmoeForCausalLM.from_pretrained(tmp_path / "m").eval()
    c = loaded.config
    assert (c.image_size, c.patch_size, c.num_channels) == (image_size, patch_size, 3)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_patches")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    captions = caption_images(loaded, processor, rgb_images(2, image_size, seed=2), max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)

    gray = MmoeProcessor(tokenizer, max_length=40)(images=[Image.new("L", (28, 28))], texts=["red apple"])
    with pytest.raises(ValueError, match=f"--patch-size {patch_size} --channels 3"):
        loaded(input_ids=gray["input_ids"], pixel_patches=gray["pixel_patches"])


def test_rgb_224_export_loads_with_remote_code_and_captions(tokenizer, tmp_path):
    processor = MmoeProcessor(tokenizer, image_size=224, patch_size=16, num_channels=3, max_length=212)
    processor.save_pretrained(tmp_path / "processor")
    model = tiny_model(224, 16, len(tokenizer)).eval()
    prompt = processor(images=rgb_images(2, 300, seed=4), texts=None, add_eos=False)
    with torch.no_grad():
        expected = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                                  pixel_patches=prompt["pixel_patches"], max_new_tokens=5, do_sample=False)
    export_dir = save_export(model, tmp_path / "export", processor_dir=tmp_path / "processor")
    torch.save(dict(prompt), tmp_path / "prompt.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["deepspeed"] = None
        sys.modules["mmoe_ds"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export_dir)!r}, trust_remote_code=True).eval()
        c = model.config
        assert (c.image_size, c.patch_size, c.num_channels) == (224, 16, 3), c
        p = torch.load({str(tmp_path / 'prompt.pt')!r})
        with torch.no_grad():
            out = model.generate(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                                 pixel_patches=p["pixel_patches"], max_new_tokens=5, do_sample=False)
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    again = MmoeProcessor.from_pretrained(export_dir)  # the export carries the RGB 224/16 processor
    assert (again.image_size, again.patch_size, again.num_channels) == (224, 16, 3)
