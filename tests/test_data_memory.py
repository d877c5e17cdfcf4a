"""Memory stays bounded whatever a shard holds (issue 8, acceptance 6): a gzip'd shard with a
256 MiB caption and shards with 20000x20000 and 13000x13000 PNGs (a few hundred KB each) are
read through `iter_raw` + `decode` with a peak RSS growth under 300 MB. The growth is measured in
a child process (`ru_maxrss` after the imports and a warm-up decode, then after reading), so
nothing else of the test session counts. The shards are built streaming: the test itself never
holds more than a few MiB."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from bigfiles import write_gzip_tar, zero_png

MIB = 1 << 20
CHILD = r"""
import json, resource, sys
from mmoe_ds.data.shards import decode, iter_raw
from mmoe_ds.data.skips import SkipLog

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

def read(shard, skips):
    out = []
    for key, files in iter_raw(shard, skips):
        sample = decode(shard, key, files, None, skips)
        out.append(None if sample is None else [key, sample["kind"], len(sample["text"] or ""),
                                                 sample["image"] and list(sample["image"].size)])
    return out

read(sys.argv[1], SkipLog())  # warm-up: lazy imports (Pillow's plugins, gzip, codecs) and first allocations
report = {"baseline_mb": peak_mb(), "shards": []}
for shard in sys.argv[2:]:
    skips = SkipLog()
    samples = read(shard, skips)
    report["shards"].append({"shard": shard, "samples": samples, "peak_mb": peak_mb(),
                             "skips": {r: n for r, n in skips.counts().items() if n}})
print(json.dumps(report))
"""


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_huge_captions_and_images_stay_within_300_mb(tmp_path):
    warm = tmp_path / "warm.tar.gz"
    with open(warm, "wb") as out:  # a small shard of the same kinds, built by the same code
        write_gzip_tar(out, [("w0.txt", b"a small caption"), ("w1.png", zero_png(64, 48)), ("w1.txt", b"black"),
                             ("w2.txt", (ord("a"), 70_000))])
    caption = tmp_path / "caption.tar.gz"
    with open(caption, "wb") as out:
        write_gzip_tar(out, [("big.txt", (ord("a"), 256 * MIB)), ("big.json", b'{"url": "https://example.com/x"}'),
                             ("after.txt", b"the sample after it")])
    huge = tmp_path / "png20k.tar"
    write_tar(huge, [("huge.png", zero_png(20000, 20000)), ("huge.txt", b"a black square"),
                     ("after.txt", b"the sample after it")])
    rgb = tmp_path / "png13k.tar"
    write_tar(rgb, [("rgb.png", zero_png(13000, 13000, rgb=True)), ("rgb.txt", b"a black square"),
                    ("after.txt", b"the sample after it")])
    assert caption.stat().st_size < 2 * MIB and huge.stat().st_size < MIB and rgb.stat().st_size < MIB

    child = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(caption), str(huge), str(rgb)],
                           capture_output=True, text=True, timeout=300,
                           env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"baseline_mb": report["baseline_mb"], "peak_mb": [s["peak_mb"] for s in report["shards"]]}))
    cap, png20k, png13k = report["shards"]
    assert cap["samples"] == [["big", "text", 65536, None], ["after", "text", 19, None]]
    assert cap["skips"] == {"caption_truncated": 1}
    assert png20k["samples"] == [None, ["after", "text", 19, None]] and png20k["skips"] == {"image_too_large": 1}
    assert png13k["samples"] == [None, ["after", "text", 19, None]] and png13k["skips"] == {"image_too_large": 1}
    growth = report["shards"][-1]["peak_mb"] - report["baseline_mb"]
    assert growth < 300, f"peak RSS grew by {growth:.0f} MB reading the shards"
