"""The one reader of a prepared dataset's `manifest.json` (the file that makes a folder a dataset).

Written by `mmoe-ds prepare` (`data/prepare.py`) and `mmoe-ds index` (`data/index.py`) as the last
step (the commit point); read by the loader, the recipe's data checks, evaluation, the caption demo,
the model card and `mmoe-ds analyze`, all through this module:

  {"shards": {location: {"split", "source", "kind" | "kinds", "samples", "sha256"?, ...}},
   "counts": {split: {kind: samples}}, "processor": {...}, "build": {...}, ...}

A shard location is relative to the dataset folder, absolute, a URL or a `pipe:` command
(`loader.shard_location`); `kinds` (from `mmoe-ds index`) counts a foreign shard's samples per kind.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def manifest_path(data_dir: str | os.PathLike) -> Path:
    """Where the manifest of the dataset folder `data_dir` lives."""
    return Path(data_dir) / MANIFEST_NAME


def has_manifest(data_dir: str | os.PathLike) -> bool:
    """Whether `data_dir` is a prepared dataset (its manifest is a file)."""
    return manifest_path(data_dir).is_file()


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of the dataset folder `data_dir`.

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: not JSON, or not an object with a `shards` object (json.JSONDecodeError is a
            ValueError); the message names the file and the fix.
    """
    path = manifest_path(data_dir)
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise ValueError(f"{path}: not a dataset manifest (an object with a \"shards\" object); prepare the dataset "
                         f"again with `mmoe-ds prepare --out {Path(data_dir)}` or `mmoe-ds index ... --out "
                         f"{Path(data_dir)}`.")
    return manifest


def shard_kinds(info: dict) -> dict[str, int]:
    """A manifest shard entry's samples per kind: `kinds` (written by `mmoe-ds index`; a foreign
    shard may mix kinds) or, for single-kind shards, {kind: samples}."""
    if "kinds" in info:
        return {kind: int(n) for kind, n in info["kinds"].items() if n > 0}
    return {info["kind"]: int(info["samples"])} if info["samples"] > 0 else {}


def sample_counts(manifest: dict) -> Counter:
    """(split, kind) -> samples, from the manifest's shard list."""
    counts: Counter = Counter()
    for info in manifest["shards"].values():
        for kind, n in shard_kinds(info).items():
            counts[(info["split"], kind)] += n
    return counts
