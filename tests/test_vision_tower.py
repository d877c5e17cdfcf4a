"""The HF vision tower (`vision_encoder="hf"`, mmoe_ds/model/vision.py) with tiny random SigLIP and
CLIP vision models saved locally (with their image processors) the way `save_pretrained` leaves them.

Expectations come from the saved transformers models themselves (their own last_hidden_state on
the same pixels), from their own image processors, and from hand-written pooling, never from the tower.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    ResNetConfig,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.pretrained_processor import PretrainedProcessor
from mmoe_ds.data.tokenizer import train_tokenizer
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.model.vision import load_tower_weights, vision_config_from_pretrained
from mmoe_ds.training.init_from import trainable_parameters

SIZE, PATCH = 32, 8  # a 4 x 4 patch grid
TOWER = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
             patch_size=PATCH)
KINDS = {"siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor, 0),
         "clip": (CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor, 1)}  # last: tokens before the patches


def save_vision_model(folder, kind: str, seed: int = 0):
    config_cls, model_cls, processor_cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TOWER)).eval()
    model.save_pretrained(folder)
    if kind == "clip":
        processor_cls(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    else:
        processor_cls(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return model


def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(["a red square", "a blue circle on white", "two green lines"] * 3, 300)


def model_config(vision_config: dict, tok, **kw) -> MmoeConfig:
    base = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, moe_layer_frequency=1,
                max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids("<image>"),
                vision_encoder="hf", vision_config=vision_config, router={"mode": "agnostic"})
    base.update(kw)
    return MmoeConfig(**base)


def images(seed: int, n: int = 2) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 52, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(KINDS))
def tower_setup(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    reference = save_vision_model(folder, kind)
    tok = tokenizer()
    config = model_config(vision_config_from_pretrained(folder), tok)
    torch.manual_seed(1)
    model = MmoeForCausalLM(config)
    load_tower_weights(model.model.vision, folder)
    processor = PretrainedProcessor.from_components(tok, folder, config)
    return kind, folder, reference, model, processor


def test_tower_gives_the_saved_models_patch_features_and_the_processor_its_pixels(tower_setup):
    kind, folder, reference, model, processor = tower_setup
    prefix = KINDS[kind][3]
    pics = images(0)
    own = KINDS[kind][2].from_pretrained(folder)(images=pics, return_tensors="pt")["pixel_values"]
    batch = processor(images=pics, texts=["a red square", "two green lines"])
    assert torch.equal(batch["pixel_values"], own) and "pixel_patches" not in batch
    assert own.shape == (2, 3, SIZE, SIZE)
    tower = model.model.vision
    assert tower.num_image_tokens == processor.num_image_tokens == 16
    with torch.no_grad():
        expected = reference(pixel_values=own).last_hidden_state  # [2, prefix + 16, 24]
        assert expected.shape == (2, prefix + 16, 24)
        torch.testing.assert_close(tower.patch_features(own), expected[:, prefix:], rtol=0, atol=1e-6)
    ids = batch["input_ids"][0].tolist()
    image_id, text_ids = processor.image_token_id, processor.tokenizer("a red square", add_special_tokens=False)
    assert ids[:1 + 16 + len(text_ids["input_ids"]) + 1] == (
        [processor.tokenizer.bos_token_id] + [image_id] * 16 + text_ids["input_ids"]
        + [processor.tokenizer.eos_token_id])


def test_image_features_reach_the_moe_layers(tower_setup):
    _, _, _, model, processor = tower_setup
    seen = []
    hooks = [layer.ffn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
             for layer in model.model.layers if layer.is_moe]
    assert len(hooks) == 2
    texts = ["a red square", "two green lines"]
    a, b = processor(images=images(0), texts=texts), processor(images=images(5), texts=texts)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["pixel_values"], b["pixel_values"])
    model.eval()
    with torch.no_grad():
        for batch in (a, b):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
    for h in hooks:
        h.remove()
    image_positions = a["modality_ids"] == 0
    assert int(image_positions.sum()) == 2 * 16
    for layer in range(2):  # router input (the MoE block's input) of every image token differs; <bos> does not
        before, after = seen[layer], seen[2 + layer]
        assert (before - after).abs().amax(-1)[image_positions].min() > 1e-4
        assert torch.equal(before[:, 0], after[:, 0])


def test_a_frozen_tower_gets_no_gradient_and_stays_out_of_the_optimizer(tower_setup):
    _, _, _, model, processor = tower_setup
    model.train()
    batch = processor(images=images(1), texts=["a blue circle on white", "a red square"])
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                pixel_values=batch["pixel_values"])
    out.loss.backward()
    tower = model.model.vision
    encoder = list(tower.encoder.parameters())
    assert encoder and all(not p.requires_grad and p.grad is None for p in encoder)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.projector.parameters())
    assert not tower.encoder.training  # frozen: dropout stays off in training mode
    chosen = {id(p) for p in trainable_parameters(model)}
    assert not chosen & {id(p) for p in encoder}
    assert chosen == {id(p) for p in model.parameters()} - {id(p) for p in encoder}


def test_pooling_to_vision_max_tokens_averages_neighbouring_patches(tmp_path):
    reference = save_vision_model(tmp_path, "siglip", seed=3)
    tok = tokenizer()
    config = model_config(vision_config_from_pretrained(tmp_path), tok, vision_max_tokens=5, vision_projector="linear")
    model = MmoeForCausalLM(config)
    load_tower_weights(model.model.vision, tmp_path)
    processor = PretrainedProcessor.from_components(tok, tmp_path, config)
    assert processor.num_image_tokens == model.model.vision.num_image_tokens == 4  # 4 x 4 grid -> 2 x 2
    pixels = processor(images=images(2, 1), texts=["a red square"])["pixel_values"]
    with torch.no_grad():
        grid = reference(pixel_values=pixels).last_hidden_state.reshape(1, 4, 4, 24)
        pooled = torch.stack([grid[0, r:r + 2, c:c + 2].mean((0, 1)) for r in (0, 2) for c in (0, 2)])[None]
        expected = model.model.vision.projector(pooled)
        torch.testing.assert_close(model.model.vision(pixels), expected, rtol=0, atol=1e-6)


def test_saved_processor_loads_back_and_a_pretrained_lm_tokenizer_without_pad_or_bos_works(tmp_path):
    """Qwen2-like: no bos, no pad. Sequences start without <bos>; <eos> pads; padding is -100 by position."""
    save_vision_model(tmp_path / "vision", "siglip")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "a", "red", "square", "two", "lines", "<image>", "<unk>"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>",
                                  additional_special_tokens=["<image>"])
    assert tok.pad_token_id is None and tok.bos_token_id is None
    config = model_config(vision_config_from_pretrained(tmp_path / "vision"), tok, pad_token_id=None, bos_token_id=None)
    processor = PretrainedProcessor.from_components(tok, tmp_path / "vision", config, max_length=24)
    processor.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert saved == {"processor_class": "MmoeProcessor", "num_image_tokens": 16, "max_length": 24,
                     "model_max_length": config.max_position_embeddings, "max_text_bytes": 65536,
                     "padding_side": "left", "auto_map": {"AutoProcessor": "processing_mmoe.MmoeProcessor"}}
    loaded = MmoeProcessor.from_pretrained(tmp_path / "proc")
    batch = loaded(images=[images(0, 1)[0], None], texts=["a red square", "two lines"])
    assert batch["input_ids"].tolist() == [[6] * 16 + [1, 2, 3, 0], [4, 5, 0] + [0] * 17]
    assert batch["labels"].tolist() == [[-100] * 16 + [1, 2, 3, 0], [4, 5, 0] + [-100] * 17]
    assert batch["attention_mask"][1].tolist() == [1] * 3 + [0] * 17
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and not batch["pixel_values"][1].any()
    model = MmoeForCausalLM(config)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                pixel_values=batch["pixel_values"])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("config_cls,model_cls,prefix", [(SiglipConfig, SiglipModel, 0), (CLIPConfig, CLIPModel, 1)])
def test_a_whole_image_text_model_gives_its_vision_half(tmp_path, config_cls, model_cls, prefix):
    """The Hub's google/siglip-* and openai/clip-* repos hold both towers: the vision one is used."""
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(4)
    whole = model_cls(config_cls(text_config=text, vision_config=TOWER)).eval()
    whole.save_pretrained(tmp_path)
    vision_config = vision_config_from_pretrained(tmp_path)
    assert vision_config["model_type"] == f"{config_cls.model_type}_vision_model"
    model = MmoeForCausalLM(model_config(vision_config, tokenizer()))
    load_tower_weights(model.model.vision, tmp_path)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = whole.vision_model(pixel_values=pixels).last_hidden_state[:, prefix:]
        torch.testing.assert_close(model.model.vision.patch_features(pixels), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config,words", [
    (ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1]), ["feature maps, not patch tokens", "ViT-style"]),
    (ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), ["feature maps, not patch tokens"]),
    (LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32), ["a text model"]),
])
def test_models_without_patch_outputs_are_refused_naming_the_fix(tmp_path, config, words):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        vision_config_from_pretrained(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "vision_config_from_pretrained" in message and str(tmp_path) in message
    for word in words:
        assert word in message


def test_weights_that_do_not_fit_the_vision_config_are_refused(tmp_path):
    save_vision_model(tmp_path / "small", "siglip")
    vision_config = dict(vision_config_from_pretrained(tmp_path / "small"), hidden_size=48, intermediate_size=96)
    model = MmoeForCausalLM(model_config(vision_config, tokenizer()))
    with pytest.raises(ValueError, match=r"do not fit MmoeConfig\.vision_config .*vision_config_from_pretrained"):
        load_tower_weights(model.model.vision, tmp_path / "small")
    with pytest.raises(ValueError, match=r"no preprocessor_config\.json .*hf download"):
        (tmp_path / "small" / "preprocessor_config.json").unlink()
        PretrainedProcessor.from_components(tokenizer(), tmp_path / "small", model.config)
