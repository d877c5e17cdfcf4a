"""Shards the way other tools write them (imported by name by the tests/test_data_*.py files).

img2dataset layout: per sample `KEY.jpg` (an RGB JPEG), `KEY.txt` (the caption) and `KEY.json`
(url, caption, key, status, width, height, ...: no modality field), keys of 9 digits (5 for the
shard, 4 for the row), written with webdataset's own TarWriter as img2dataset does.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["square", "circle", "stripe", "cross"]


def jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def caption(shard: int, row: int) -> str:
    return f"a {COLOURS[(shard + row) % 8]} {SHAPES[row % 4]} on a photo number {row} of set {shard}"


def write_img2dataset_shard(path: Path, shard: int, samples: int, seed: int = 0, text_only_every: int = 0) -> list[str]:
    """One img2dataset-style shard; returns its keys in order. `text_only_every=n` makes every n-th
    sample text-only (no .jpg), as foreign data mixing kinds in one shard would."""
    rng = np.random.default_rng([seed, shard])
    keys = []
    with TarWriter(str(path)) as sink:
        for row in range(samples):
            key = f"{shard:05d}{row:04d}"
            width, height = int(rng.integers(24, 64)), int(rng.integers(24, 64))
            text = caption(shard, row)
            sample = {"__key__": key, "txt": text,
                      "json": {"url": f"https://example.com/{key}.jpg", "caption": text, "key": key,
                               "status": "success", "width": width, "height": height,
                               "original_width": width * 4, "original_height": height * 4}}
            if not (text_only_every and row % text_only_every == text_only_every - 1):
                sample["jpg"] = jpeg(rng, width, height)
            sink.write(sample)
            keys.append(key)
    return keys


def write_img2dataset_shards(folder: Path, shards: int, samples: int, seed: int = 0, first: int = 0) -> dict[str, str]:
    """shard-NNNNN.tar files; returns key -> shard file name."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = {}
    for shard in range(first, first + shards):
        name = f"shard-{shard:05d}.tar"
        for key in write_img2dataset_shard(folder / name, shard, samples, seed):
            owner[key] = name
    return owner


def digests(folder: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (sha256, inode, mtime_ns) of every file in `folder`."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on stderr
        pass


@contextlib.contextmanager
def http_server(folder: Path):
    """A real HTTP server on 127.0.0.1 serving `folder`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_img2dataset_output(folder: Path, shards: int, samples: int, seed: int = 0) -> list[str]:
    """img2dataset's `--output_format webdataset` folder: per shard `NNNNN.tar` plus the `NNNNN.parquet`
    (url, caption, key, status, ...) and `NNNNN_stats.json` it writes beside each tar. Returns the tar names."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in range(shards):
        keys = write_img2dataset_shard(folder / f"{shard:05d}.tar", shard, samples, seed)
        pq.write_table(pa.table({"url": [f"https://example.com/{k}.jpg" for k in keys],
                                 "caption": [caption(shard, row) for row in range(samples)], "key": keys,
                                 "status": ["success"] * samples}), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": samples, "successes": samples,
                                                                     "failed_to_download": 0}))
        names.append(f"{shard:05d}.tar")
    return names
