"""Helpers shared by the tests/test_data_*.py files (imported by name; the dataset fixture,
`small_dataset`, lives in conftest.py because the training tests use it too)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from mmoe_ds.data import BalancedLoader, LoaderConfig

COMPOSITION = {"image_text": 5, "text": 2, "image": 1}
EXPECTED_KINDS = [0] * 5 + [1] * 2 + [2]  # sample_kind of every batch with COMPOSITION


def make_loader(data_dir, **overrides) -> BalancedLoader:
    overrides.setdefault("composition", dict(COMPOSITION))
    overrides.setdefault("max_length", 48)
    return BalancedLoader(LoaderConfig(str(data_dir), **overrides))


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def manifest(data_dir) -> dict:
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def shards_of(data_dir, split: str, kind: str | None = None) -> list[str]:
    return [rel for rel, info in sorted(manifest(data_dir)["shards"].items())
            if info["split"] == split and (kind is None or info["kind"] == kind)]


def read_samples(path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of an intact tar, in order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def write_samples(path, samples: list[tuple[str, dict[str, bytes]]], member_names: dict | None = None) -> None:
    """A tar of `samples`; `member_names` may rename single members ((key, ext) -> name)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo((member_names or {}).get((key, ext), f"{key}.{ext}"))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def digest(folder) -> dict[str, str]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
