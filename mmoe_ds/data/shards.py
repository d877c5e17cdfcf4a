"""WebDataset tar shards: a byte-deterministic writer and a reader that never raises on bad data.

A sample is the consecutive tar members sharing a key (the name up to the first dot):
`KEY.png` (image), `KEY.txt` (caption or text), `KEY.json` (metadata: modality, source, label,
license). The writer fixes mtime/uid/names so two builds are byte-identical; the reader turns
every kind of damage into a counted, logged skip.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image

from .schema import SAMPLE_KINDS

log = logging.getLogger("mmoe_ds.data")

SKIP_REASONS = ("corrupt_tar", "missing_key", "bad_json", "unknown_modality", "bad_image", "empty_caption",
                "dead_source")  # the last: a source with no readable sample left, dropped from the mix


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)  # no timestamps: deterministic
    return buf.getvalue()


class ShardWriter:
    """Writes samples to `pattern % index` tars, `samples_per_shard` each, deterministically."""

    def __init__(self, pattern: str, samples_per_shard: int):
        self.pattern, self.samples_per_shard = pattern, samples_per_shard
        self.index, self.count, self.tar, self.paths, self.counts = -1, 0, None, [], []

    def _next(self) -> None:
        self.close()
        self.index += 1
        path = self.pattern % self.index
        self.paths.append(path)
        self.counts.append(0)
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain dots (WebDataset splits names at the first dot)")
        if self.tar is None or self.counts[-1] >= self.samples_per_shard:
            self._next()
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(files[ext]), 0, 0o444, 0, 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(files[ext]))
        self.counts[-1] += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _group_by_key(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name = Path(member.name).name
        if "." not in name:
            continue
        k, ext = name.split(".", 1)
        if key is not None and k != key:
            yield key, files
            files = {}
        key = k
        files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def iter_raw(shard: str, skips: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) per sample; a damaged tar ends the shard early with one `corrupt_tar` skip."""
    try:
        with tarfile.open(shard, "r|*") as tar:
            yield from _group_by_key(tar)
        if os.path.getsize(shard) % tarfile.BLOCKSIZE:  # stream reading ends quietly at a cut header
            raise tarfile.ReadError("truncated: size is not a multiple of 512 bytes")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        skips["corrupt_tar"] += 1
        log.warning("skipping rest of shard %s: %s", shard, e)


def decode(shard: str, key: str, files: dict[str, bytes], expected_kind: str | None, skips: Counter) -> dict | None:
    """A decoded sample {kind, image, text, meta, key}, or None (counted and logged) if unusable."""
    def skip(reason: str, detail: str = "") -> None:
        skips[reason] += 1
        log.warning("skipping %s in %s: %s %s", key, shard, reason, detail)

    if "json" not in files:
        return skip("missing_key", "no .json")
    try:
        meta = json.loads(files["json"])
        kind = meta["modality"]
    except (ValueError, KeyError, TypeError) as e:
        return skip("bad_json", str(e))
    if kind not in SAMPLE_KINDS or (expected_kind is not None and kind != expected_kind):
        return skip("unknown_modality", repr(kind))
    image = text = None
    if kind in ("image_text", "image"):
        if "png" not in files:
            return skip("missing_key", "no .png")
        try:
            image = Image.open(io.BytesIO(files["png"]))
            image.load()
        except Exception as e:  # PIL raises many types for damaged files
            return skip("bad_image", str(e)[:80])
    if kind in ("image_text", "text"):
        if "txt" not in files:
            return skip("missing_key", "no .txt")
        text = files["txt"].decode("utf-8", errors="replace").strip()
        if not text:
            return skip("empty_caption")
    return {"kind": kind, "image": image, "text": text, "meta": meta, "key": key}
