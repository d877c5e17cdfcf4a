"""Modality-balanced WebDataset loader.

Composition: every batch holds exactly `composition[kind]` samples of each kind (image+text
pairs, text-only, image-only), kinds in that order, so the experts of a rarer modality are never
starved by chance. With `balance_by="tokens"` the numbers are token budgets instead: each kind
gets samples until its tokens (image positions included) reach its budget, so the modality mix
holds by tokens whatever the caption lengths.

Mixing: with `resampled=True` (training) each sample's source is drawn by `source_weights`
(default: proportional to source size) from per-source streams that cycle forever, each pass in
a fresh shard order. `resampled=False` makes one pass per epoch over every sample of each kind.

Sharding: see `streams`; ranks and dataloader workers get disjoint shares of every kind: whole
shards per slot when a stream has at least as many shards as there are slots (each shard opened
by one slot only), single samples per slot otherwise. Shard locations in the manifest may be
paths relative to the dataset folder, absolute paths, URLs or `pipe:` commands (`shard_location`).

Steps: every rank yields the same number of batches per epoch (`steps_per_epoch`; by default, in
one-pass mode, what the smallest share can fill). Ranks whose data runs out at different times
hang DDP/DeepSpeed collectives, a known trap with WebDataset and uneven shard counts; a fixed
step count cannot run out (a share short of samples, because some were bad, tops up from the
next pass in resampled mode).

One pass (`resampled=False`): a sample is never yielded twice in an epoch. If damaged shards leave
a slot short of the samples the manifest promised, that rank's epoch ends early, at the first batch
the slot cannot fill (a warning names it; `short_epochs` records it; the damage itself is in
`skip_counts()`), rather than topping up with repeats. Ranks can then disagree on the epoch's
length, so with several ranks use one-pass mode where that is harmless (evaluation that sums
counts) or check the shards first (`verify_sha256=True`); training should stay resampled.

Determinism and resume: batches depend only on the config and on stream positions; `state_dict()`
(small, JSON-serialisable: positions, batch counters, skip records) saved with a checkpoint lets a
new loader yield exactly the batches an uninterrupted one would have, with or without workers.

Bad data never raises: damaged tars, missing members, undecodable images or text, empty captions
and unknown modality tags are skipped, logged with shard and key, and counted (`skip_counts()`).
Captions longer than `max_caption_bytes` are cut before tokenization, images above
`max_image_pixels` are skipped before a full decode. With `verify_sha256=True` every shard this
rank will read is checked against the manifest's sha256 at construction (a ValueError names the
first shard that differs).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import has_manifest, read_manifest, shard_kinds
from .processor import MmoeProcessor
from .schema import SAMPLE_KINDS, SPLITS
from .shards import MAX_CAPTION_BYTES, MAX_IMAGE_PIXELS, open_shard
from .skips import SkipLog
from .streams import PassExhausted, Shard, SlotBatches, Stream, assign_shards, shard_level, slot_shares

log = logging.getLogger("mmoe_ds.data")
STATE_FORMAT = 1
SHARED_MEMORY_MIN_BYTES = 1 << 20  # worker -> main: tensors at least this big travel in shared memory
# The loader's caps on what it reads, with their defaults (a recipe's `data` section passes them through).
LOADER_LIMITS = {"max_caption_bytes": MAX_CAPTION_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS}


def composition_problem(composition) -> str | None:
    """What a per-batch composition (kind -> samples, or token budget with balance_by="tokens") must
    be, or None when it is fine: LoaderConfig and the recipe's data.composition check it alike."""
    ok = (isinstance(composition, dict) and not set(composition) - set(SAMPLE_KINDS)
          and all(isinstance(n, int) and n >= 0 for n in composition.values()) and sum(composition.values()) >= 1)
    return None if ok else f"must map kinds {list(SAMPLE_KINDS)} to integers >= 0 with a positive total"


def limit_problem(value) -> str | None:
    """What a loader cap (one of LOADER_LIMITS) must be, or None when `value` is fine."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else "must be an integer >= 1"


@dataclass
class LoaderConfig:
    data_dir: str
    split: str = "train"
    composition: dict[str, int] = field(default_factory=lambda: {"image_text": 6, "text": 1, "image": 1})
    source_weights: dict[str, float] | None = None  # resampled mode; default: proportional to source size
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    resampled: bool = True
    steps_per_epoch: int | None = None  # batches per rank; None: infinite if resampled, else one full pass
    max_length: int = 64
    balance_by: str = "samples"  # or "tokens": composition values are token budgets per kind
    verify_sha256: bool = False  # check every shard this loader reads against the manifest at start
    max_caption_bytes: int = MAX_CAPTION_BYTES  # captions/texts are cut to this many UTF-8 bytes before tokenizing
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped (counted) before a full decode

    def __post_init__(self):
        self.data_dir = str(self.data_dir)
        if not has_manifest(self.data_dir):
            raise ValueError(f"LoaderConfig.data_dir: {self.data_dir} has no manifest.json; run "
                             f"`mmoe-ds prepare --out {self.data_dir}` first.")
        if self.split not in SPLITS:
            raise ValueError(f"LoaderConfig.split: one of {list(SPLITS)}, got {self.split!r}.")
        self.composition = dict(self.composition)
        problem = composition_problem(self.composition)
        if problem:
            raise ValueError(f"LoaderConfig.composition: {problem}, got {self.composition}.")
        if self.balance_by not in ("samples", "tokens"):
            raise ValueError(f"LoaderConfig.balance_by: 'samples' or 'tokens', got {self.balance_by!r}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"LoaderConfig.rank: {self.rank} must lie in 0..world_size-1 (world_size="
                             f"{self.world_size}).")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers: must be >= 0, got {self.num_workers}.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"LoaderConfig.steps_per_epoch: None or >= 1, got {self.steps_per_epoch}.")
        if self.balance_by == "tokens" and not self.resampled and self.steps_per_epoch is None:
            raise ValueError("LoaderConfig.steps_per_epoch: a one-pass loader balanced by tokens needs an explicit "
                             "number of steps (samples per batch vary), or use resampled=True.")
        for name in LOADER_LIMITS:
            problem = limit_problem(getattr(self, name))
            if problem:
                raise ValueError(f"LoaderConfig.{name}: {problem}, got {getattr(self, name)!r}.")
        if self.source_weights is not None:
            if not self.resampled:
                raise ValueError("LoaderConfig.source_weights: only used with resampled=True (a one-pass epoch reads "
                                 "every sample once); drop the weights or set resampled=True.")
            bad = {s: w for s, w in self.source_weights.items() if not (math.isfinite(w) and w >= 0)}
            if bad:
                raise ValueError(f"LoaderConfig.source_weights: weights must be finite and >= 0, got {bad}.")

    @property
    def batch_size(self) -> int:
        """Samples per batch (with balance_by="tokens" the count varies; this is then the token budget)."""
        return sum(self.composition.values())

    def active_kinds(self) -> list[str]:
        return [k for k in SAMPLE_KINDS if self.composition.get(k, 0) > 0]


def shard_location(data_dir: str | os.PathLike, rel: str) -> str:
    """Where a manifest's shard lives: a relative path is joined to the dataset folder; an absolute
    path, a URL (`https://`, `s3://`, `file://`...) or a `pipe:` command is used as it is."""
    if rel.startswith("pipe:") or "://" in rel or os.path.isabs(rel):
        return rel
    return str(Path(data_dir) / rel)


def shard_table(data_dir: str, split: str) -> dict[str, list[Shard]]:
    """kind -> its shards in this split, sorted by manifest location, each with its first sample's
    index among that kind's samples. A shard holding other samples too is marked `mixed` (its
    streams filter by kind)."""
    manifest = read_manifest(data_dir)
    table: dict[str, list[Shard]] = {}
    for rel, info in sorted(manifest["shards"].items()):
        if info["split"] != split:
            continue
        kinds = shard_kinds(info)
        mixed = len(kinds) > 1 or info.get("unclassified", 0) > 0
        for kind, n in kinds.items():
            shards = table.setdefault(kind, [])
            first = shards[-1].first_index + shards[-1].samples if shards else 0
            shards.append(Shard(shard_location(data_dir, rel), info["source"], n, first, mixed))
    return table


def file_sha256(location: str) -> str:
    """sha256 of a shard's bytes, read through the shard opener (paths, URLs, `pipe:`)."""
    digest = hashlib.sha256()
    with open_shard(location) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(data_dir: str, locations: list[str]) -> None:
    """Raise a ValueError naming the first of `locations` whose sha256 differs from the manifest's."""
    manifest = read_manifest(data_dir)
    recorded = {shard_location(data_dir, rel): info.get("sha256") for rel, info in manifest["shards"].items()}
    for location in sorted(set(locations)):
        want = recorded.get(location)
        if not want:
            raise ValueError(f"LoaderConfig.verify_sha256: the manifest of {data_dir} records no sha256 for shard "
                             f"{location}; re-run `mmoe-ds index` with --sha256 on, or set verify_sha256=False.")
        try:
            got = file_sha256(location)
        except OSError as e:
            raise ValueError(f"LoaderConfig.verify_sha256: shard {location} cannot be read ({e}); restore it or "
                             "re-run `mmoe-ds prepare`/`mmoe-ds index`.") from None
        if got != want:
            raise ValueError(f"LoaderConfig.verify_sha256: shard {location} has sha256 {got[:16]}..., the manifest "
                             f"records {want[:16]}...: the file changed after it was indexed; restore it, or re-run "
                             "`mmoe-ds prepare`/`mmoe-ds index` to accept the new contents.")


def _data_fingerprint(data_dir: str) -> str:
    manifest = read_manifest(data_dir)
    return hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()[:16]


class BalancedLoader:
    """Iterable over batch dicts (see `MmoeProcessor.collate`, plus `keys`: "source/key" per sample).

    Args:
        cfg: the loader configuration.
        processor: the processor to encode with (default: the dataset's `processor/`).
        on_shard_open: optional hook called as `on_shard_open(slot, location)` each time a slot
            opens a shard, in whichever process reads it (so it must be picklable, and record to
            somewhere all processes share, e.g. a file). For instrumentation and tests.
    """

    def __init__(self, cfg: LoaderConfig, processor: MmoeProcessor | None = None,
                 on_shard_open: Callable[[int, str], None] | None = None):
        self.cfg, self.on_shard_open = cfg, on_shard_open
        processor = processor or MmoeProcessor.from_pretrained(Path(cfg.data_dir) / "processor")
        self.processor = copy.copy(processor)  # own max_length, shared tokenizer
        self.processor.max_length = cfg.max_length
        self.workers = max(cfg.num_workers, 1)
        self.n_slots = cfg.world_size * self.workers
        self.specs, self.weights = self._stream_specs(shard_table(cfg.data_dir, cfg.split))
        if cfg.verify_sha256:
            verify_shards(cfg.data_dir, self._shards_of_this_rank())
        self.steps_per_epoch = cfg.steps_per_epoch
        if not cfg.resampled and cfg.balance_by == "samples":
            fill = self._one_pass_steps()
            if self.steps_per_epoch is not None and self.steps_per_epoch > fill:
                raise ValueError(f"LoaderConfig.steps_per_epoch: one pass over split {cfg.split!r} fills {fill} "
                                 f"batches per rank, fewer than {self.steps_per_epoch} (a one-pass loader never "
                                 "repeats a sample); set at most that many, leave it None, or use resampled=True.")
            self.steps_per_epoch = self.steps_per_epoch or fill
        self.fingerprint = _data_fingerprint(cfg.data_dir)
        self.batches, self.epoch, self.epoch_batches = 0, 0, 0  # yielded: in all, epochs done, in this epoch
        self._worker_states: dict[int, dict] = {}
        self.short_epochs: dict[int, int] = {}  # one-pass epochs that ended early: epoch -> batches it had

    # -- construction -------------------------------------------------------------------------------
    def _stream_specs(self, table: dict[str, list[Shard]]):
        """kind -> [(stream name, shards)] and kind -> weights. Resampled: one stream per source."""
        cfg, specs, weights = self.cfg, {}, {}
        for kind in cfg.active_kinds():
            shards = table.get(kind, [])
            total = sum(s.samples for s in shards)
            if min(slot_shares(shards, self.n_slots)) == 0:
                raise ValueError(f"LoaderConfig.composition: split {cfg.split!r} of {cfg.data_dir} has {total} "
                                 f"{kind!r} samples, fewer than the {self.n_slots} loader slots (world_size x "
                                 f"workers); set its count to 0 or prepare more data.")
            if not cfg.resampled:
                specs[kind], weights[kind] = [(f"{kind}:all", shards)], np.ones(1)
                continue
            by_source: dict[str, list[Shard]] = {}
            for s in shards:
                by_source.setdefault(s.source, []).append(s)
            names, w = sorted(by_source), []
            for source in names:
                size = sum(s.samples for s in by_source[source])
                smallest_share = min(slot_shares(by_source[source], self.n_slots))
                weight = size if cfg.source_weights is None else cfg.source_weights.get(source)
                if weight is None:
                    raise ValueError(f"LoaderConfig.source_weights: no weight for source {source!r} ({kind!r} "
                                     f"samples in split {cfg.split!r}); give every source a weight (0 to leave out).")
                if smallest_share == 0 and weight > 0:  # some slots would hold none of it
                    log.warning("source %s has %d %s samples in split %s, fewer than %d loader slots; left out of "
                                "the mix", source, size, kind, cfg.split, self.n_slots)
                    weight = 0.0
                w.append(float(weight))
            if sum(w) <= 0:
                raise ValueError(f"LoaderConfig.source_weights: every source of {kind!r} samples has weight 0 "
                                 f"(or too few samples); give one a positive weight or set the count of {kind!r} to 0.")
            specs[kind] = [(f"{kind}:{source}", by_source[source]) for source in names]
            weights[kind] = np.array(w) / sum(w)
        return specs, weights

    def _shards_of_this_rank(self) -> list[str]:
        """Locations this rank's slots will open: their own shards, or all with sample-level slots."""
        slots = range(self.cfg.rank * self.workers, (self.cfg.rank + 1) * self.workers)
        out = set()
        for _, shards in (spec for specs in self.specs.values() for spec in specs):
            if shard_level(shards, self.n_slots):
                assigned = assign_shards(shards, self.n_slots)
                out.update(s.path for slot in slots for s in assigned[slot])
            else:
                out.update(s.path for s in shards)
        return sorted(out)

    def _one_pass_steps(self) -> int:
        """Batches the smallest slot share fills in one pass, times workers (the same on every rank)."""
        smallest = {kind: min(slot_shares([s for _, shards in spec for s in shards], self.n_slots))
                    for kind, spec in self.specs.items()}
        per_kind = {kind: size // self.cfg.composition[kind] for kind, size in smallest.items()}
        steps = min(per_kind.values()) * self.workers
        if steps < 1:
            raise ValueError(f"LoaderConfig.composition: one pass over split {self.cfg.split!r} cannot fill a single "
                             f"batch per slot ({per_kind} batches by kind); lower the counts or use fewer slots.")
        return steps

    def make_slot(self, logical_worker: int, new_pass: int | None = None) -> SlotBatches:
        """The batch source of one logical worker, at its saved position (or at pass `new_pass`)."""
        state = self._worker_states.get(logical_worker, {})
        slot = self.cfg.rank * self.workers + logical_worker
        skips = SkipLog(state.get("skips"))
        positions = state.get("streams", {})
        options = {"max_caption_bytes": self.cfg.max_caption_bytes, "max_image_pixels": self.cfg.max_image_pixels}
        streams = {kind: [Stream(name, kind, shards, slot, self.n_slots, self.cfg.seed, skips, positions.get(name),
                                 one_pass=not self.cfg.resampled, decode_options=options,
                                 on_shard_open=self.on_shard_open)
                          for name, shards in spec] for kind, spec in self.specs.items()}
        if new_pass is not None:
            for stream in (s for kind_streams in streams.values() for s in kind_streams):
                stream.reset_to_pass(new_pass)
        return SlotBatches(streams, self.weights, self.cfg.composition, self.cfg.balance_by, self.processor,
                           self.cfg.seed, slot, skips, state.get("batch", 0), state.get("dead"))

    # -- iteration ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("an infinite (resampled) loader has no length; set LoaderConfig.steps_per_epoch")
        return self.steps_per_epoch

    def __iter__(self):
        """One epoch (forever when resampled without steps_per_epoch); a new iter() starts the next
        epoch, or finishes the current one after load_state_dict."""
        if self.steps_per_epoch is not None and self.epoch_batches >= self.steps_per_epoch:
            self.epoch, self.epoch_batches = self.epoch + 1, 0
        remaining = None if self.steps_per_epoch is None else self.steps_per_epoch - self.epoch_batches
        new_pass = self.epoch if (not self.cfg.resampled and self.epoch_batches == 0) else None
        dataset = _SlotDataset(self, self.batches, remaining, new_pass)
        source = dataset if self.cfg.num_workers == 0 else DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_as_is, persistent_workers=False)
        for batch in source:
            self._worker_states[int(batch.pop("_worker"))] = json.loads(batch.pop("_state"))
            if "_exhausted" in batch:
                self._end_epoch_short(batch["_exhausted"])
                return
            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
            self.batches += 1
            self.epoch_batches += 1
            yield batch

    def _end_epoch_short(self, stream: str) -> None:
        """A one-pass slot ran out: end this epoch here rather than repeat samples."""
        done = self.epoch_batches
        if done == 0:
            raise RuntimeError(f"one-pass epoch {self.epoch} of split {self.cfg.split!r} cannot fill a single batch on "
                               f"rank {self.cfg.rank}: stream {stream} ran out (damaged or missing shards, see the "
                               "skipped-data warnings); repair the shards or lower the composition counts.")
        log.warning("one-pass epoch %d of split %s ended after %d of %d batches on rank %d: stream %s ran out "
                    "(damaged or missing shards, see skip counts); no sample is repeated to fill it", self.epoch,
                    self.cfg.split, done, self.steps_per_epoch, self.cfg.rank, stream)
        self.short_epochs[self.epoch] = done
        self.epoch_batches = self.steps_per_epoch

    # -- state --------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        ignored = ("data_dir", "steps_per_epoch", "verify_sha256")
        layout = {k: v for k, v in asdict(self.cfg).items() if k not in ignored}
        return dict(layout, data=self.fingerprint, steps_per_epoch=self.steps_per_epoch)

    def state_dict(self) -> dict:
        """JSON-serialisable; save it with the checkpoint (e.g. DeepSpeed's client_state)."""
        return {"format": STATE_FORMAT, "layout": self._layout(), "batches": self.batches, "epoch": self.epoch,
                "epoch_batches": self.epoch_batches, "workers": {str(k): v for k, v in self._worker_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}; start the loader "
                             "fresh (do not load this state).")
        saved, ours = state["layout"], self._layout()
        differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in differ)
            raise ValueError(f"loader state does not fit this loader ({detail}); resume with the saved values, or "
                             "start the loader fresh (do not load its state).")
        self.batches, self.epoch, self.epoch_batches = state["batches"], state["epoch"], state["epoch_batches"]
        self._worker_states = {int(k): v for k, v in state["workers"].items()}

    def skip_log(self) -> SkipLog:
        """The distinct bad samples (and damaged shards) this rank's workers met so far."""
        return SkipLog.merged(state.get("skips") or {} for state in self._worker_states.values())

    def skip_counts(self) -> dict[str, int]:
        """Distinct bad samples (and damaged shards) met by this rank so far, per reason."""
        return self.skip_log().counts()


def _as_is(batch):
    return batch


class _SlotDataset(IterableDataset):
    """Runs in each dataloader worker (or in-process): the slot batches of one logical worker.

    After a resume at global batch B, batch n must still come from logical worker n % W, so
    physical worker p plays logical worker (p + B) % W and yields its share of what is left."""

    def __init__(self, loader: BalancedLoader, start_batch: int, remaining: int | None, new_pass: int | None):
        self.loader, self.start_batch, self.remaining, self.new_pass = loader, start_batch, remaining, new_pass

    def __iter__(self):
        info = get_worker_info()
        W = self.loader.workers
        logical = ((info.id if info is not None else 0) + self.start_batch) % W
        first = (logical - self.start_batch) % W  # index, among the remaining batches, of this worker's first
        share = None if self.remaining is None else max(0, (self.remaining - first + W - 1) // W)
        slot = self.loader.make_slot(logical, self.new_pass)
        produced = 0
        while share is None or produced < share:
            try:
                batch = slot.next_batch()
            except PassExhausted as e:  # one-pass mode: end the epoch, never repeat a sample
                yield {"_exhausted": str(e), "_state": json.dumps(slot.state()), "_worker": logical}
                return
            if info is not None:  # small tensors go through the worker pipe as numpy (a tensor costs a
                # shared-memory segment); large ones (224 px RGB patches: ~19 MB a batch) as tensors, which
                # skips pickling them (about 1.45x the samples/s, bench/loader.py)
                batch = {k: v.numpy() if isinstance(v, torch.Tensor) and v.nbytes < SHARED_MEMORY_MIN_BYTES else v
                         for k, v in batch.items()}
            produced += 1
            batch["_state"] = json.dumps(slot.state())
            batch["_worker"] = logical
            yield batch
