"""Counting and logging the data a reader had to leave out (or cut), per reason."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

from .schema import KEPT_REASONS, SKIP_REASONS

log = logging.getLogger("mmoe_ds.data")


class SkipLog:
    """Distinct bad samples (or shards, for shard-level reasons) met so far, per reason.

    Each is counted once, not per read: a resampled loader meets the same damaged sample every
    pass, and the training log should say how much of the data is bad, not how long training
    ran. The first sighting is a warning naming shard and key; repeats go to debug level. The
    identities are kept (JSON state) so counts survive a resume without double counting.

    Across ranks: sample-level skips of different ranks are disjoint (each sample belongs to one
    loader slot), but a damaged shard is met by every rank that reads it. Exact totals come from
    the union of the ranks' identities (`merged([state of each rank])`, e.g. after
    `torch.distributed.all_gather_object`); summing `vector()`s with an all_reduce is cheaper and
    exact when every shard is read by one slot only.
    """

    def __init__(self, state: dict[str, list[str]] | None = None):
        self._seen: dict[str, set[str]] = {reason: set(ids) for reason, ids in (state or {}).items()}

    def add(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to schema.SKIP_REASONS")
        ident = Path(shard).name if key is None else f"{Path(shard).name}#{key}"
        seen = self._seen.setdefault(reason, set())
        level = logging.DEBUG if ident in seen else logging.WARNING
        seen.add(ident)
        where = shard if key is None else f"sample {key} of shard {shard}"
        log.log(level, "%s %s: %s%s", "kept, cut:" if reason in KEPT_REASONS else "skipped", where, reason,
                f" ({detail})" if detail else "")

    def seen(self, shard: str, key: str | None = None) -> list[str]:
        """The reasons already recorded for this shard (key None: shard-level) or sample."""
        ident = Path(shard).name if key is None else f"{Path(shard).name}#{key}"
        return [reason for reason in SKIP_REASONS if ident in self._seen.get(reason, ())]

    def update(self, other: "SkipLog") -> None:
        for reason, ids in other._seen.items():
            self._seen.setdefault(reason, set()).update(ids)

    def counts(self) -> dict[str, int]:
        """{reason: distinct items}, every reason of SKIP_REASONS, in that order."""
        return {reason: len(self._seen.get(reason, ())) for reason in SKIP_REASONS}

    def vector(self) -> list[int]:
        """counts() as a list in SKIP_REASONS order (for an all_reduce); see `counts_of`."""
        return list(self.counts().values())

    def state(self) -> dict[str, list[str]]:
        return {reason: sorted(ids) for reason, ids in sorted(self._seen.items()) if ids}

    @classmethod
    def merged(cls, states: Iterable[dict[str, list[str]]]) -> "SkipLog":
        """One log holding the union of several logs' states (e.g. one per rank)."""
        total = cls()
        for state in states:
            total.update(cls(state))
        return total


def counts_of(vector: Iterable[int | float]) -> dict[str, int]:
    """The inverse of `SkipLog.vector()`: {reason: count} in SKIP_REASONS order."""
    values = [int(v) for v in vector]
    if len(values) != len(SKIP_REASONS):
        raise ValueError(f"a skip count vector has {len(SKIP_REASONS)} entries (SKIP_REASONS), got {len(values)}")
    return dict(zip(SKIP_REASONS, values))


def record_skip(skips: SkipLog | Counter, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
    """Note one skip in a SkipLog, or in a plain Counter (counts every sighting, for one-off scans)."""
    if isinstance(skips, SkipLog):
        skips.add(reason, shard, key, detail)
        return
    if reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; add it to schema.SKIP_REASONS")
    skips[reason] += 1
    log.warning("%s %s of shard %s: %s %s", "kept, cut:" if reason in KEPT_REASONS else "skipped",
                key or "the rest", shard, reason, detail)
