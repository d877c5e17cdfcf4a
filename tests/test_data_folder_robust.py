"""Folder inputs that have broken builds before (issue 23): file names that are not UTF-8, symbolic
links (inside the root, leaving it, looping), FIFOs and device links, image files far larger than
they claim; and foreign shards with duplicate keys. Each is kept, or skipped with a reason, and
never aborts the build; memory stays bounded (measured in a subprocess)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from conftest_data import manifest, read_samples, write_samples
from PIL import Image

from mmoe_ds.data import BalancedLoader, LoaderConfig
from mmoe_ds.data.index import main as index
from mmoe_ds.data.shards import iter_raw

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS = """
import json, resource, sys
from mmoe_ds.data.prepare import main
import PIL.Image, tokenizers, transformers  # everything prepare imports, loaded before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
runs = []
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    runs.append({"rc": rc, "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024})
print(json.dumps(runs))
"""


def prepare_measured(*runs: list[str], timeout: int = 300) -> tuple[list[int], list[float], str]:
    """`prepare` runs, one after the other, in a fresh interpreter: (exit codes, peak RSS growth in
    MB over the imports after each run, output). Peak RSS only rises: a later run that needs more
    memory than an earlier one shows as a larger growth."""
    argv = [[*args, "--vocab-size", "300"] for args in runs]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, json.dumps(argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip(), proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [r["rc"] for r in results], [r["growth_mb"] for r in results], proc.stdout + proc.stderr


def _pair(folder: Path, name: str, seed: int, size: int = 16) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"picture number {seed}")


def _skipped(out: Path) -> dict[str, str]:
    """item -> reason, from skipped.jsonl."""
    return {e["item"]: e["reason"] for e in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}


def test_nasty_folder_entries_are_kept_or_named_and_memory_stays_bounded(tmp_path):
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    root.mkdir(), elsewhere.mkdir()
    for i in range(10):
        _pair(root, f"p{i}", i)
    (root / "real").mkdir()
    for i in range(3):
        _pair(root / "real", f"r{i}", 100 + i)
        _pair(elsewhere, f"e{i}", 200 + i)
    os.symlink("real", root / "linked_inside")  # followed: the same pixels twice, one named a duplicate
    os.symlink("../elsewhere", root / "linked_outside")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "loop")
    os.mkfifo(root / "pipe.txt")
    _pair(root, "z", 300)
    (root / "z.txt").unlink()
    os.symlink("/dev/zero", root / "z.txt")  # a caption that never ends
    name = os.fsencode(str(root)) + b"/caf\xe9"  # latin-1 bytes: not UTF-8
    with open(name + b".png", "wb") as f:
        f.write(_png(400))
    with open(name + b".txt", "wb") as f:
        f.write(b"a caf\xe9 picture")
    with open(root / "big.png", "wb") as f:  # a valid image followed by 1 GiB of (sparse) zeros
        f.write(_png(500))
        f.truncate(1 << 30)
    (root / "big.txt").write_text("a huge file")
    out = tmp_path / "out"
    (rc,), (growth,), output = prepare_measured(["--source", "folder", "--input", str(root), "--out", str(out),
                                                 "--samples-per-shard", "4"])
    assert rc == 0, output
    assert growth < 300, f"peak RSS grew by {growth:.0f} MB"
    skipped = _skipped(out)
    assert skipped["linked_outside"] == "link_outside_root" and skipped["z.txt"] == "link_outside_root"
    assert skipped["sub/loop"] == "link_loop" and skipped["pipe.txt"] == "special_file"
    assert skipped["big.png"] == "image_too_large" and skipped["z.png"] == "no_caption"
    assert {skipped[f"real/r{i}.png"] for i in range(3)} == {"duplicate_image"}  # read first through the link
    notes = [json.loads(line) for line in (out / "notes.jsonl").read_text().splitlines()]
    assert [n["item"] for n in notes if n["reason"] == "followed_link"] == ["linked_inside"]
    samples = {json.loads(files["json"])["origin"]: key for rel in manifest(out)["shards"]
               for key, files in read_samples(out / rel)}
    assert set(samples) == ({f"p{i}.png" for i in range(10)} | {f"linked_inside/r{i}.png" for i in range(3)}
                            | {"caf\\xe9.png"})
    assert samples["caf\\xe9.png"] == "caf_e9_2epng"  # the key keeps the name's exact bytes
    assert sum(sum(k.values()) for k in manifest(out)["counts"].values()) == len(samples)  # manifest = samples read


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Records are spooled to disk as they are read: 4x the images (each 160x160 RGB, 77 KB of pixels,
    cheap to encode) must not cost more peak memory (holding them would: ~35 MB more)."""
    runs = []
    for n in (150, 600):
        folder = tmp_path / f"in{n}"
        folder.mkdir()
        for i in range(n):
            pixels = np.full((160, 160, 3), i % 251, dtype=np.uint8)
            pixels[0, :8, 0] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)  # distinct pixels per image
            Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"image {i}")
        runs.append(["--source", "folder", "--input", str(folder), "--out", str(tmp_path / f"out{n}"),
                     "--channels", "3"])
    codes, growth, output = prepare_measured(*runs)
    assert codes == [0, 0], output
    assert growth[1] - growth[0] < 15, growth  # the 4x larger run (second) needs no more memory


def test_foreign_duplicate_keys_are_counted_and_never_yielded_twice(tmp_path):
    samples = [(f"{i:04d}", {"png": _png(i), "txt": f"sample {i}".encode()}) for i in range(8)]
    samples[2:2] = [("0001", {"png": _png(50), "txt": b"same key, next to the first"})]
    samples.append(("0003", {"png": _png(51), "txt": b"same key, far from the first"}))
    write_samples(tmp_path / "shard-00000.tar", samples)
    skips: Counter = Counter()
    keys = [key for key, _ in iter_raw(str(tmp_path / "shard-00000.tar"), skips)]
    assert keys == [f"{i:04d}" for i in range(8)] and skips == Counter({"duplicate_key": 2})
    assert index(["--train", str(tmp_path / "shard-00000.tar"), "--image-size", "28", "--patch-size", "7",
                  "--max-length", "32", "--out", str(tmp_path / "idx")]) == 0
    m = manifest(tmp_path / "idx")
    (info,) = m["shards"].values()
    assert info["samples"] == 8 and info["damage"] == {"duplicate_key": 2}
    loader = BalancedLoader(LoaderConfig(str(tmp_path / "idx"), composition={"image_text": 2}, max_length=32,
                                         resampled=False))
    served = [key for batch in loader for key in batch["keys"]]
    assert sorted(served) == [f"shard/{i:04d}" for i in range(8)]
    texts = {key: files["txt"] for key, files in iter_raw(str(tmp_path / "shard-00000.tar"), Counter())}
    assert texts["0001"] == b"sample 1" and texts["0003"] == b"sample 3"  # the first of each key is kept
