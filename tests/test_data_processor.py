"""The processor: sequence layout, labels, modality ids, patches, truncation, save/load."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.schema import IMAGE_MODALITY, KIND_ID, TEXT_MODALITY
from mmoe_ds.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def processor(small_dataset) -> MmoeProcessor:
    return MmoeProcessor.from_pretrained(small_dataset / "processor")


def test_layout_of_the_three_kinds(processor):
    P, tok = processor.num_patches, processor.tokenizer
    assert (P, processor.patch_dim) == (16, 49)
    caption_ids = tok("an ankle boot", add_special_tokens=False)["input_ids"]
    b = processor(images=[Image.new("L", (28, 28), 255), None, Image.new("L", (28, 28), 0)],
                  texts=["an ankle boot", "a gloss about things", None])
    assert b["sample_kind"].tolist() == [KIND_ID["image_text"], KIND_ID["text"], KIND_ID["image"]]
    assert b["has_image"].tolist() == [True, False, True]
    ids, labels, modality, mask = b["input_ids"], b["labels"], b["modality_ids"], b["attention_mask"]
    n = len(caption_ids)
    # image+text: <bos> <image>xP caption <eos>; labels only on the caption and <eos>
    image_tokens = [processor.image_token_id] * P
    assert ids[0, :1 + P + n + 1].tolist() == [tok.bos_token_id] + image_tokens + caption_ids + [tok.eos_token_id]
    assert labels[0, :1 + P].eq(-100).all()
    assert labels[0, 1 + P:1 + P + n + 1].tolist() == caption_ids + [tok.eos_token_id]
    assert modality[0, 1:1 + P].eq(IMAGE_MODALITY).all() and modality[0, 0] == TEXT_MODALITY
    assert modality[0, 1 + P:].eq(TEXT_MODALITY).all()
    # text-only: <bos> text <eos>, then padding
    length = int(mask[1].sum())
    assert ids[1, 0] == tok.bos_token_id and ids[1, length - 1] == tok.eos_token_id
    assert (ids[1, length:] == tok.pad_token_id).all() and labels[1, length:].eq(-100).all()
    assert mask[1, :length].eq(1).all() and mask[1, length:].eq(0).all()
    assert modality[1].eq(TEXT_MODALITY).all() and not (ids[1] == processor.image_token_id).any()
    assert b["pixel_patches"][1].eq(0).all()
    # image-only: <bos> <image>xP <eos>; its only label is <eos>
    assert ids[2, :P + 2].tolist() == [tok.bos_token_id] + image_tokens + [tok.eos_token_id]
    assert labels[2].ne(-100).sum() == 1
    # white -> (1 - 0.5) / 0.5 = 1, black -> -1
    assert torch.equal(b["pixel_patches"][0], torch.ones(P, 49))
    assert torch.equal(b["pixel_patches"][2], -torch.ones(P, 49))
    assert {k: v.dtype for k, v in b.items()} == {
        "input_ids": torch.long, "attention_mask": torch.long, "labels": torch.long, "modality_ids": torch.long,
        "pixel_patches": torch.float32, "has_image": torch.bool, "sample_kind": torch.long}


def test_truncation_keeps_eos_and_text_that_spells_special_tokens_stays_text(processor):
    long_text = " ".join(["word"] * 200)
    b = processor(images=[Image.new("L", (28, 28)), None], texts=[long_text, "<image> <eos> <pad>"])
    assert b["input_ids"].shape[1] == processor.max_length
    assert b["input_ids"][0, -1] == processor.tokenizer.eos_token_id
    specials = {processor.image_token_id, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id}
    n = int(b["attention_mask"][1].sum())
    assert not specials & set(b["input_ids"][1, 1:n - 1].tolist())


def test_patches_are_row_major_and_flattened_channel_first(small_dataset):
    tok = MmoeProcessor.from_pretrained(small_dataset / "processor").tokenizer
    rgb = MmoeProcessor(tok, image_size=8, patch_size=4, num_channels=3, image_mean=[0.0, 0.5, 0.25],
                        image_std=[1.0, 0.5, 0.25], max_length=16)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    patches = rgb.patchify(Image.fromarray(pixels))
    x = (pixels / 255.0 - np.array([0.0, 0.5, 0.25])) / np.array([1.0, 0.5, 0.25])
    top_right = x[0:4, 4:8].transpose(2, 0, 1).reshape(-1)  # patch 1: row 0, column 1
    assert patches.shape == (4, 48) and np.allclose(patches[1].numpy(), top_right, atol=1e-6)
    small = rgb.patchify(Image.fromarray(pixels[:4, :4]))  # other sizes are resized
    assert small.shape == (4, 48)


def test_invalid_settings_are_refused_with_the_fix(small_dataset):
    tok = MmoeProcessor.from_pretrained(small_dataset / "processor").tokenizer
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MmoeProcessor(tok, image_size=30, patch_size=7)
    with pytest.raises(ValueError, match="max_length"):
        MmoeProcessor(tok, max_length=10)
    with pytest.raises(ValueError, match="image_mean"):
        MmoeProcessor(tok, num_channels=3, image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="one of each"):
        MmoeProcessor(tok)(images=[None], texts=["a", "b"])


def test_save_and_load_round_trip(small_dataset, tmp_path):
    p = MmoeProcessor(MmoeProcessor.from_pretrained(small_dataset / "processor").tokenizer, max_length=40,
                      image_mean=0.3, image_std=0.4)
    p.save_pretrained(tmp_path / "p")
    again = MmoeProcessor.from_pretrained(tmp_path / "p")
    assert again.to_dict() == p.to_dict()
    images, texts = [Image.new("L", (28, 28), 90), None], ["a sandal", "a general concept of things"]
    a, b = p(images=images, texts=texts), again(images=images, texts=texts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="prepare"):
        MmoeProcessor.from_pretrained(tmp_path)


def test_tokenizer_is_byte_level_and_deterministic():
    texts = ["an ankle boot", "a handwritten seven", "a picture of a sandal"] * 3
    a, b = train_tokenizer(texts, 300), train_tokenizer(list(reversed(texts)), 300)
    assert a.get_vocab() == b.get_vocab()
    odd = "naïve café ☃"  # unseen characters still round-trip through bytes
    assert a.decode(a(odd, add_special_tokens=False)["input_ids"]) == odd
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100)


def test_large_jpeg_is_decoded_at_reduced_scale_and_matches_a_full_decode(small_dataset):
    """A 1000 px JPEG for a 224 px processor: libjpeg's DCT scaling decodes it at 1/4 (250 px, the
    smallest power-of-2 reduction still >= 224), and the patches stay close to a full decode."""
    tok = MmoeProcessor.from_pretrained(small_dataset / "processor").tokenizer
    rgb = MmoeProcessor(tok, image_size=224, patch_size=16, num_channels=3, max_length=200)
    yy, xx = np.mgrid[0:1000, 0:1000]
    pixels = np.stack([xx * 255 // 999, yy * 255 // 999, (xx + yy) * 255 // 1998], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    lazy = Image.open(io.BytesIO(buf.getvalue()))
    reduced = rgb.patchify(lazy)
    assert lazy.size == (250, 250)
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    assert full.size == (1000, 1000)
    reference = rgb.patchify(full)
    assert reduced.shape == reference.shape == (196, 768)
    assert (reduced - reference).abs().mean() < 0.01  # normalised units (range 2)
