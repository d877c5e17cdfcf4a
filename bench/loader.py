"""Loader throughput: samples/s with 0, 1 and 2 dataloader workers (median of repeats).

    python bench/loader.py [--data data/embedded] [--batches 200] [--repeats 3]

Builds the embedded dataset first if it is missing. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mmoe_ds.data import BalancedLoader, LoaderConfig


def measure(data: str, workers: int, batches: int, composition: dict) -> float:
    loader = BalancedLoader(LoaderConfig(data, composition=composition, num_workers=workers, seed=0))
    it = iter(loader)
    next(it)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    return batches * sum(composition.values()) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/embedded")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        from mmoe_ds.data.prepare import main as prepare

        prepare(["--out", args.data])
    composition = {"image_text": 24, "text": 6, "image": 2}
    rows = {}
    for workers in (0, 1, 2):
        runs = [measure(args.data, workers, args.batches, composition) for _ in range(args.repeats)]
        rows[workers] = statistics.median(runs)
    print(f"{'workers':>8} {'samples/s':>10} {'vs 0 workers':>13}")
    for w, v in rows.items():
        print(f"{w:>8} {v:>10.0f} {v / rows[0]:>12.2f}x")
    print(json.dumps({"bench": "loader", "batch": sum(composition.values()), "batches": args.batches,
                      "repeats": args.repeats, "samples_per_s": {str(k): round(v, 1) for k, v in rows.items()},
                      "cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
