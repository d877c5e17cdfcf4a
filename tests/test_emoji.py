"""The emoji source (Debian's Noto Color Emoji rendered to RGB, captioned with Unicode names) and a
demo-sized RGB run on Fashion-MNIST + emoji through the real 2-process launcher."""
from __future__ import annotations

import io
import json
import math
import tarfile
import unicodedata

import numpy as np
import pytest
from launch_util import REPO, deepspeed_launch
from PIL import Image

from mmoe_ds.data.sources.base import PrepareReport, SourceError
from mmoe_ds.data.sources.emoji import EMOJI_FONT, EmojiCounts, EmojiSource, emoji

pytestmark = pytest.mark.skipif(not EMOJI_FONT.exists(), reason=f"{EMOJI_FONT} missing: install Debian's "
                                "fonts-noto-color-emoji (`make system-data` as root)")
LICENSE = "OFL-1.1 (Noto Color Emoji, Debian fonts-noto-color-emoji)"
KNOWN = {0x1F34E: "red apple", 0x1F304: "sunrise over mountains", 0x1F600: "grinning face",
         0x1F431: "cat face", 0x2764: "heavy black heart"}


@pytest.fixture(scope="module")
def glyphs():
    counts = EmojiCounts()
    records = list(emoji(size=32, counts=counts))
    return records, counts


def test_every_usable_glyph_renders_with_its_unicode_name(glyphs):
    records, counts = glyphs
    by_code = {int(r.key.removeprefix("emoji_u"), 16): r for r in records}
    for code_point, caption in KNOWN.items():
        assert by_code[code_point].text == caption
    # Debian 12's font maps 1,487 code points; ~1,390 have a name, are not ASCII and draw pixels.
    assert counts.tried == counts.rendered + sum(counts.skipped.values()) == len(records) + sum(counts.skipped.values())
    assert 1300 <= counts.rendered <= 1500 and counts.skipped["ascii"] >= 12 and counts.skipped["empty_render"] >= 1
    assert sorted(by_code) == list(by_code)  # code-point order
    assert all(r.kind == "image_text" and r.license == LICENSE and r.label is None for r in records)
    # Splits: the i-th glyph by split_by_index(i): 8 -> validation, 9 -> test.
    assert [r.split for r in records[:10]] == ["train"] * 8 + ["validation", "test"]
    for r in records:
        assert r.image.mode == "RGB" and r.image.size == (32, 32)
        x = np.asarray(r.image)
        assert (x < 250).any(), r.text  # something drawn on the white background
    apple = np.asarray(by_code[0x1F34E].image).astype(int)
    assert tuple(apple[0, 0]) == (255, 255, 255)  # the corner is background
    r, g, b = apple[10:22, 10:22].reshape(-1, 3).mean(0)
    assert r > 180 and r > g + 60 and r > b + 60  # a red apple


def test_builds_are_deterministic_and_limited(glyphs):
    a, b = list(emoji(size=16, limit=20)), list(emoji(size=16, limit=20))
    assert len(a) == 20 and [r.key for r in a] == [r.key for r in glyphs[0][:20]]
    assert all(x.image.tobytes() == y.image.tobytes() and x.text == y.text for x, y in zip(a, b))


def test_missing_font_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        next(emoji(font_path=tmp_path / "NotoColorEmoji.ttf"))
    with pytest.raises(SourceError, match="install Debian's fonts-noto-color-emoji"):
        EmojiSource(font_path=tmp_path / "NotoColorEmoji.ttf")


def test_embedded_build_without_the_font_prints_a_note_and_goes_on(tmp_path, capsys):
    from mmoe_ds.data.sources import embedded

    records, used = embedded(train_pairs=0, test_pairs=0, image_only=0, text_limit=20, emoji=True,
                             emoji_font=tmp_path / "NotoColorEmoji.ttf")
    assert used["emoji_debian"] is False and "emoji" not in used
    assert records and not any(r.source == "emoji" for r in records)
    assert "fonts-noto-color-emoji" in capsys.readouterr().err


def test_the_source_interface_reports_its_counts_and_license():
    source = EmojiSource(size=8)
    records = list(source.records(PrepareReport()))
    info = source.build_info()["emoji"]
    assert info["rendered"] == len(records) and info["license"] == LICENSE and info["size"] == 8
    assert records[0].image.size == (8, 8) and records[0].text == "copyright sign"  # U+00A9, the first non-ASCII


@pytest.fixture(scope="module")
def fmnist_emoji(tmp_path_factory):
    """Small embedded build (Fashion-MNIST from Debian when installed, digits, photos, text) + all
    emoji, RGB 32 px with 8 px patches."""
    from mmoe_ds.data.prepare import write_dataset
    from mmoe_ds.data.sources import EMBEDDED_SIZES, embedded

    records, used = embedded(**EMBEDDED_SIZES["small"], emoji=True, emoji_size=32)
    out = tmp_path_factory.mktemp("data") / "fmnist_emoji"
    write_dataset(records, out, 200, 0, 2048, dict(image_size=32, patch_size=8, num_channels=3, max_length=48), used)
    return out


def test_prepared_dataset_records_emoji_license_and_rgb_samples(fmnist_emoji):
    manifest = json.loads((fmnist_emoji / "manifest.json").read_text())
    info = manifest["build"]["emoji"]
    assert info["license"] == LICENSE and info["tried"] == info["rendered"] + sum(info["skipped"].values())
    assert manifest["processor"]["num_channels"] == 3 and manifest["processor"]["image_size"] == 32
    emoji_shards = {rel: s for rel, s in manifest["shards"].items() if s["source"] == "emoji"}
    assert {s["split"] for s in emoji_shards.values()} == {"train", "validation", "test"}
    assert sum(s["samples"] for s in emoji_shards.values()) == info["rendered"]
    rel = next(rel for rel, s in sorted(emoji_shards.items()) if s["split"] == "test")
    with tarfile.open(fmnist_emoji / rel) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted(n for n in members if n.endswith(".png"))[0][:-4]
    image = Image.open(io.BytesIO(members[key + ".png"]))
    assert image.mode == "RGB" and image.size == (32, 32)
    assert json.loads(members[key + ".json"])["license"] == LICENSE
    code_point = int(key.removeprefix("emoji_u"), 16)
    assert members[key + ".txt"].decode() == unicodedata.name(chr(code_point)).lower()


def test_fashion_mnist_plus_emoji_trains_and_evaluates_on_two_processes(fmnist_emoji, tmp_path):
    recipe = json.loads((REPO / "recipes/fmnist_emoji_cpu.json").read_text())
    recipe["data"].update(dir=str(fmnist_emoji), eval_batches=2, ranking_images=20)
    recipe["model"].update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           moe_intermediate_size=64)
    run = tmp_path / "run"
    recipe["train"].update(output_dir=str(run), steps=12, log_every=4, eval_every=12, checkpoint_every=12,
                           progress_bar=False)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    deepspeed_launch(["mmoe_ds.train", "--recipe", str(tmp_path / "recipe.json"), "--deepspeed_config",
                      str(REPO / "ds_configs/cpu_zero1_fp32.json")], module=True, timeout=300)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [4, 8, 12] and all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals] == [12] and math.isfinite(evals[0]["caption_loss"])
    assert (run / "checkpoints" / "latest").read_text() == "step00000012"
