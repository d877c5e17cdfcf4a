"""The modality-balanced loader: composition, mixing, sharding over ranks and workers, fixed steps,
determinism and exact resume."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
import torch
from conftest_data import EXPECTED_KINDS, make_loader, manifest, take

from mmoe_ds.data import LoaderConfig
from mmoe_ds.data.schema import IMAGE_MODALITY


def across_epochs(loader, n: int) -> list[dict]:
    """n batches, starting new epochs (new iter()) as a training loop would."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in x if k != "keys")
                                    for x, y in zip(a, b))


# -- composition --------------------------------------------------------------------------------------
def test_every_batch_of_1000_has_the_exact_composition(small_dataset):
    num_patches = 16
    for batch in take(iter(make_loader(small_dataset, seed=3)), 1000):
        assert batch["sample_kind"].tolist() == EXPECTED_KINDS
        assert batch["has_image"].tolist() == [True] * 5 + [False] * 2 + [True]
        assert (batch["modality_ids"] == IMAGE_MODALITY).sum(1).tolist() == [num_patches] * 5 + [0, 0] + [num_patches]
        assert (batch["labels"][:7] != -100).sum(1).gt(1).all()  # captions and texts carry labels
        assert (batch["labels"][7] != -100).sum() == 1  # image-only: just <eos>
        assert batch["pixel_patches"][[0, 7]].abs().sum() > 0 and batch["pixel_patches"][5:7].eq(0).all()


def test_balance_by_tokens_fills_each_kinds_token_budget(small_dataset):
    budget, max_length = {"image_text": 120, "text": 40, "image": 18}, 48
    loader = make_loader(small_dataset, composition=budget, balance_by="tokens", max_length=max_length)
    for batch in take(iter(loader), 200):
        tokens, kinds = batch["attention_mask"].sum(1), batch["sample_kind"]
        assert kinds.tolist() == sorted(kinds.tolist())
        for kind_id, target in enumerate(budget.values()):
            got = int(tokens[kinds == kind_id].sum())
            assert target <= got < target + max_length  # the last sample may overshoot by less than one sample


def test_source_weights_set_the_mix(small_dataset):
    m = manifest(small_dataset)
    pair_sources = sorted({info["source"] for info in m["shards"].values()
                           if info["split"] == "train" and info["kind"] == "image_text"})
    weights = {s: 0.0 for s in m["sources"]}
    weights.update({pair_sources[0]: 3.0, pair_sources[1]: 1.0})
    weights.update({s: 1.0 for s in m["sources"] if s not in pair_sources})  # text-only sources
    seen = Counter()
    for batch in take(iter(make_loader(small_dataset, source_weights=weights, seed=1)), 300):
        seen.update(k.split("/")[0] for k in batch["keys"][:5])
    assert set(seen) == set(pair_sources[:2])
    assert abs(seen[pair_sources[0]] / 1500 - 0.75) < 0.04


# -- sharding over ranks and workers ------------------------------------------------------------------
def test_two_ranks_by_two_workers_see_disjoint_samples_and_the_same_number_of_batches(small_dataset):
    loaders = [make_loader(small_dataset, rank=r, world_size=2, num_workers=2, resampled=False) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 10
    epochs = []
    for _ in range(2):
        per_rank = [[k for batch in loader for k in batch["keys"]] for loader in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) * 8
        keys = per_rank[0] + per_rank[1]
        assert len(keys) == len(set(keys)), "a sample was seen twice within an epoch"
        epochs.append(per_rank)
    assert epochs[0][0] != epochs[1][0] and set(epochs[0][0]) & set(epochs[1][0])  # new order, same share


def test_resampled_ranks_stay_disjoint_however_long_they_run(small_dataset):
    keys = [{k for batch in take(iter(make_loader(small_dataset, rank=r, world_size=2, num_workers=2)), 150)
             for k in batch["keys"]} for r in range(2)]
    assert not keys[0] & keys[1]
    assert len(keys[0]) > 500


def test_fixed_steps_and_length(small_dataset):
    loader = make_loader(small_dataset, steps_per_epoch=5, num_workers=2)
    assert len(loader) == 5 and sum(1 for _ in loader) == 5 and sum(1 for _ in loader) == 5
    with pytest.raises(TypeError, match="steps_per_epoch"):
        len(make_loader(small_dataset))


# -- determinism and resume ---------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_other_batches(small_dataset):
    a, b, c = (take(iter(make_loader(small_dataset, seed=s)), 20) for s in (4, 4, 5))
    assert same_batches(a, b) and not same_batches(a, c)


@pytest.mark.parametrize("settings, k", [
    ({}, 37),
    ({"num_workers": 2}, 37),
    ({"num_workers": 2, "resampled": False, "steps_per_epoch": 7}, 10),  # resumes inside the second epoch
    ({"composition": {"image_text": 100, "text": 30, "image": 18}, "balance_by": "tokens"}, 20),
])
def test_resume_yields_exactly_the_uninterrupted_batches(small_dataset, settings, k):
    uninterrupted = across_epochs(make_loader(small_dataset, seed=5, **settings), k + 100)[k:]
    first = make_loader(small_dataset, seed=5, **settings)
    across_epochs(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON (DeepSpeed client_state)
    resumed = make_loader(small_dataset, seed=5, **settings)
    resumed.load_state_dict(state)
    assert same_batches(uninterrupted, across_epochs(resumed, 100))


def test_state_from_a_different_setup_is_refused_by_name(small_dataset):
    loader = make_loader(small_dataset, seed=1)
    take(iter(loader), 3)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        make_loader(small_dataset, seed=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(small_dataset, seed=1, num_workers=2).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("overrides, field", [
    ({"composition": {"image_text": 4, "video": 1}}, "composition"),
    ({"composition": {"image_text": 0}}, "composition"),
    ({"split": "dev"}, "split"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"num_workers": -1}, "num_workers"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"balance_by": "bytes"}, "balance_by"),
    ({"balance_by": "tokens", "resampled": False}, "steps_per_epoch"),
    ({"source_weights": {"digits": 1.0}, "resampled": False}, "source_weights"),
    ({"source_weights": {"digits": -1.0}}, "source_weights"),
])
def test_invalid_configs_name_the_field(small_dataset, overrides, field):
    with pytest.raises(ValueError, match=f"LoaderConfig.{field}"):
        LoaderConfig(str(small_dataset), **overrides)


def test_problems_found_in_the_data_name_the_field(small_dataset, tmp_path):
    with pytest.raises(ValueError, match="LoaderConfig.data_dir"):
        LoaderConfig(str(tmp_path))
    with pytest.raises(ValueError, match="LoaderConfig.source_weights: no weight"):
        make_loader(small_dataset, source_weights={"digits": 1.0})
    with pytest.raises(ValueError, match="max_length"):
        make_loader(small_dataset, max_length=12)
    with pytest.raises(ValueError, match="LoaderConfig.steps_per_epoch: one pass over split 'train' fills"):
        make_loader(small_dataset, resampled=False, steps_per_epoch=100_000)
    with pytest.raises(ValueError, match="fewer than the 600 loader slots"):
        make_loader(small_dataset, split="validation", world_size=300, num_workers=2)


# -- one pass over damaged shards, sha256 verification (foreign shards, indexed in place) --------------
@pytest.fixture
def foreign(tmp_path):
    """4 img2dataset-style shards x 30 samples, indexed where they are (sha256 recorded)."""
    from foreign_shards import write_img2dataset_shards

    from mmoe_ds.data.index import main as index

    write_img2dataset_shards(tmp_path / "shards", shards=4, samples=30)
    assert index(["--train", str(tmp_path / "shards" / "shard-{00000..00003}.tar"), "--out", str(tmp_path / "ds"),
                  "--image-size", "16", "--patch-size", "8", "--max-length", "32", "--vocab-size", "300"]) == 0
    return tmp_path


def member_offset(path, name: str, data: bool = False) -> int:
    with tarfile.open(path) as tar:
        member = tar.getmember(name)
        return member.offset_data if data else member.offset


def test_one_pass_over_a_damaged_shard_never_repeats_a_sample(foreign):
    shard = foreign / "shards" / "shard-00002.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:member_offset(shard, "000020010.jpg")])  # cut exactly at sample 10's first member
    loader = make_loader(foreign / "ds", composition={"image_text": 4}, max_length=32, num_workers=2, resampled=False)
    assert len(loader) == 30  # 2 slots x 60 samples / 4 per batch, as the manifest promises
    # Slot 0 reads shards 0 and 2: 30 + 9 readable (samples 0-8; 9 was still being assembled at the cut) = 9
    # full batches. Its 10th batch is global batch 18 (workers alternate): the epoch ends there, short.
    for epoch in range(2):
        keys = [k for batch in loader for k in batch["keys"]]
        assert len(keys) == 18 * 4 and len(set(keys)) == len(keys), "a sample was repeated within the epoch"
        assert not {k for k in keys if k.startswith("shard/00002")} - {f"shard/0000200{r:02d}" for r in range(9)}
    assert loader.short_epochs == {0: 18, 1: 18}
    assert loader.skip_counts()["corrupt_tar"] == 1


def test_one_pass_with_sample_level_slots_ends_short_instead_of_repeating(foreign):
    from mmoe_ds.data.index import main as index

    shard = foreign / "shards" / "shard-00002.tar"
    assert index(["--train", str(shard), "--out", str(foreign / "one"), "--tokenizer",
                  str(foreign / "ds" / "processor"), "--image-size", "16", "--patch-size", "8",
                  "--max-length", "32"]) == 0
    shard.write_bytes(shard.read_bytes()[:member_offset(shard, "000020010.jpg")])
    loader = make_loader(foreign / "one", composition={"image_text": 4}, max_length=32, num_workers=2, resampled=False)
    assert len(loader) == 6  # 1 shard < 2 slots: samples alternate between slots, 15 each, 3 batches each
    # Readable: samples 0-8. Slot 0 holds 0,2,4,6,8 (one batch of 4 of them), slot 1 holds 1,3,5,7 (one batch).
    rows = sorted(int(k[-4:]) for batch in loader for k in batch["keys"])
    assert [r for r in rows if r % 2] == [1, 3, 5, 7]
    assert len(set(rows)) == 8 and set(rows) - {1, 3, 5, 7} < {0, 2, 4, 6, 8}
    assert loader.short_epochs == {0: 2}


def test_sha256_verification_names_the_changed_shard_and_the_fix(foreign):
    shard = foreign / "shards" / "shard-00001.tar"
    raw = bytearray(shard.read_bytes())
    at = member_offset(shard, "000010003.txt", data=True)
    raw[at] ^= 0x20  # "a red ..." -> "A red ...": still a valid tar and a valid caption
    shard.write_bytes(bytes(raw))
    options = {"composition": {"image_text": 4}, "max_length": 32}
    assert len(take(iter(make_loader(foreign / "ds", **options)), 40)) == 40  # off (the default): no check, no error
    with pytest.raises(ValueError, match=r"LoaderConfig.verify_sha256: shard .*shard-00001.tar has sha256 .*re-run"):
        make_loader(foreign / "ds", verify_sha256=True, **options)
    shard.write_bytes(bytes(raw[:at]) + bytes([raw[at] ^ 0x20]) + bytes(raw[at + 1:]))  # restored
    make_loader(foreign / "ds", verify_sha256=True, **options)
    m = manifest(foreign / "ds")
    for info in m["shards"].values():
        del info["sha256"]
    (foreign / "ds" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="records no sha256 for shard .*--sha256"):
        make_loader(foreign / "ds", verify_sha256=True, **options)


@pytest.mark.parametrize("name", ["max_caption_bytes", "max_image_pixels"])
def test_caps_must_be_positive(small_dataset, name):
    with pytest.raises(ValueError, match=f"LoaderConfig.{name}"):
        LoaderConfig(str(small_dataset), **{name: 0})
