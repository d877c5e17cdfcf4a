"""Embedded dataset, shards, processor and the modality-balanced loader."""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmoe_ds.data import BalancedLoader, LoaderConfig, MmoeProcessor
from mmoe_ds.data import prepare as prepare_mod
from mmoe_ds.data import sources
from mmoe_ds.data.schema import IMAGE_MODALITY
from mmoe_ds.data.shards import SKIP_REASONS, decode, iter_raw

COMPOSITION = {"image_text": 5, "text": 2, "image": 1}


def loader(data, **kw) -> BalancedLoader:
    return BalancedLoader(LoaderConfig(str(data), composition=dict(kw.pop("composition", COMPOSITION)), **kw))


# -- 1. composition -------------------------------------------------------------------------------
def test_every_batch_has_the_exact_composition(small_dataset):
    expected = [0] * 5 + [1] * 2 + [2]
    processor = MmoeProcessor.from_pretrained(small_dataset / "processor")
    for i, batch in zip(range(1000), loader(small_dataset, seed=3)):
        assert batch["sample_kind"].tolist() == expected, i
        images = (batch["modality_ids"] == IMAGE_MODALITY).sum(1)
        assert images.tolist() == [processor.num_patches] * 5 + [0, 0] + [processor.num_patches]
        assert batch["has_image"].tolist() == [True] * 5 + [False] * 2 + [True]
    assert i == 999


def test_balance_by_tokens_meets_each_kinds_token_budget(small_dataset):
    budget = {"image_text": 120, "text": 40, "image": 18}
    max_len = 48
    for _, batch in zip(range(200), loader(small_dataset, composition=budget, balance_by="tokens", max_length=max_len)):
        tokens = batch["attention_mask"].sum(1)
        kinds = batch["sample_kind"]
        assert kinds.tolist() == sorted(kinds.tolist())  # kinds stay in composition order
        for kind_id, (kind, b) in enumerate(budget.items()):
            got = int(tokens[kinds == kind_id].sum())
            assert b <= got < b + max_len, (kind, got)


# -- 2. sharding across ranks and workers -----------------------------------------------------------
def test_ranks_and_workers_see_disjoint_samples_and_equal_batch_counts(small_dataset):
    seen, counts = [], []
    for rank in range(2):
        keys = [k for b in loader(small_dataset, rank=rank, world_size=2, num_workers=2, resampled=False) for k in b["keys"]]
        counts.append(len(keys) // sum(COMPOSITION.values()))
        seen.append(keys)
    assert counts[0] == counts[1] > 10
    all_keys = seen[0] + seen[1]
    assert len(all_keys) == len(set(all_keys)), "a sample was seen twice within the epoch"


# -- 3. exact resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers,k", [(0, 37), (2, 37)])
def test_resume_yields_exactly_the_uninterrupted_batches(small_dataset, num_workers, k):
    def take(it, n):
        return [next(it) for _ in range(n)]

    uninterrupted = take(iter(loader(small_dataset, seed=5, num_workers=num_workers)), k + 100)[k:]
    first = loader(small_dataset, seed=5, num_workers=num_workers)
    take(iter(first), k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = loader(small_dataset, seed=5, num_workers=num_workers)
    resumed.load_state_dict(state)
    for a, b in zip(uninterrupted, take(iter(resumed), 100)):
        assert a["keys"] == b["keys"]
        for key in ("input_ids", "labels", "modality_ids", "attention_mask", "pixel_patches"):
            assert torch.equal(a[key], b[key])


# -- 4. bad data --------------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a tar, letting change(key, ext, data) return new bytes or None (drop the member)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            key, ext = m.name.split(".", 1)
            data = change(key, ext, data)
            if data is not None:
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def test_controlled_damage_is_skipped_and_counted_exactly(small_dataset, tmp_path):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    rel = next(r for r, i in sorted(manifest["shards"].items()) if i["split"] == "train" and i["kind"] == "image_text")
    keys = []
    with tarfile.open(small_dataset / rel) as t:
        for m in t:
            k = m.name.split(".", 1)[0]
            if k not in keys:
                keys.append(k)
    damage = {keys[1]: "missing_key", keys[2]: "bad_json", keys[3]: "unknown_modality", keys[4]: "bad_image",
              keys[5]: "empty_caption", keys[6]: "bad_image"}

    def change(key, ext, data):
        reason = damage.get(key)
        if reason == "missing_key" and ext == "png":
            return None
        if reason == "bad_json" and ext == "json":
            return b"{not json"
        if reason == "unknown_modality" and ext == "json":
            return json.dumps({"modality": "audio"}).encode()
        if reason == "bad_image" and ext == "png":
            return data[: len(data) // 3] if key == keys[4] else b"\x89PNG garbage"
        if reason == "empty_caption" and ext == "txt":
            return b"   "
        return data

    damaged = tmp_path / "damaged.tar"
    _rewrite(small_dataset / rel, damaged, change)
    skips = Counter()
    good = [decode(str(damaged), k, f, "image_text", skips) for k, f in iter_raw(str(damaged), skips)]
    assert sum(g is not None for g in good) == len(keys) - len(damage)
    assert dict(skips) == dict(Counter(damage.values()))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2 + 100])
    skips = Counter()
    n = sum(decode(str(truncated), k, f, "image_text", skips) is not None for k, f in iter_raw(str(truncated), skips))
    assert skips["corrupt_tar"] == 1 and 0 < n < len(keys)


def test_fuzzed_shards_never_raise_through_the_loader(small_dataset, tmp_path):
    """Many damaged variants of real shards: the loader keeps producing full batches and counts skips."""
    rng = random.Random(0)
    data = tmp_path / "fuzz"
    shutil.copytree(small_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    victims = [r for r, i in sorted(manifest["shards"].items()) if i["split"] == "train"]
    for rel in victims[1::2]:  # damage every other shard; each kind keeps at least one good one
        raw = bytearray((data / rel).read_bytes())
        how = rng.choice(["truncate", "flip", "zero"])
        if how == "truncate":
            raw = raw[: rng.randrange(600, len(raw))]
        elif how == "flip":
            for _ in range(40):
                raw[rng.randrange(len(raw))] ^= 0xFF
        else:
            start = rng.randrange(len(raw) - 2000)
            raw[start:start + 2000] = bytes(2000)
        (data / rel).write_bytes(bytes(raw))
    ld = loader(data, seed=1)
    for _, batch in zip(range(300), ld):
        assert batch["sample_kind"].tolist() == [0] * 5 + [1] * 2 + [2]
    counts = ld.skip_counts()
    assert set(counts) == set(SKIP_REASONS) and sum(counts.values()) > 0


# -- 5 and 6. interoperability and determinism --------------------------------------------------------
def test_hf_datasets_reads_our_shards(small_dataset):
    import datasets

    manifest = json.loads((small_dataset / "manifest.json").read_text())
    shards = {r: i for r, i in manifest["shards"].items() if i["split"] == "validation" and i["kind"] == "image_text"}
    ds = datasets.load_dataset("webdataset", data_files={"validation": [str(small_dataset / r) for r in shards]},
                               split="validation")
    assert len(ds) == sum(i["samples"] for i in shards.values())
    row = ds[0]
    assert isinstance(row["png"], Image.Image) and row["txt"] and row["json"]["modality"] == "image_text"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(small_dataset, tmp_path):
    again = tmp_path / "again"
    prepare_mod.main(["--small", "--out", str(again), "--samples-per-shard", "100", "--max-length", "48"])
    assert _digest(again) == _digest(small_dataset)
    manifest = json.loads((again / "manifest.json").read_text())
    for rel, info in manifest["shards"].items():
        assert hashlib.sha256((again / rel).read_bytes()).hexdigest() == info["sha256"]


def test_splits_do_not_leak(small_dataset):
    keys = {}
    for split in ("train", "validation", "test"):
        for tar in (small_dataset / split).glob("*.tar"):
            with tarfile.open(tar) as t:
                keys.setdefault(split, set()).update(m.name.split(".", 1)[0] for m in t)
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_fallback_without_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path / "none")
    monkeypatch.setattr(sources, "WORDNET_DIR", tmp_path / "none")
    records, used = sources.embedded(text_limit=200)
    kinds = Counter((r.source, r.kind) for r in records)
    assert used["fashion_mnist_debian"] is False and used["text_source"] == "licenses"
    assert kinds[("digits", "image_text")] > 1000 and kinds[("licenses", "text")] > 50 and kinds[("digits", "image")] > 100


# -- other sources and the processor ------------------------------------------------------------------
def test_prepare_from_image_folder_and_hf_dataset(tmp_path):
    import datasets
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    captions = {}
    for i in range(30):
        Image.fromarray(np.full((20, 20), i * 8, dtype=np.uint8)).save(folder / f"img{i}.png")
        captions[f"img{i}"] = f"a gray square of shade {i}"
        (folder / f"img{i}.txt").write_text(captions[f"img{i}"])
    Image.new("L", (5, 5)).save(folder / "no_caption.png")  # ignored: no .txt
    assert prepare_mod.main(["--source", "folder", "--input", str(folder), "--out", str(tmp_path / "f"), "--vocab-size", "300"]) == 0
    manifest = json.loads((tmp_path / "f/manifest.json").read_text())
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 30

    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (12, 12), color=i) for i in range(20)],
                                     "text": [f"shade number {i}" for i in range(20)]})
    ds.save_to_disk(tmp_path / "hf")
    assert prepare_mod.main(["--source", "hf", "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "h"), "--vocab-size", "300"]) == 0
    batch = next(iter(loader(tmp_path / "h", composition={"image_text": 4})))
    assert batch["has_image"].all() and (batch["labels"] != -100).any()


def test_processor_layout_and_round_trip(small_dataset, tmp_path):
    p = MmoeProcessor.from_pretrained(small_dataset / "processor")
    b = p(images=[Image.new("L", (28, 28), 255), None], texts=["an ankle boot", "a gloss"])
    P = p.num_patches
    tok = p.tokenizer
    assert b["input_ids"][0, 0] == tok.bos_token_id and (b["input_ids"][0, 1:1 + P] == p.image_token_id).all()
    assert b["labels"][0, : 1 + P].eq(-100).all() and b["labels"][0, 1 + P] != -100
    assert tok.decode(b["input_ids"][0, 1 + P:][b["attention_mask"][0, 1 + P:].bool()], skip_special_tokens=True) == "an ankle boot"
    assert torch.allclose(b["pixel_patches"][0], torch.ones(P, p.patch_dim))  # white -> (1 - 0.5) / 0.5
    p.save_pretrained(tmp_path / "p")
    again = MmoeProcessor.from_pretrained(tmp_path / "p")
    assert torch.equal(again(texts=["hello there"])["input_ids"], p(texts=["hello there"])["input_ids"])
