"""Sample streams and the batch sequence of one loader slot (one dataloader worker of one rank).

Slots: a rank's workers form `world_size * workers` slots, and every stream splits its shards
over them in one of two ways, chosen per stream:

- shard-level (the stream has at least as many shards as there are slots): whole shards are
  assigned to slots, largest first to the slot with the fewest samples so far (a fixed,
  deterministic assignment, `assign_shards`), so each shard is opened by exactly one slot and
  slots read only their own shards. Sample counts per slot are balanced up to one shard.
- sample-level (fewer shards than slots): sample i of a kind (its position in the manifest's
  sorted shard list) belongs to slot `i % n_slots`; every slot reads every shard of its streams
  but decodes only its own samples, so slots never overlap and get equal shares however few
  shards there are (one shard is enough for any number of ranks).

A stream serves one source's samples of one kind (or, in one-pass mode, all sources of a kind).
Its position is `[pass, shard cursor, samples served from that shard]`: its shards are visited
in an order seeded by (seed, stream, pass), and a shard's own samples in an order seeded by
(seed, stream, pass, shard), so the position alone restores the exact sequence after a resume.

Mixed shards: foreign shards may hold samples of several kinds. The manifest then lists the
count per kind (`kinds`), the shard appears in each of those kinds' streams, and each stream
keeps only the samples of its kind (`sample_kind`); the others are not errors. Shard-level
assignment is per stream, so a mixed shard is opened once per kind it holds.

Resampled streams cycle forever, each pass in a fresh order. One-pass streams (`one_pass=True`)
raise `PassExhausted` at the end of their pass instead: a sample is never served twice in an
epoch, even when damaged shards leave the slot short of what the manifest promised.
"""
from __future__ import annotations

import heapq
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .schema import SAMPLE_KINDS
from .shards import decode, infer_kind, iter_raw
from .skips import SkipLog


@dataclass(frozen=True)
class Shard:
    path: str  # its location: a local path, a URL or a `pipe:` command
    source: str
    samples: int  # samples of the stream's kind in it
    first_index: int  # position of its first sample among all samples of its kind in this split
    mixed: bool = False  # holds other samples too (other kinds, or unclassifiable): filter by kind


class NoReadableSamples(Exception):
    """A whole pass over a stream gave this slot no usable sample."""


class PassExhausted(Exception):
    """A one-pass stream served every sample of its pass (the epoch cannot go on without repeats)."""


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def sample_kind(files: dict[str, bytes]) -> str | None:
    """A raw sample's kind: the `modality` of its .json metadata when it has one (None if that is
    not a known kind or the JSON is unreadable), else inferred from its members (`infer_kind`).
    The one rule shared by `mmoe-ds index` (counting) and the streams (filtering mixed shards)."""
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, RecursionError):
            return None
        if not isinstance(meta, dict):
            return None
        if "modality" in meta:
            kind = meta["modality"]
            return kind if isinstance(kind, str) and kind in SAMPLE_KINDS else None
    return infer_kind(files)


def shard_level(shards: list[Shard], n_slots: int) -> bool:
    """Whether a stream over `shards` assigns whole shards to slots."""
    return len(shards) >= n_slots


def assign_shards(shards: list[Shard], n_slots: int) -> list[list[Shard]]:
    """Whole shards per slot: largest first (ties by location) to the slot holding the fewest
    samples (ties: lowest slot). Each slot's list keeps the input (manifest) order."""
    heap = [(0, slot) for slot in range(n_slots)]
    owner: dict[int, int] = {}
    for i in sorted(range(len(shards)), key=lambda i: (-shards[i].samples, shards[i].path)):
        load, slot = heapq.heappop(heap)
        owner[i] = slot
        heapq.heappush(heap, (load + shards[i].samples, slot))
    return [[s for i, s in enumerate(shards) if owner[i] == slot] for slot in range(n_slots)]


def slot_shares(shards: list[Shard], n_slots: int) -> list[int]:
    """Samples each slot gets from a stream over `shards` in one pass (per the manifest)."""
    if shard_level(shards, n_slots):
        return [sum(s.samples for s in own) for own in assign_shards(shards, n_slots)]
    total = sum(s.samples for s in shards)
    return [total // n_slots + int(slot < total % n_slots) for slot in range(n_slots)]


class Stream:
    """One slot's samples of one kind from a list of shards.

    Args:
        name, kind: the stream's name (seeds its orders) and the kind of sample it serves.
        shards: every shard of the stream (all slots); the slot's own share is derived here.
        slot, n_slots: this slot and how many there are.
        seed: the loader seed.
        skips: where bad data is counted.
        position: a saved `position()`, or None to start at pass 0.
        one_pass: raise PassExhausted at the end of a pass instead of starting the next.
        decode_options: keyword arguments for `shards.decode` (caption and pixel caps).
        on_shard_open: called as `on_shard_open(slot, location)` whenever a shard is opened
            (instrumentation: a test double, a metrics hook). Must be picklable for workers.
    """

    def __init__(self, name: str, kind: str, shards: list[Shard], slot: int, n_slots: int, seed: int,
                 skips: SkipLog, position: list[int] | None = None, one_pass: bool = False,
                 decode_options: dict | None = None, on_shard_open: Callable[[int, str], None] | None = None):
        self.name, self.kind, self.slot, self.n_slots = name, kind, slot, n_slots
        self.whole_shards = shard_level(shards, n_slots)
        self.shards = assign_shards(shards, n_slots)[slot] if self.whole_shards else shards
        self.seed, self.skips, self.one_pass = seed, skips, one_pass
        self.decode_options, self.on_shard_open = decode_options or {}, on_shard_open
        self.pass_, self.cursor, self.served = position or (0, 0, 0)
        self._samples: list | None = None  # this slot's raw samples of the open shard, in serving order
        self._order: tuple[int, np.ndarray] | None = None  # (pass, shard visiting order)
        self._usable_this_pass = 0
        self._pass_seen_from_start = self.cursor == 0 and self.served == 0

    def position(self) -> list[int]:
        return [self.pass_, self.cursor, self.served]

    def reset_to_pass(self, pass_: int) -> None:
        self.pass_, self.cursor, self.served, self._samples = pass_, 0, 0, None
        self._usable_this_pass, self._pass_seen_from_start = 0, True

    def _shard(self) -> Shard:
        if self._order is None or self._order[0] != self.pass_:
            rng = np.random.default_rng([self.seed, _crc(self.name), self.pass_])
            self._order = (self.pass_, rng.permutation(len(self.shards)))
        return self.shards[self._order[1][self.cursor]]

    def _open(self, shard: Shard) -> None:
        if self.on_shard_open is not None:
            self.on_shard_open(self.slot, shard.path)
        own, found = [], 0
        cap = self.decode_options.get("max_caption_bytes")
        for key, files in iter_raw(shard.path, self.skips, **({} if cap is None else {"max_caption_bytes": cap})):
            if shard.mixed and sample_kind(files) != self.kind:
                continue  # another kind's sample (its own stream serves it), or one the manifest did not count
            if self.whole_shards or (shard.first_index + found) % self.n_slots == self.slot:
                own.append((key, files))
            found += 1
        if found != shard.samples and not self._flagged(shard):  # e.g. a valid tar other than the one indexed
            self.skips.add("corrupt_tar", shard.path, detail=f"{found} {self.kind} samples, the manifest lists "
                                                             f"{shard.samples}")
        order = np.random.default_rng([self.seed, _crc(self.name), self.pass_, _crc(shard.path.rsplit("/", 1)[-1])])
        self._samples = [own[i] for i in order.permutation(len(own))]

    def _flagged(self, shard: Shard) -> bool:
        """The reader already counted this shard as damaged or unreadable."""
        state, name = self.skips.state(), Path(shard.path).name
        return any(name in state.get(reason, ()) for reason in ("corrupt_tar", "unreadable_shard"))

    def reject(self) -> None:
        """The last sample decoded but could not be used (e.g. the processor refused it)."""
        self._usable_this_pass -= 1

    def next(self) -> dict:
        """The next usable sample. Raises NoReadableSamples after a full pass without one, or, in
        one-pass mode, PassExhausted at the end of the pass."""
        while True:
            if self.cursor >= len(self.shards):  # the end of a pass
                if self.one_pass:
                    raise PassExhausted(self.name)
                if not self.shards or (self._pass_seen_from_start and self._usable_this_pass == 0):
                    raise NoReadableSamples(self.name)
                self.reset_to_pass(self.pass_ + 1)
            shard = self._shard()
            if self._samples is None:
                self._open(shard)
            if self.served < len(self._samples):
                key, files = self._samples[self.served]
                self.served += 1
                sample = decode(shard.path, key, files, self.kind, self.skips, **self.decode_options)
                if sample is not None:
                    self._usable_this_pass += 1
                    sample["source"], sample["shard"] = shard.source, shard.path
                    return sample
                continue
            self._samples, self.cursor, self.served = None, self.cursor + 1, 0


class SlotBatches:
    """The batch sequence of one slot: batch b draws each sample's source with an RNG seeded by
    (seed, slot, b), so the sequence depends only on the config and the stream positions.
    `next_batch` raises PassExhausted when a one-pass stream runs out (the samples already drawn
    for that batch are not served)."""

    def __init__(self, streams: dict[str, list[Stream]], weights: dict[str, np.ndarray], composition: dict[str, int],
                 balance_by: str, processor, seed: int, slot: int, skips: SkipLog, batch: int = 0,
                 dead: list[str] | None = None):
        self.streams, self.composition, self.balance_by = streams, composition, balance_by
        self.processor, self.seed, self.slot, self.skips, self.batch = processor, seed, slot, skips, batch
        self.dead = set(dead or ())
        self.weights = {}
        for kind, w in weights.items():
            w = np.array([0.0 if s.name in self.dead else x for s, x in zip(streams[kind], w)])
            self.weights[kind] = w / w.sum() if w.sum() > 0 else w

    def state(self) -> dict:
        return {"batch": self.batch, "skips": self.skips.state(), "dead": sorted(self.dead),
                "streams": {s.name: s.position() for streams in self.streams.values() for s in streams}}

    def _drop(self, kind: str, index: int) -> None:
        stream = self.streams[kind][index]
        self.dead.add(stream.name)
        self.skips.add("dead_source", stream.name, detail=f"no usable sample for loader slot {self.slot} in a whole "
                                                         "pass; dropped from the mix")
        w = self.weights[kind].copy()
        w[index] = 0.0
        if w.sum() == 0:
            raise RuntimeError(f"no readable {kind!r} samples left for loader slot {self.slot}: every shard of that "
                               "kind is damaged. Re-run `mmoe-ds prepare` or set its composition count to 0.")
        self.weights[kind] = w / w.sum()

    def _draw(self, kind: str, rng: np.random.Generator) -> dict:
        """The next sample of `kind`, from a source drawn by weight, already encoded."""
        while True:
            i = int(rng.choice(len(self.streams[kind]), p=self.weights[kind]))
            stream = self.streams[kind][i]
            try:
                sample = stream.next()
            except NoReadableSamples:
                self._drop(kind, i)
                continue
            try:
                encoded = self.processor.encode(sample["image"], sample["text"])
            except Exception as e:  # e.g. an image mode the processor cannot convert: skip, never crash
                stream.reject()  # a source the processor refuses entirely ends up dropped, not looping
                self.skips.add("bad_image" if sample["image"] is not None else "bad_text", sample["shard"],
                               sample["key"], f"processor: {type(e).__name__}: {e}"[:120])
                continue
            encoded["key"] = f"{sample['source']}/{sample['key']}"
            return encoded

    def next_batch(self) -> dict:
        rng = np.random.default_rng([self.seed, self.slot, self.batch])
        encoded = []
        for kind in SAMPLE_KINDS:  # kinds in a fixed order inside every batch
            target, taken = self.composition.get(kind, 0), 0
            while taken < target:  # samples, or tokens (image positions included) with balance_by="tokens"
                encoded.append(self._draw(kind, rng))
                taken += len(encoded[-1]["input_ids"]) if self.balance_by == "tokens" else 1
        self.batch += 1
        batch = self.processor.collate(encoded)
        batch["keys"] = [e["key"] for e in encoded]  # sample identities, for logs and the disjointness tests
        return batch
