"""Existing WebDataset shards, used where they are (`mmoe-ds index`): img2dataset-layout shards
written with webdataset's TarWriter, read from local paths, brace patterns, `pipe:` commands and a
real HTTP server on 127.0.0.1, without re-encoding or copying them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from foreign_shards import caption, digests, http_server, write_img2dataset_shard, write_img2dataset_shards

from mmoe_ds.data import BalancedLoader, LoaderConfig, MmoeProcessor
from mmoe_ds.data.index import main as index

OPTIONS = ["--image-size", "32", "--patch-size", "8", "--max-length", "48", "--vocab-size", "300"]
TRAIN = "shard-{00000..00003}.tar"  # 4 shards x 30 samples; shard-00004.tar (20 samples) is validation


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("img2dataset")
    write_img2dataset_shards(folder, shards=4, samples=30)
    write_img2dataset_shards(folder, shards=1, samples=20, first=4)
    return folder


@pytest.fixture(scope="module")
def indexed(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("indexed") / "ds"
    before = digests(shards)
    assert index(["--train", str(shards / TRAIN), "--validation", str(shards / "shard-00004.tar"), "--out", str(out),
                  *OPTIONS]) == 0
    assert digests(shards) == before  # same bytes, same inodes, untouched mtimes: read, never rewritten
    return out


def loader(data_dir, **overrides) -> BalancedLoader:
    overrides.setdefault("composition", {"image_text": 4})
    overrides.setdefault("max_length", 48)
    return BalancedLoader(LoaderConfig(str(data_dir), **overrides))


def test_index_writes_a_manifest_for_the_shards_where_they_are(shards, indexed):
    assert sorted(p.name for p in indexed.iterdir()) == ["manifest.json", "processor"]  # no shard copied
    m = json.loads((indexed / "manifest.json").read_text())
    expected = {str(shards / f"shard-{i:05d}.tar"): ("train", 30) for i in range(4)}
    expected[str(shards / "shard-00004.tar")] = ("validation", 20)
    assert sorted(m["shards"]) == sorted(expected)
    for location, info in m["shards"].items():
        split, n = expected[location]
        assert info == {"split": split, "source": "shard", "kind": "image_text", "kinds": {"image_text": n},
                        "samples": n, "sha256": hashlib.sha256(Path(location).read_bytes()).hexdigest()}
    assert m["counts"] == {"train": {"image_text": 120, "text": 0, "image": 0},
                           "validation": {"image_text": 20, "text": 0, "image": 0},
                           "test": {"image_text": 0, "text": 0, "image": 0}}
    assert m["sources"] == ["shard"]
    config = json.loads((indexed / "processor" / "processor_config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["num_channels"], config["max_length"]) == (32, 8, 3, 48)


def test_one_pass_over_indexed_shards_gives_every_sample_once_as_rgb_batches(indexed):
    ld = loader(indexed, resampled=False)
    processor = MmoeProcessor.from_pretrained(indexed / "processor")
    assert len(ld) == 30
    keys = []
    for batch in ld:
        assert batch["pixel_patches"].shape == (4, 16, 3 * 8 * 8) and batch["has_image"].all()
        assert batch["sample_kind"].tolist() == [0, 0, 0, 0]
        for row, key in enumerate(batch["keys"]):
            shard, number = int(key[-9:-4]), int(key[-4:])
            text_ids = batch["labels"][row][batch["labels"][row] >= 0][:-1]  # caption tokens, <eos> dropped
            assert processor.tokenizer.decode(text_ids) == caption(shard, number)
        keys += batch["keys"]
    assert sorted(keys) == sorted(f"shard/{s:05d}{r:04d}" for s in range(4) for r in range(30))
    assert sum(ld.skip_counts().values()) == 0


def test_http_pipe_and_brace_locations_give_the_same_first_50_batches_as_local_paths(shards, indexed, tmp_path):
    tokenizer = ["--tokenizer", str(indexed / "processor")]
    with http_server(shards) as url:
        assert index(["--train", f"{url}/{TRAIN}", "--out", str(tmp_path / "http"), *OPTIONS, *tokenizer]) == 0
        assert index(["--train", f"pipe:cat {shards}/{TRAIN}", "--out", str(tmp_path / "pipe"), *OPTIONS,
                      *tokenizer]) == 0
        m = json.loads((tmp_path / "http" / "manifest.json").read_text())
        assert sorted(m["shards"]) == [f"{url}/shard-{i:05d}.tar" for i in range(4)]
        assert all("sha256" not in info for info in m["shards"].values())  # remote: no extra download by default
        assert m["counts"]["train"]["image_text"] == 120
        runs = {name: [b for _, b in zip(range(50), loader(tmp_path / name if name != "local" else indexed, seed=7,
                                                           num_workers=2))]
                for name in ("local", "http", "pipe")}
    for name in ("http", "pipe"):
        for a, b in zip(runs["local"], runs[name], strict=True):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_patches"], b["pixel_patches"])
    assert len({k for b in runs["local"] for k in b["keys"]}) == 120  # 200 draws cycle over all 120 samples


def test_shards_mixing_kinds_are_counted_per_kind_and_streamed_by_kind(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for shard in range(2):  # every 3rd sample text-only: 20 pairs + 10 texts per shard
        write_img2dataset_shard(folder / f"part-{shard}.tar", shard, 30, text_only_every=3)
    assert index(["--train", str(folder / "part-*.tar"), "--out", str(tmp_path / "ds"), *OPTIONS]) == 0
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert [(i["kind"], i["kinds"], i["samples"]) for i in m["shards"].values()] == [
        ("mixed", {"image_text": 20, "text": 10}, 30)] * 2
    assert m["counts"]["train"] == {"image_text": 40, "text": 20, "image": 0}
    assert m["sources"] == ["part"]
    ld = loader(tmp_path / "ds", composition={"image_text": 2, "text": 1}, resampled=False, num_workers=2)
    assert len(ld) == 20
    pairs, texts = [], []
    for batch in ld:
        assert batch["sample_kind"].tolist() == [0, 0, 1] and batch["has_image"].tolist() == [True, True, False]
        pairs += batch["keys"][:2]
        texts += batch["keys"][2:]
    assert sorted(texts) == sorted(f"part/{s:05d}{r:04d}" for s in range(2) for r in range(2, 30, 3))
    assert sorted(pairs) == sorted(f"part/{s:05d}{r:04d}" for s in range(2) for r in range(30) if r % 3 != 2)
    assert sum(ld.skip_counts().values()) == 0  # the other kind's samples in a shard are not errors


def test_a_hash_split_is_stable_wherever_the_shards_are_served_from(shards, tmp_path):
    args = ["--validation-fraction", "0.3", "--test-fraction", "0.3", *OPTIONS]
    with http_server(shards) as url:
        assert index(["--shards", f"{url}/shard-{{00000..00004}}.tar", "--out", str(tmp_path / "h"), *args]) == 0
    assert index(["--shards", str(shards / "shard-*.tar"), "--out", str(tmp_path / "l"), *args]) == 0
    splits = [{loc.rsplit("/", 1)[1]: info["split"] for loc, info in
               json.loads((tmp_path / d / "manifest.json").read_text())["shards"].items()} for d in ("h", "l")]
    assert splits[0] == splits[1] and len(splits[0]) == 5 and "train" in splits[0].values()


def test_bad_input_is_one_line_naming_the_problem_and_nothing_is_written(shards, tmp_path, capsys):
    out = tmp_path / "ds"
    assert index(["--train", str(shards / "shard-{00000..00009}.tar"), "--out", str(out), *OPTIONS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-00005.tar" in err and "quote the pattern" in err
    assert not out.exists()
    assert index(["--train", str(shards / TRAIN), "--out", str(out), "--tokenizer", str(tmp_path), *OPTIONS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer" in err
    assert not (out / "manifest.json").exists()


def test_indexing_the_shard_folder_itself_keeps_locations_relative_and_the_shards_untouched(tmp_path):
    folder = tmp_path / "mine"
    write_img2dataset_shards(folder, shards=2, samples=12)
    before = digests(folder)
    for _ in range(2):  # a second run replaces manifest and processor in place
        assert index(["--train", str(folder / "shard-*.tar"), "--out", str(folder), *OPTIONS]) == 0
    after = digests(folder)
    assert {name: after[name] for name in before} == before and set(after) == set(before) | {"manifest.json"}
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["processor"]  # no temp folder left
    mask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Umask:")), 8)
    assert (folder / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask
    m = json.loads((folder / "manifest.json").read_text())
    assert sorted(m["shards"]) == ["shard-00000.tar", "shard-00001.tar"]  # the dataset folder stays movable
    moved = tmp_path / "moved"
    folder.rename(moved)
    keys = [k for batch in loader(moved, resampled=False) for k in batch["keys"]]
    assert sorted(keys) == sorted(f"shard/{s:05d}{r:04d}" for s in range(2) for r in range(12))
