"""Modality-balanced WebDataset loader.

Every batch holds exactly `composition` samples of each kind (image+text pairs, text-only,
image-only), in that order, so experts of an under-represented modality are never starved.
With `balance_by="tokens"` the composition is a token budget per kind instead: each kind gets
samples until its tokens (image patches included) reach the budget, so the batch's modality
mix holds by tokens whatever the caption and text lengths.

Sharding: the processes' dataloader workers form `world_size × num_workers` slots; a sample
belongs to slot `canonical_id % slots` (its position in the manifest's shard order), so slots
never overlap within an epoch, however few shards there are.

Steps: every rank yields the same number of batches per epoch (`steps_per_epoch`, by default
what the smallest slot can fill), because ranks that run out of data at different times hang
DDP/DeepSpeed collectives, a known trap with WebDataset.

Mixing: `resampled=True` (training) draws each sample's source by `source_weights` from
per-source streams that cycle forever; `resampled=False` makes one pass over each kind's shards.

Determinism and resume: the source draws of batch b come from a generator seeded by
(seed, slot, b), and each stream's position is (epoch, shard cursor, samples consumed), so
`state_dict()` is a small JSON object and a resumed loader yields exactly the batches an
uninterrupted one would have.

Bad data never raises: damaged tars, missing keys, undecodable images, empty captions and unknown
modality tags are skipped, counted per reason (`skip_counts()`) and logged with shard and key.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .processor import MmoeProcessor
from .schema import SAMPLE_KINDS
from .shards import SKIP_REASONS, decode, iter_raw

log = logging.getLogger("mmoe_ds.data")


@dataclass
class LoaderConfig:
    data_dir: str
    split: str = "train"
    composition: dict[str, int] = field(default_factory=lambda: {"image_text": 6, "text": 1, "image": 1})
    source_weights: dict[str, float] | None = None  # default: proportional to each source's size
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    resampled: bool = True
    steps_per_epoch: int | None = None  # batches per rank; None: infinite if resampled, else one pass
    max_length: int = 64
    balance_by: str = "samples"  # or "tokens": composition values are token budgets per kind

    def __post_init__(self):
        manifest = Path(self.data_dir) / "manifest.json"
        if not manifest.exists():
            raise ValueError(f"LoaderConfig.data_dir: {self.data_dir} has no manifest.json; run `mmoe-ds prepare --out {self.data_dir}`.")
        bad = sorted(set(self.composition) - set(SAMPLE_KINDS))
        if bad or sum(self.composition.values()) < 1 or min(self.composition.values()) < 0:
            raise ValueError(f"LoaderConfig.composition: kinds must be {list(SAMPLE_KINDS)} with counts >= 0 "
                             f"summing to >= 1, got {self.composition}.")
        if self.balance_by not in ("samples", "tokens"):
            raise ValueError(f"LoaderConfig.balance_by: 'samples' or 'tokens', got {self.balance_by!r}.")
        if self.balance_by == "tokens" and not self.resampled and self.steps_per_epoch is None:
            raise ValueError("LoaderConfig.steps_per_epoch: a one-pass loader balanced by tokens needs an explicit "
                             "number of steps per epoch (samples per batch vary).")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"LoaderConfig.rank: {self.rank} is outside 0..{self.world_size - 1} (world_size).")
        if self.num_workers < 0:
            raise ValueError("LoaderConfig.num_workers: must be >= 0.")
        if self.steps_per_epoch is not None and self.num_workers and self.steps_per_epoch % self.num_workers:
            raise ValueError(f"LoaderConfig.steps_per_epoch={self.steps_per_epoch} must be a multiple of "
                             f"num_workers={self.num_workers} so every worker yields the same number of batches.")

    @property
    def batch_size(self) -> int:
        return sum(self.composition.values())


def _shards_by_kind(cfg: LoaderConfig) -> dict[str, list[tuple[str, str, int, int]]]:
    """kind -> [(source, path, samples, canonical offset)] in manifest order."""
    manifest = json.loads((Path(cfg.data_dir) / "manifest.json").read_text())
    out: dict[str, list] = {}
    offsets: Counter = Counter()
    for rel, info in sorted(manifest["shards"].items()):
        if info["split"] != cfg.split or cfg.composition.get(info["kind"], 0) == 0:
            continue
        out.setdefault(info["kind"], []).append((info["source"], str(Path(cfg.data_dir) / rel), info["samples"],
                                                 offsets[info["kind"]]))
        offsets[info["kind"]] += info["samples"]
    missing = [k for k, n in cfg.composition.items() if n and k not in out]
    if missing:
        raise ValueError(f"LoaderConfig.composition: split {cfg.split!r} of {cfg.data_dir} has no {missing} samples; "
                         f"set their counts to 0 or prepare data that has them.")
    return out


class NoReadableSamples(Exception):
    """A whole epoch of a stream held no usable sample for this slot."""


class _Stream:
    """Samples of one kind from some shards, restricted to one slot; position is JSON state."""

    def __init__(self, name, kind, shards, slot, n_slots, seed, skips, state=None):
        self.name, self.kind, self.shards, self.slot, self.n_slots = name, kind, shards, slot, n_slots
        self.seed, self.skips = seed, skips
        self.epoch, self.cursor, self.consumed = state or (0, 0, 0)
        self._raw, self._valid_in_epoch = None, 0
        self._whole_epoch_seen = self.cursor == 0 and self.consumed == 0

    def state(self) -> list[int]:
        return [self.epoch, self.cursor, self.consumed]

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), self.epoch]).permutation(len(self.shards))

    def _open(self) -> None:
        _, path, _, _ = self.shards[self._order()[self.cursor]]
        self._raw = iter_raw(path, self.skips)
        for _ in range(self.consumed):  # resume inside a shard
            next(self._raw, None)

    def next(self) -> dict:
        while True:
            if self._raw is None:
                self._open()
            item = next(self._raw, None)
            if item is None:
                self._raw, self.cursor, self.consumed = None, self.cursor + 1, 0
                if self.cursor == len(self.shards):  # next epoch, in a new shard order
                    if self._valid_in_epoch == 0 and self._whole_epoch_seen:
                        raise NoReadableSamples(self.name)
                    self.epoch, self.cursor, self._valid_in_epoch, self._whole_epoch_seen = self.epoch + 1, 0, 0, True
                continue
            shard = self.shards[self._order()[self.cursor]]
            index = shard[3] + self.consumed
            self.consumed += 1
            if index % self.n_slots != self.slot:
                continue
            sample = decode(shard[1], item[0], item[1], self.kind, self.skips)
            if sample is not None:
                self._valid_in_epoch += 1
                return sample


class _SlotBatches:
    """The batch sequence of one slot (a rank's worker)."""

    def __init__(self, cfg: LoaderConfig, processor: MmoeProcessor, slot: int, n_slots: int, state: dict | None):
        self.cfg, self.processor, self.slot = cfg, processor, slot
        state = state or {}
        self.batch = state.get("batch", 0)
        self.skips = Counter(state.get("skips", {}))
        streams_state = state.get("streams", {})
        self.streams: dict[str, list[_Stream]] = {}
        self.weights: dict[str, np.ndarray] = {}
        for kind, shards in _shards_by_kind(cfg).items():
            groups = {}
            for s in shards:
                groups.setdefault(s[0] if cfg.resampled else "all", []).append(s)
            names = sorted(groups)
            self.streams[kind] = [
                _Stream(f"{kind}/{n}", kind, groups[n], slot, n_slots, cfg.seed, self.skips,
                        streams_state.get(f"{kind}/{n}")) for n in names]
            if cfg.resampled and cfg.source_weights is not None:
                missing = [n for n in names if n not in cfg.source_weights]
                if missing:
                    raise ValueError(f"LoaderConfig.source_weights: no weight for sources {missing} of kind {kind!r}.")
                w = np.array([cfg.source_weights[n] for n in names], dtype=float)
            else:
                w = np.array([sum(s[2] for s in groups[n]) for n in names], dtype=float)
            self.weights[kind] = np.array(state["weights"][kind]) if "weights" in state else w / w.sum()

    def state(self) -> dict:
        return {"batch": self.batch, "skips": dict(self.skips), "weights": {k: w.tolist() for k, w in self.weights.items()},
                "streams": {s.name: s.state() for streams in self.streams.values() for s in streams}}

    def _draw(self, kind: str, rng: np.random.Generator) -> dict:
        """Next sample of `kind` from a source drawn by weight; an unreadable source is dropped."""
        while True:
            i = rng.choice(len(self.streams[kind]), p=self.weights[kind])
            try:
                return self.streams[kind][i].next()
            except NoReadableSamples as e:
                self.skips["dead_source"] += 1
                log.warning("source %s has no readable samples for slot %d; dropping it", e, self.slot)
                w = self.weights[kind].copy()
                w[i] = 0.0
                if w.sum() == 0:
                    raise RuntimeError(f"no readable {kind} samples left in split {self.cfg.split!r} of "
                                       f"{self.cfg.data_dir} for slot {self.slot}; every shard is damaged.") from None
                self.weights[kind] = w / w.sum()

    def next_batch(self) -> dict:
        rng = np.random.default_rng([self.cfg.seed, self.slot, self.batch])
        encoded, keys = [], []
        for kind in SAMPLE_KINDS:
            count = self.cfg.composition.get(kind, 0)
            if not count:
                continue
            taken = 0  # samples, or tokens with balance_by="tokens"
            while taken < count:
                s = self._draw(kind, rng)
                encoded.append(self.processor.encode(s["image"], s["text"]))
                keys.append(f"{s['meta'].get('source')}/{s['key']}")
                taken += len(encoded[-1]["input_ids"]) if self.cfg.balance_by == "tokens" else 1
        self.batch += 1
        batch = self.processor.collate(encoded)
        batch["keys"] = keys  # sample identities, for logging and the disjointness tests
        return batch


def slot_capacity(cfg: LoaderConfig, n_slots: int) -> int:
    """Batches the smallest slot can fill in one pass (what `resampled=False` yields per slot)."""
    per_kind = [sum(s[2] for s in shards) // n_slots // cfg.composition[k] for k, shards in _shards_by_kind(cfg).items()]
    return max(min(per_kind), 0)


class _WorkerDataset(IterableDataset):
    def __init__(self, loader: "BalancedLoader", start_batch: int, count: int | None):
        self.loader, self.start_batch, self.count = loader, start_batch, count

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        W = max(self.loader.cfg.num_workers, 1)
        logical = (physical + self.start_batch) % W  # after resume, batch n comes from logical worker n % W
        slots = self.loader.make_slot(logical)
        produced = 0
        while self.count is None or produced < self._share(logical, W):
            batch = slots.next_batch()
            produced += 1
            batch["_state"] = json.dumps(slots.state())
            batch["_worker"] = torch.tensor(logical)
            yield batch

    def _share(self, logical: int, W: int) -> int:
        """Batches this logical worker contributes to the next `count` batches."""
        first = (logical - self.start_batch) % W
        return 0 if first >= self.count else (self.count - first + W - 1) // W


class BalancedLoader:
    """Iterable over batch dicts; `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, cfg: LoaderConfig, processor: MmoeProcessor | None = None):
        self.cfg = cfg
        self.processor = processor or MmoeProcessor.from_pretrained(Path(cfg.data_dir) / "processor")
        self.processor.max_length = cfg.max_length
        self.workers = max(cfg.num_workers, 1)
        self.n_slots = cfg.world_size * self.workers
        self._worker_states: dict[int, dict] = {}
        self.batches = 0  # yielded so far (all epochs)
        self.epoch_batches = 0  # yielded in the current epoch
        self.steps_per_epoch = cfg.steps_per_epoch
        if self.steps_per_epoch is None and not cfg.resampled:
            self.steps_per_epoch = slot_capacity(cfg, self.n_slots) * self.workers

    def make_slot(self, logical_worker: int) -> _SlotBatches:
        return _SlotBatches(self.cfg, self.processor, self.cfg.rank * self.workers + logical_worker, self.n_slots,
                            self._worker_states.get(logical_worker))

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("an infinite resampled loader has no length; set steps_per_epoch")
        return self.steps_per_epoch

    def __iter__(self):
        remaining = None if self.steps_per_epoch is None else self.steps_per_epoch - self.epoch_batches
        if remaining == 0:
            self.epoch_batches, remaining = 0, self.steps_per_epoch
        if self.cfg.num_workers == 0:
            source = _WorkerDataset(self, self.batches, remaining)
        else:
            source = DataLoader(_WorkerDataset(self, self.batches, remaining), batch_size=None,
                                num_workers=self.cfg.num_workers, persistent_workers=False)
        for batch in source:
            self._worker_states[int(batch.pop("_worker"))] = json.loads(batch.pop("_state"))
            self.batches += 1
            self.epoch_batches += 1
            yield batch
        if self.steps_per_epoch is not None:
            self.epoch_batches = 0

    def state_dict(self) -> dict:
        return {"batches": self.batches, "epoch_batches": self.epoch_batches,
                "workers": {str(k): v for k, v in self._worker_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.epoch_batches = state["batches"], state["epoch_batches"]
        self._worker_states = {int(k): v for k, v in state["workers"].items()}

    def skip_counts(self) -> dict[str, int]:
        total = Counter()
        for s in self._worker_states.values():
            total.update(s["skips"])
        return {r: int(total.get(r, 0)) for r in SKIP_REASONS}
