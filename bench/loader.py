"""Loader throughput on this machine: samples/s with 0, 1 and 2 dataloader workers.

    python bench/loader.py [--data data/embedded] [--jpeg-data data/bench_jpeg224] [--batches 200]
                           [--jpeg-batches 100] [--repeats 3] [--only embedded|jpeg224]

Two datasets, each read by a resampled training loader of 32 samples per batch: tar reading,
decoding, tokenising, patchifying and collating, everything up to the model.
- embedded: the prepared dataset in --data (built there first if missing): 28x28 grayscale PNGs,
  batches of {"image_text": 24, "text": 6, "image": 2}.
- jpeg224: 224x224 RGB JPEGs (quality 90) in the img2dataset layout (`KEY.jpg`, `KEY.txt`,
  `KEY.json` with url/caption, no modality field), built in --jpeg-data on first use from
  scikit-image's bundled photos (seeded random crops, resized to 224) and indexed in place with
  `mmoe-ds index` (processor: 224 px, patch 16, 3 channels: 196 patches of 768 values per image);
  batches of {"image_text": 32}.
The first batch (worker start-up) is not timed; the figure is the median of --repeats. With 0
workers the samples per CPU second of the process are printed too: what one core sustains, even
on a busy machine. Prints a table per dataset and one JSON line (with the load average after).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmoe_ds.data import BalancedLoader, LoaderConfig

COMPOSITION = {"image_text": 24, "text": 6, "image": 2}
JPEG_COMPOSITION = {"image_text": 32}
JPEG_SIZE, JPEG_PATCH, JPEG_QUALITY = 224, 16, 90
JPEG_MAX_LENGTH = (JPEG_SIZE // JPEG_PATCH) ** 2 + 32
JPEG_SAMPLES, JPEG_PER_SHARD = 2000, 500


def samples_per_second(data: str, workers: int, batches: int, composition: dict, max_length: int = 64
                       ) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process). The second is what
    one core sustains whatever else runs on the machine (meaningful with 0 workers only)."""
    loader = BalancedLoader(LoaderConfig(data, composition=composition, num_workers=workers, seed=0,
                                         max_length=max_length))
    it = iter(loader)
    next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    samples = batches * sum(composition.values())
    return samples / (time.perf_counter() - start), samples / max(time.process_time() - cpu_start, 1e-9)


def photo_crops(n: int, seed: int = 0):
    """(jpeg bytes, caption) of n seeded random crops of scikit-image's bundled photos, 224 px RGB."""
    from skimage import data

    from mmoe_ds.data.sources.base import to_8bit
    from mmoe_ds.data.sources.embedded import SKIMAGE_PHOTOS

    photos = []
    for name in SKIMAGE_PHOTOS:
        loader = getattr(data, name)
        array = np.asarray(loader())
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) * (255.0 if array.max() <= 1 else 1.0)).clip(0, 255).astype(np.uint8)
        caption = (loader.__doc__ or name).strip().splitlines()[0].strip().rstrip(".")
        photos.append((to_8bit(Image.fromarray(array)).convert("RGB"), caption))
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, caption = photos[i % len(photos)]
        w, h = image.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((JPEG_SIZE, JPEG_SIZE), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=JPEG_QUALITY)
        yield buf.getvalue(), caption


def build_jpeg224(out: Path) -> None:
    """img2dataset-layout shards in out/shards, then `mmoe-ds index` writes out/manifest.json."""
    from mmoe_ds.data.index import main as index

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    tar = None
    for i, (jpeg, caption) in enumerate(photo_crops(JPEG_SAMPLES)):
        if i % JPEG_PER_SHARD == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shard_dir / f"photos-{i // JPEG_PER_SHARD:06d}.tar", "w")
        key = f"{i:09d}"
        meta = json.dumps({"url": f"https://example.org/{key}.jpg", "caption": caption, "key": key,
                           "width": JPEG_SIZE, "height": JPEG_SIZE}).encode()
        for ext, payload in (("jpg", jpeg), ("txt", caption.encode()), ("json", meta)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    code = index(["--train", str(shard_dir / "photos-*.tar"), "--out", str(out), "--image-size", str(JPEG_SIZE),
                  "--patch-size", str(JPEG_PATCH), "--channels", "3", "--max-length", str(JPEG_MAX_LENGTH),
                  "--vocab-size", "512"])
    if code != 0:
        raise SystemExit(f"bench/loader.py: indexing the JPEG shards in {out} failed")


def measure(name: str, data: str, batches: int, repeats: int, composition: dict, max_length: int) -> dict:
    runs = {w: [samples_per_second(data, w, batches, composition, max_length) for _ in range(repeats)]
            for w in (0, 1, 2)}
    rows = {w: statistics.median(wall for wall, _ in r) for w, r in runs.items()}
    per_cpu_second = statistics.median(cpu for _, cpu in runs[0])
    print(f"{name}: {sum(composition.values())} samples per batch {composition}, {batches} batches, "
          f"median of {repeats}")
    print(f"{'workers':>8} {'samples/s':>10} {'vs 0 workers':>13}")
    for workers, rate in rows.items():
        print(f"{workers:>8} {rate:>10.0f} {rate / rows[0]:>12.2f}x")
    print(f"0 workers, per CPU second of the process: {per_cpu_second:.0f} samples")
    return {"composition": composition, "batches": batches,
            "samples_per_s": {str(w): round(r, 1) for w, r in rows.items()},
            "samples_per_cpu_s_0_workers": round(per_cpu_second, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/embedded")
    parser.add_argument("--jpeg-data", default="data/bench_jpeg224")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per run, embedded dataset")
    parser.add_argument("--jpeg-batches", type=int, default=100, help="timed batches per run, 224 px JPEG dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["embedded", "jpeg224"], help="run one dataset only")
    args = parser.parse_args()
    results, load_before = {}, os.getloadavg()
    if args.only in (None, "embedded"):
        if not (Path(args.data) / "manifest.json").exists():
            from mmoe_ds.data.prepare import main as prepare

            prepare(["--out", args.data])
        results["embedded"] = measure("embedded (28x28 gray PNG)", args.data, args.batches, args.repeats,
                                      COMPOSITION, 64)
    if args.only in (None, "jpeg224"):
        if not (Path(args.jpeg_data) / "manifest.json").exists():
            build_jpeg224(Path(args.jpeg_data))
        results["jpeg224"] = measure("jpeg224 (224x224 RGB JPEG, patch 16)", args.jpeg_data, args.jpeg_batches,
                                     args.repeats, JPEG_COMPOSITION, JPEG_MAX_LENGTH)
    load = os.getloadavg()
    print(json.dumps({"bench": "loader", "repeats": args.repeats, "results": results, "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in load],
                      "python": platform.python_version(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
