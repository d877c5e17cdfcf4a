"""What training, evaluation and the caption CLI need from the data package."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .data.loader import BalancedLoader, LoaderConfig
from .data.processor import MmoeProcessor
from .data.shards import decode, iter_raw
from .data.sources import CLASS_NAMES, class_caption
from .recipe import DataSection


def ensure_dataset(data: DataSection) -> None:
    if (Path(data.dir) / "manifest.json").exists():
        return
    if not data.prepare_if_missing:
        raise FileNotFoundError(f"{data.dir}: no prepared dataset; run `mmoe-ds prepare --out {data.dir}`.")
    from .data.prepare import main as prepare

    prepare(["--source", "embedded", "--out", data.dir, "--max-length", str(data.max_length)])


def load_processor(data: DataSection) -> MmoeProcessor:
    processor = MmoeProcessor.from_pretrained(Path(data.dir) / "processor")
    processor.max_length = data.max_length
    return processor


def make_train_loader(data: DataSection, processor, rank: int, world_size: int, seed: int) -> BalancedLoader:
    cfg = LoaderConfig(data.dir, "train", dict(data.composition), seed=seed, rank=rank, world_size=world_size,
                       num_workers=data.num_workers, resampled=True, max_length=data.max_length)
    return BalancedLoader(cfg, processor)


def make_eval_loader(data: DataSection, processor, kind: str, rank: int, world_size: int, seed: int) -> BalancedLoader:
    """The same held-out batches at every evaluation (fixed seed, fresh positions)."""
    cfg = LoaderConfig(data.dir, "validation", {kind: sum(data.composition.values())}, seed=seed + 12345, rank=rank,
                       world_size=world_size, num_workers=0, resampled=True, max_length=data.max_length)
    return BalancedLoader(cfg, processor)


def _test_samples(data_dir: str, source: str | None, kind: str = "image_text"):
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    skips = Counter()
    for rel, info in sorted(manifest["shards"].items()):
        if info["split"] == "test" and info["kind"] == kind and (source is None or info["source"] == source):
            for key, files in iter_raw(str(Path(data_dir) / rel), skips):
                sample = decode(rel, key, files, kind, skips)
                if sample is not None:
                    yield sample


def ranking_set(data: DataSection, processor, n: int):
    """(images, labels, class captions): the first n test images of Fashion-MNIST (digits without it)."""
    manifest = json.loads((Path(data.dir) / "manifest.json").read_text())
    source = "fashion_mnist" if "fashion_mnist" in manifest["sources"] else "digits"
    images, labels = [], []
    for sample in _test_samples(data.dir, source):
        if len(images) == n:
            break
        images.append(sample["image"])
        labels.append(sample["meta"]["label"])
    captions = [class_caption(source, label) for label in range(len(CLASS_NAMES[source]))]
    return images, labels, captions


def test_examples(data_dir: str, n: int) -> list[dict]:
    """n test image+caption samples, alternating sources, for captioning demos."""
    out = []
    by_source = {}
    for sample in _test_samples(data_dir, None):
        by_source.setdefault(sample["meta"]["source"], []).append(sample)
    while len(out) < n and any(by_source.values()):
        for source in sorted(by_source):
            if by_source[source] and len(out) < n:
                s = by_source[source].pop(0)
                out.append({"image": s["image"], "caption": s["text"], "source": source})
    return out
