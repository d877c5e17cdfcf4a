"""Scale: with at least as many shards as loader slots, whole shards go to slots. 64 shards,
2 ranks x 2 dataloader workers (real worker processes): each shard is opened by exactly one slot
per epoch, every sample is yielded once, and a resume in the middle of a shard reproduces the
next 100 batches."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from foreign_shards import write_img2dataset_shards
from test_data_loader import across_epochs

from mmoe_ds.data import BalancedLoader, LoaderConfig
from mmoe_ds.data.index import main as index

SHARDS, PER_SHARD, BATCH, RANKS, WORKERS = 64, 8, 4, 2, 2


class OpenLog:
    """Test double for the loader's `on_shard_open` hook: one line per opened shard, appended to a
    file, so that openings in dataloader worker processes are seen too."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, slot: int, location: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{slot}\t{location}\n")

    def read(self) -> list[tuple[int, str]]:
        if not self.path.exists():
            return []
        return [(int(slot), loc) for slot, loc in (line.split("\t") for line in self.path.read_text().splitlines())]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    owner = write_img2dataset_shards(folder / "shards", shards=SHARDS, samples=PER_SHARD)
    assert index(["--train", str(folder / "shards" / "shard-{00000..00063}.tar"), "--out", str(folder / "ds"),
                  "--image-size", "16", "--patch-size", "8", "--max-length", "32", "--vocab-size", "300"]) == 0
    return folder / "ds", {f"shard/{key}": name for key, name in owner.items()}


def make(data_dir, rank: int, hook=None, **overrides) -> BalancedLoader:
    cfg = LoaderConfig(str(data_dir), composition={"image_text": BATCH}, rank=rank, world_size=RANKS,
                       num_workers=WORKERS, max_length=32, seed=11, **overrides)
    return BalancedLoader(cfg, on_shard_open=hook)


def test_each_shard_is_read_by_exactly_one_slot_per_epoch(dataset, tmp_path):
    data_dir, owner = dataset
    log = OpenLog(tmp_path / "opens.tsv")
    loaders = [make(data_dir, rank, log, resampled=False) for rank in range(RANKS)]
    per_slot = SHARDS * PER_SHARD // (RANKS * WORKERS)  # 128 samples: 16 whole shards per slot
    assert [len(ld) for ld in loaders] == [per_slot // BATCH * WORKERS] * RANKS  # 64 batches on each rank
    for epoch in range(2):
        before = len(log.read())
        slot_of_shard, seen = defaultdict(set), Counter()
        for rank, ld in enumerate(loaders):
            for n, batch in enumerate(ld):
                slot = rank * WORKERS + n % WORKERS  # batch n of a rank comes from its worker n % WORKERS
                for key in batch["keys"]:
                    slot_of_shard[owner[key]].add(slot)
                    seen[key] += 1
            assert ld.epoch_batches == 64 and not ld.short_epochs
        opens = log.read()[before:]
        assert sorted(Path(loc).name for _, loc in opens) == sorted(set(owner.values()))  # 64 opens, one per shard
        opened_by = {Path(loc).name: slot for slot, loc in opens}
        assert all(slots == {opened_by[shard]} for shard, slots in slot_of_shard.items())
        assert Counter(opened_by.values()) == {slot: 16 for slot in range(RANKS * WORKERS)}
        assert seen == {key: 1 for key in owner}  # all 512 samples, each once per epoch


def test_resampled_slots_stay_on_their_own_shards(dataset, tmp_path):
    data_dir, owner = dataset
    log = OpenLog(tmp_path / "opens.tsv")
    shards_of_rank = []
    for rank in range(RANKS):
        it = iter(make(data_dir, rank, log))
        shards_of_rank.append({owner[k] for _ in range(80) for k in next(it)["keys"]})  # 320 draws: > 2 passes
    assert not shards_of_rank[0] & shards_of_rank[1] and len(shards_of_rank[0] | shards_of_rank[1]) == SHARDS
    slots_of_shard = defaultdict(set)
    for slot, loc in log.read():
        slots_of_shard[Path(loc).name].add(slot)
    assert len(slots_of_shard) == SHARDS and all(len(s) == 1 for s in slots_of_shard.values())




@pytest.mark.parametrize("resampled", [True, False])
def test_a_resume_in_the_middle_of_a_shard_reproduces_the_next_100_batches(dataset, resampled):
    data_dir, _ = dataset
    k = 6  # 3 batches per worker: 12 samples, the middle of each slot's second 8-sample shard
    uninterrupted = across_epochs(make(data_dir, 1, resampled=resampled), k + 100)[k:]
    first = make(data_dir, 1, resampled=resampled)
    across_epochs(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    positions = [p for w in state["workers"].values() for p in w["streams"].values()]
    assert positions == [[0, 1, 4], [0, 1, 4]]  # [pass, shard cursor, samples served from that shard]
    resumed = make(data_dir, 1, resampled=resampled)
    resumed.load_state_dict(state)
    again = across_epochs(resumed, 100)
    for a, b in zip(uninterrupted, again, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_patches"], b["pixel_patches"])
