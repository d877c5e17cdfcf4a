"""`mmoe-ds prepare` memory on a large folder: peak RSS growth over the imports, in a fresh process.

`prepare` spools each sample to disk as it is read, so its memory is bounded by a buffer plus a few
integers and the train captions per sample, not by the images. This builds (once) a folder of N
small distinct images with .txt captions, runs `prepare --source folder` on it in a subprocess and
prints a table row and a JSON line.

    nice -n 10 .venv/bin/python bench/prepare_memory.py --images 100000 --folder /tmp/prep100k
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEASURE = """
import json, resource, sys, time
from mmoe_ds.data.prepare import main
import PIL.Image, tokenizers, transformers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start, "baseline_mb": before / 1024,
                  "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def build_folder(folder: Path, n: int) -> None:
    """N 28x28 gray PNGs (distinct pixels) with captions, in sub-folders of 1,000; kept between runs."""
    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:06d}.png", compress_level=1)
        (sub / f"{i:06d}.txt").write_text(f"a small picture with the number {i}")
    done.write_text(str(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", default="/tmp/prepare_memory_images")
    parser.add_argument("--out", default=None, help="prepare's output (default: FOLDER-prepared)")
    args = parser.parse_args()
    folder = Path(args.folder)
    t0 = time.perf_counter()
    build_folder(folder, args.images)
    built = time.perf_counter() - t0
    out = args.out or f"{folder}-prepared"
    proc = subprocess.run([sys.executable, "-c", MEASURE, "--source", "folder", "--input", str(folder), "--out", out,
                           "--samples-per-shard", "1000"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if not proc.stdout.strip():
        sys.exit(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = json.loads((Path(out) / "manifest.json").read_text())["counts"]
    samples = sum(sum(kinds.values()) for kinds in counts.values())
    result.update(images=args.images, samples=samples, folder_build_seconds=round(built, 1),
                  load=os.getloadavg()[0])
    print("| images | samples written | peak RSS growth | time | samples/s |")
    print("|---|---|---|---|---|")
    print(f"| {args.images:,} | {samples:,} | {result['growth_mb']:.0f} MB | {result['seconds']:.0f} s | "
          f"{samples / result['seconds']:.0f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
