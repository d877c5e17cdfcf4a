"""Bad data never crashes training: damaged variants of real shards are skipped, counted exactly
per reason, and logged with shard and key."""
from __future__ import annotations

import gzip
import io
import json
import logging
import random
import shutil
import struct
import subprocess
import tarfile
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from bigfiles import zero_png
from conftest_data import EXPECTED_KINDS, make_loader, manifest, read_samples, shards_of, take, write_samples
from foreign_shards import http_server
from PIL import Image

from mmoe_ds.data import MmoeProcessor
from mmoe_ds.data.schema import SAMPLE_KINDS, SKIP_REASONS
from mmoe_ds.data.shards import ShardUnreadable, decode, infer_kind, iter_raw, open_shard
from mmoe_ds.data.skips import SkipLog, counts_of

HUGE_PNG = zero_png(4097, 4097)  # one pixel row over the default cap of 4096 x 4096, 16 KB of PNG


def flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    out = bytearray(data)
    out[rng.randrange(lo, len(data) if hi is None else hi)] ^= 0xFF
    return bytes(out)


def meta_with(files: dict, **changes) -> bytes:
    return json.dumps(dict(json.loads(files["json"]), **changes)).encode()


# name -> (kinds it applies to, damage(files, kind, rng) -> files, skip reason or None for harmless)
SAMPLE_DAMAGE = {
    "no_json": (SAMPLE_KINDS, lambda f, k, r: {e: d for e, d in f.items() if e != "json"}, None),  # kind inferred
    "no_image": (("image_text", "image"), lambda f, k, r: {e: d for e, d in f.items() if e != "png"}, "missing_key"),
    "no_text": (("image_text", "text"), lambda f, k, r: {e: d for e, d in f.items() if e != "txt"}, "missing_key"),
    "text_renamed": (("image_text", "text"), lambda f, k, r: {("caption" if e == "txt" else e): d
                                                              for e, d in f.items()}, "missing_key"),
    "json_garbage": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=b"{not json"), "bad_json"),
    "json_not_an_object": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=b"[1, 2]"), "bad_json"),
    "json_without_modality": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=b'{"source": "x"}'), None),
    "json_deeply_nested": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 +
                                                               b"}"), "bad_json"),
    "no_json_and_no_text": (("image_text",), lambda f, k, r: {"png": f["png"]}, "modality_mismatch"),  # infers image
    "json_flipped": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=flip(f["json"], r)), "bad_json"),
    "modality_unknown": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=meta_with(f, modality="audio")),
                         "unknown_modality"),
    "modality_not_text": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=meta_with(f, modality=3)), "unknown_modality"),
    "modality_of_another_kind": (SAMPLE_KINDS, lambda f, k, r: dict(f, json=meta_with(
        f, modality=next(x for x in SAMPLE_KINDS if x != k))), "modality_mismatch"),
    "png_truncated": (("image_text", "image"), lambda f, k, r: dict(f, png=f["png"][:r.randrange(8, len(f["png"]))]),
                      "bad_image"),
    "png_flipped": (("image_text", "image"), lambda f, k, r: dict(f, png=flip(f["png"], r)), "bad_image"),
    "png_garbage": (("image_text", "image"), lambda f, k, r: dict(f, png=b"\x89PNG\r\n\x1a\n" + r.randbytes(60)),
                    "bad_image"),
    "png_huge": (("image_text", "image"), lambda f, k, r: dict(f, png=HUGE_PNG), "image_too_large"),
    "text_empty": (("image_text", "text"), lambda f, k, r: dict(f, txt=b""), "empty_caption"),
    "text_blank": (("image_text", "text"), lambda f, k, r: dict(f, txt=b" \n\t "), "empty_caption"),
    "text_flipped": (("image_text", "text"), lambda f, k, r: dict(f, txt=flip(f["txt"], r)), "bad_text"),
    "extra_member": (SAMPLE_KINDS, lambda f, k, r: dict(f, extra=b"ignored"), None),
    "uppercase_extension": (("image_text", "text"), lambda f, k, r: {("TXT" if e == "txt" else e): d
                                                                     for e, d in f.items()}, None),
}


def padded_end(member: tarfile.TarInfo) -> int:
    return member.offset_data + -(-member.size // 512) * 512


def layout(path: Path) -> tuple[list[int], int, int]:
    """(where each sample's first member ends, where the last member ends, file size)."""
    first_ends, key, end = [], None, 0
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.split(".", 1)[0] != key:
                key = m.name.split(".", 1)[0]
                first_ends.append(padded_end(m))
            end = max(end, padded_end(m))
    return first_ends, end, path.stat().st_size


def damage_archive(path: Path, rng: random.Random) -> int | None:
    """Damage the tar's structure in place; returns the byte where reading must stop, or None."""
    _, end, size = layout(path)
    raw = bytearray(path.read_bytes())
    how = rng.choice(["none", "cut", "cut_in_padding", "cut_at_member_end", "header_flip", "zeroed_header", "tail_flip",
                      "gap_flip", "zero_filled", "gzip", "gzip_of_cut"])
    with tarfile.open(path) as tar:
        members = list(tar)
    if how == "cut":
        raw = raw[:rng.randrange(0, size)]
        stop = len(raw) if len(raw) < end + 1024 else None
    elif how == "cut_in_padding":  # losing zero padding after the end-of-archive marker is harmless
        raw, stop = raw[:rng.randrange(end + 1024, size + 1)], None
    elif how in ("cut_at_member_end", "gzip_of_cut"):  # a cut where a member's padded data ends: no clue but the end
        stop = padded_end(rng.choice(members))
        raw = raw[:stop]
        if how == "gzip_of_cut":
            raw = gzip.compress(bytes(raw))
    elif how == "zero_filled":
        raw, stop = bytes(len(raw)), 0
    elif how == "gzip":  # a valid compressed shard: no alarm
        raw, stop = gzip.compress(bytes(raw)), None
    elif how in ("header_flip", "zeroed_header"):
        header = rng.choice(members).offset
        if how == "header_flip":
            raw[header + rng.randrange(512)] ^= 0xFF  # 155 too: the byte after the checksum's NUL
        else:
            raw[header:header + 512] = bytes(512)
        stop = header
    elif how == "tail_flip":  # junk in the end-of-archive marker or the padding after it
        raw[rng.randrange(end, size)] ^= 0xFF
        stop = end
    elif how == "gap_flip":  # the zero padding between a member's data and the next header is never read
        gaps = [(m.offset_data + m.size, padded_end(m)) for m in members if m.size % 512]
        lo, hi = rng.choice(gaps)
        raw[rng.randrange(lo, hi)] ^= 0xFF
        stop = None
    else:
        stop = None
    path.write_bytes(bytes(raw))
    return stop


@pytest.fixture(scope="module")
def base_shards(small_dataset) -> dict[str, list]:
    """The first 12 samples of a real shard of each kind."""
    return {kind: read_samples(small_dataset / shards_of(small_dataset, "train", kind)[0])[:12]
            for kind in SAMPLE_KINDS}


def test_fuzzed_shards_never_raise_and_report_exact_counts(base_shards, tmp_path):
    """500 damaged variants of real shards: sample-level damage of every kind plus archive damage
    (cuts, checksum failures, zeroed headers, junk after the end); an oracle predicts each skip."""
    rng = random.Random(1234)
    reasons_seen: Counter = Counter()
    for variant in range(500):
        kind = rng.choice(SAMPLE_KINDS)
        samples, expected_reason = [], {}
        for key, files in base_shards[kind]:
            if rng.random() < 0.35:
                name = rng.choice([n for n, (kinds, _, _) in SAMPLE_DAMAGE.items() if kind in kinds])
                _, damage, reason = SAMPLE_DAMAGE[name]
                files = damage(dict(files), kind, rng)
                if reason:
                    expected_reason[key] = reason
            samples.append((key, files))
        path = tmp_path / f"variant{variant}.tar"
        write_samples(path, samples)
        first_ends, _, _ = layout(path)
        stop = damage_archive(path, rng)
        # a sample is complete once the next sample's first member is read; the last one needs a clean end
        survivors = [key for i, (key, _) in enumerate(samples)
                     if stop is None or (i + 1 < len(samples) and first_ends[i + 1] <= stop)]
        expected = Counter(expected_reason[k] for k in survivors if k in expected_reason)
        if stop is not None:
            expected["corrupt_tar"] = 1

        skips = SkipLog()
        good = [s for key, files in iter_raw(str(path), skips)
                if (s := decode(str(path), key, files, kind, skips)) is not None]
        assert {r: n for r, n in skips.counts().items() if n} == dict(expected), variant
        assert [s["key"] for s in good] == [k for k in survivors if k not in expected_reason], variant
        originals = dict(base_shards[kind])
        for s in good:
            if s["text"] is not None:
                assert s["text"] == originals[s["key"]]["txt"].decode()
            if s["image"] is not None:
                assert s["image"].tobytes() == Image.open(io.BytesIO(originals[s["key"]]["png"])).tobytes()
        reasons_seen.update(expected)
    # the fuzz exercised every reason a damaged sample or archive can give (not those of other tests below)
    assert set(reasons_seen) == set(SKIP_REASONS) - {"dead_source", "unreadable_shard", "member_too_large",
                                                     "caption_truncated", "duplicate_key"}


def test_skips_are_logged_with_shard_and_key_once(base_shards, tmp_path, caplog):
    key, files = base_shards["text"][2]
    path = tmp_path / "one.tar"
    write_samples(path, [base_shards["text"][0], (key, dict(files, txt=b"  "))])
    skips = SkipLog()
    with caplog.at_level(logging.DEBUG, logger="mmoe_ds.data"):
        for _ in range(3):  # a resampled loader reads the same shard again and again
            for k, f in iter_raw(str(path), skips):
                decode(str(path), k, f, "text", skips)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and key in warnings[0] and "empty_caption" in warnings[0]
    assert skips.counts()["empty_caption"] == 1


# -- through the loader --------------------------------------------------------------------------------
@pytest.fixture
def damaged_copy(small_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    return data


def damage_samples(path: Path, every: int, damage_name: str) -> list[str]:
    """Apply one SAMPLE_DAMAGE to every `every`-th sample of a shard; returns the damaged keys."""
    samples, damaged, rng = read_samples(path), [], random.Random(0)
    kind = json.loads(samples[0][1]["json"])["modality"]
    for i in range(0, len(samples), every):
        key, files = samples[i]
        samples[i] = (key, SAMPLE_DAMAGE[damage_name][1](dict(files), kind, rng))
        damaged.append(key)
    write_samples(path, samples)
    return damaged


def run_until_every_stream_made_a_pass(loader, limit: int = 3000) -> int:
    it = iter(loader)
    for n in range(1, limit + 1):
        batch = next(it)
        assert batch["sample_kind"].tolist() == EXPECTED_KINDS
        positions = [p for w in loader.state_dict()["workers"].values() for p in w["streams"].values()]
        if len(loader.state_dict()["workers"]) == loader.workers and all(p[0] >= 1 for p in positions):
            return n
    raise AssertionError("some stream never finished a pass")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_counts_each_bad_sample_once_per_rank(damaged_copy, num_workers):
    pairs = shards_of(damaged_copy, "train", "image_text")
    texts = shards_of(damaged_copy, "train", "text")
    expected = Counter()
    expected["bad_image"] = len(damage_samples(damaged_copy / pairs[0], 7, "png_flipped"))
    expected["empty_caption"] = len(damage_samples(damaged_copy / pairs[-1], 5, "text_blank"))
    expected["unknown_modality"] = len(damage_samples(damaged_copy / texts[0], 9, "modality_unknown"))
    raw = (damaged_copy / texts[1]).read_bytes()
    (damaged_copy / texts[1]).write_bytes(raw[:len(raw) // 2 + 100])  # a cut shard: counted once, not per pass
    expected["corrupt_tar"] = 1
    loader = make_loader(damaged_copy, composition={"image_text": 5, "text": 2, "image": 1}, num_workers=num_workers)
    run_until_every_stream_made_a_pass(loader)
    assert loader.skip_counts() == {r: expected.get(r, 0) for r in SKIP_REASONS}


def test_loader_survives_random_damage_to_many_shards(damaged_copy):
    rng = random.Random(7)
    m = manifest(damaged_copy)
    victims = [rel for rel in sorted(m["shards"]) if m["shards"][rel]["split"] == "train"]
    for rel in victims[1::2]:  # every other shard; each kind keeps readable data
        raw = bytearray((damaged_copy / rel).read_bytes())
        how = rng.choice(["cut", "flips", "zeros", "junk", "swap"])
        if how == "cut":
            raw = raw[:rng.randrange(len(raw))]
        elif how == "flips":
            for _ in range(rng.randrange(1, 60)):
                raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        elif how == "zeros":
            start, n = rng.randrange(len(raw)), rng.randrange(1, 4096)
            raw[start:start + n] = bytes(len(raw[start:start + n]))
        elif how == "junk":
            raw += rng.randbytes(rng.randrange(1, 3000))
        else:  # two 512-byte blocks swapped
            a, b = rng.randrange(len(raw) // 512) * 512, rng.randrange(len(raw) // 512) * 512
            raw[a:a + 512], raw[b:b + 512] = raw[b:b + 512], raw[a:a + 512]
        (damaged_copy / rel).write_bytes(bytes(raw))
    loader = make_loader(damaged_copy, seed=2, num_workers=2)
    for batch in take(iter(loader), 300):
        assert batch["sample_kind"].tolist() == EXPECTED_KINDS
    counts = loader.skip_counts()
    assert set(counts) == set(SKIP_REASONS) and counts["corrupt_tar"] > 0


def test_an_unreadable_source_is_dropped_from_the_mix(damaged_copy):
    for rel in shards_of(damaged_copy, "train", "image_text"):
        if manifest(damaged_copy)["shards"][rel]["source"] == "skimage":
            (damaged_copy / rel).write_bytes(bytes(4096))
    loader = make_loader(damaged_copy, seed=3)
    for batch in take(iter(loader), 100):
        assert batch["sample_kind"].tolist() == EXPECTED_KINDS
        assert not any(k.startswith("skimage/") for k in batch["keys"])
    assert loader.skip_counts()["dead_source"] == 1 and loader.skip_counts()["corrupt_tar"] == 1


def test_samples_the_processor_refuses_are_skipped_not_fatal(small_dataset):
    class Picky(MmoeProcessor):
        """Refuses a third of all images, and every image of the photo source (not 28x28 or 8x8)."""

        def patchify(self, image):
            if zlib.crc32(image.tobytes()) % 3 == 0 or image.size not in ((28, 28), (8, 8)):
                raise ValueError("refused")
            return super().patchify(image)

    base = MmoeProcessor.from_pretrained(small_dataset / "processor")
    picky = Picky(base.tokenizer, **{k: v for k, v in base.to_dict().items() if k != "processor_class"})
    equal = {source: 1.0 for source in manifest(small_dataset)["sources"]}  # the photos are drawn often
    loader = make_loader(small_dataset, seed=3, source_weights=equal)
    loader.processor = picky
    picky.max_length = 48
    for batch in take(iter(loader), 100):
        assert batch["sample_kind"].tolist() == EXPECTED_KINDS
    counts = loader.skip_counts()
    assert counts["bad_image"] > 100 and counts["dead_source"] == 1  # the photos: refused on every pass


def test_a_kind_without_any_readable_sample_fails_with_the_fix(damaged_copy):
    for rel in shards_of(damaged_copy, "train", "text"):
        (damaged_copy / rel).write_bytes(b"")
    with pytest.raises(RuntimeError, match="composition count to 0"):
        take(iter(make_loader(damaged_copy)), 5)
    assert np.all([b["sample_kind"].tolist() == [0] * 4 for b in take(iter(make_loader(
        damaged_copy, composition={"image_text": 4})), 3)])


# -- the reader on shards as the world damages and compresses them (acceptance 5, reader part) ----------
def jpeg(color: tuple[int, int, int], size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def img2dataset_sample(i: int) -> tuple[str, dict[str, bytes]]:
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json of download metadata; no modality field."""
    key, caption = f"{i:09d}", f"a photo number {i}"
    meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "error_message": None,
            "width": 16, "height": 12, "original_width": 640, "original_height": 480, "caption": caption}
    return key, {"jpg": jpeg((40 * i % 256, 90, 200)), "txt": caption.encode(), "json": json.dumps(meta).encode()}


KEYS = [f"{i:09d}" for i in range(6)]


@pytest.fixture
def foreign_shard(tmp_path) -> Path:
    """6 img2dataset samples (3 members each), written with Python's tarfile."""
    path = tmp_path / "00000.tar"
    write_samples(path, [img2dataset_sample(i) for i in range(6)])
    return path


def read_all(shard, **options) -> tuple[list[str], dict[str, int]]:
    """(keys of the samples that decode, {reason: count} of every reason)."""
    skips = SkipLog()
    keys = [key for key, files in iter_raw(str(shard), skips, **options)
            if decode(str(shard), key, files, None, skips) is not None]
    return keys, skips.counts()


def only(**counts) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


def member_ends(path: Path) -> list[int]:
    """Where each member's padded data ends, from the offsets tarfile reports."""
    with tarfile.open(path) as tar:
        return [padded_end(m) for m in tar]


def header_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar]


def test_the_foreign_shard_reads_whole(foreign_shard):
    assert read_all(foreign_shard) == (KEYS, only())


# (what is done to the file, the samples a reader can still trust, the reason counted once)
ARCHIVE_DAMAGE = {
    # a cut exactly where the 3rd sample's last member ends: nothing says the sample was complete
    "cut_after_sample_3": (lambda raw, p: raw[:member_ends(p)[8]], KEYS[:2], "corrupt_tar"),
    "cut_after_first_member_of_sample_4": (lambda raw, p: raw[:member_ends(p)[9]], KEYS[:3], "corrupt_tar"),
    "cut_after_the_last_member": (lambda raw, p: raw[:member_ends(p)[-1]], KEYS[:5], "corrupt_tar"),
    "cut_inside_the_end_marker": (lambda raw, p: raw[:member_ends(p)[-1] + 512], KEYS[:5], "corrupt_tar"),
    # a damaged header of member m (0-based; 3 members a sample): the sample m belongs to is in doubt
    "flipped_name_byte_in_header_of_member_10": (lambda raw, p: flip_at(raw, header_offsets(p)[10]), KEYS[:3],
                                                 "corrupt_tar"),
    "flipped_size_byte_in_header_of_member_13": (lambda raw, p: flip_at(raw, header_offsets(p)[13] + 130), KEYS[:4],
                                                 "corrupt_tar"),
    "flipped_byte_after_checksum_of_member_4": (lambda raw, p: flip_at(raw, header_offsets(p)[4] + 155), KEYS[:1],
                                                "corrupt_tar"),
    "zeroed_header_of_member_4": (lambda raw, p: raw[:header_offsets(p)[4]] + bytes(512) +
                                  raw[header_offsets(p)[4] + 512:], KEYS[:1], "corrupt_tar"),
    "zeroed_header_of_member_0": (lambda raw, p: bytes(512) + raw[512:], [], "corrupt_tar"),
    "zero_filled_file": (lambda raw, p: bytes(len(raw)), [], "corrupt_tar"),
    "empty_file": (lambda raw, p: b"", [], "corrupt_tar"),
    "garbage_appended": (lambda raw, p: raw + b"<html>503 Service Unavailable</html>", KEYS[:5], "corrupt_tar"),
    "gzip_then_cut_after_sample_3": (lambda raw, p: gzip.compress(raw[:member_ends(p)[8]]), KEYS[:2], "corrupt_tar"),
    "gzip_with_garbage_appended": (lambda raw, p: gzip.compress(raw) + b"garbage", KEYS[:5], "corrupt_tar"),
    "zstd_compressed": (lambda raw, p: b"\x28\xb5\x2f\xfd" + raw, [], "corrupt_tar"),
}


def flip_at(raw: bytes, offset: int) -> bytes:
    return raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1:]


@pytest.mark.parametrize("damage", sorted(ARCHIVE_DAMAGE))
def test_each_archive_damage_is_counted_exactly_once(foreign_shard, damage):
    change, survivors, reason = ARCHIVE_DAMAGE[damage]
    foreign_shard.write_bytes(change(foreign_shard.read_bytes(), foreign_shard))
    assert read_all(foreign_shard) == (survivors, only(**{reason: 1}))


def test_a_gzip_cut_anywhere_is_counted_and_keeps_what_was_complete(foreign_shard):
    raw = foreign_shard.read_bytes()
    packed = gzip.compress(raw)
    ends, first_ends = member_ends(foreign_shard), member_ends(foreign_shard)[0::3]
    for cut in range(1, len(packed), max(1, len(packed) // 40)):
        foreign_shard.write_bytes(packed[:cut])
        readable = len(zlib.decompressobj(wbits=31).decompress(packed[:cut]))  # what any gunzip recovers
        trusted = [k for i, k in enumerate(KEYS) if i + 1 < len(KEYS) and first_ends[i + 1] <= readable]
        assert read_all(foreign_shard) == (trusted, only(corrupt_tar=1)), cut
    assert ends[-1] < len(raw)


def test_unreadable_locations_are_counted_with_their_name(tmp_path, caplog):
    for location in (str(tmp_path / "missing.tar"), f"pipe:cat {tmp_path}/missing.tar", "pipe:exit 3",
                     "s3x://bucket/no-such-protocol.tar"):
        with caplog.at_level(logging.WARNING, logger="mmoe_ds.data"):
            assert read_all(location) == ([], only(unreadable_shard=1)), location
        assert any("unreadable_shard" in r.getMessage() and location in r.getMessage() for r in caplog.records)
        caplog.clear()


def test_a_location_that_cannot_be_opened_raises_one_clear_error(tmp_path):
    with pytest.raises(ShardUnreadable, match="missing.tar"):
        with open_shard(str(tmp_path / "missing.tar")):
            pass


# -- compressed shards and every kind of location: read with no alarm ------------------------------------
def tar_with(tool: str, folder: Path, out: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    if tool == "gnu-tar":
        subprocess.run(["tar", "-czf", str(out), "--format=ustar", "-C", str(folder), *names], check=True)
        return
    with tarfile.open(out, {"tarfile-gz": "w:gz", "tarfile-bz2": "w:bz2", "tarfile-xz": "w:xz"}[tool]) as tar:
        for name in names:
            tar.add(folder / name, arcname=name)


@pytest.mark.parametrize("tool,name", [("gnu-tar", "00000.tar.gz"), ("tarfile-gz", "00000.tgz"),
                                       ("tarfile-gz", "00000.tar"), ("tarfile-bz2", "00000.tar.bz2"),
                                       ("tarfile-xz", "00000.tar.xz")])
def test_compressed_shards_read_natively_without_alarm(tmp_path, tool, name):
    if tool == "gnu-tar" and shutil.which("tar") is None:
        pytest.skip("no tar command")
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(6):  # a folder of files, as people tar them up
        key, files = img2dataset_sample(i)
        for ext, data in files.items():
            (folder / f"{key}.{ext}").write_bytes(data)
    tar_with(tool, folder, tmp_path / name)
    assert read_all(tmp_path / name) == (KEYS, only())


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    with http_server(root) as url:
        yield url, root


def test_every_kind_of_location_gives_the_same_samples(foreign_shard, http_root):
    url, root = http_root
    packed = gzip.compress(foreign_shard.read_bytes())
    (root / "00000.tar.gz").write_bytes(packed)
    shutil.copy(foreign_shard, root / "00001.tar")
    locations = [str(foreign_shard), f"file://{foreign_shard}", f"pipe:cat {root}/00000.tar.gz",
                 f"pipe:gzip -dc {root}/00000.tar.gz"]
    if shutil.which("curl"):  # webdataset's gopen reads http(s) through curl
        locations += [f"{url}/00000.tar.gz", f"{url}/00001.tar"]
    fsspec = pytest.importorskip("fsspec")
    fsspec.filesystem("memory").pipe("/bucket/00000.tar.gz", packed)
    locations.append("memory://bucket/00000.tar.gz")
    for location in locations:
        assert read_all(location) == (KEYS, only()), location
    if shutil.which("curl"):
        assert read_all(f"{url}/no-such-shard.tar") == ([], only(unreadable_shard=1))


def test_open_shard_hands_over_the_raw_bytes(foreign_shard):
    packed = gzip.compress(foreign_shard.read_bytes())
    foreign_shard.with_suffix(".tar.gz").write_bytes(packed)
    for location in (str(foreign_shard.with_suffix(".tar.gz")), f"pipe:cat {foreign_shard.with_suffix('.tar.gz')}"):
        with open_shard(location) as stream:
            assert stream.read(3) + stream.read() == packed  # still compressed: what a sha256 check needs


def test_stopping_early_closes_a_pipe_without_error(tmp_path):
    path = tmp_path / "big.tar"
    write_samples(path, [img2dataset_sample(i % 6) for i in range(400)])  # repeated keys: one sample per run
    skips = SkipLog()
    reader = iter_raw(f"pipe:cat {path}", skips)
    assert next(reader)[0] == KEYS[0]
    reader.close()  # a reader that stops early (e.g. a one-pass loader's last batch) leaves no error behind
    assert skips.counts() == only()


# -- img2dataset samples: the kind comes from the members present ------------------------------------------
@pytest.mark.parametrize("exts,kind", [(("jpg", "txt", "json"), "image_text"), (("webp", "txt"), "image_text"),
                                       (("png",), "image"), (("jpeg", "json"), "image"), (("txt", "json"), "text"),
                                       (("json",), None), (("cls", "json"), None), ((), None)])
def test_infer_kind(exts, kind):
    assert infer_kind({ext: b"" for ext in exts}) == kind


def test_img2dataset_samples_decode_without_modality():
    key, files = img2dataset_sample(2)
    skips = SkipLog()
    sample = decode("s.tar", key, files, "image_text", skips)
    assert (sample["kind"], sample["text"], sample["image"].size, sample["meta"]["url"]) == (
        "image_text", "a photo number 2", (16, 12), "https://example.com/2.jpg")
    no_json = decode("s.tar", key, {"jpg": files["jpg"], "txt": files["txt"]}, None, skips)
    assert (no_json["kind"], no_json["text"], no_json["meta"]) == ("image_text", "a photo number 2", {})
    image_only = decode("s.tar", key, {"jpg": files["jpg"], "json": files["json"]}, "image", skips)
    assert image_only["kind"] == "image" and image_only["text"] is None
    webp = io.BytesIO()
    Image.new("RGB", (10, 7), (1, 2, 3)).save(webp, format="WEBP")
    assert decode("s.tar", key, {"webp": webp.getvalue(), "txt": b"x"}, None, skips)["image"].size == (10, 7)
    assert skips.counts() == only()


@pytest.mark.parametrize("json_bytes,reason", [
    (b'{"url": "https://example.com/0.jpg", "caption": "a pho', "bad_json"),  # cut mid-write
    (b"[1, 2]", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    (b"[" * 200_000 + b"]" * 200_000, "bad_json"),  # deeper than Python's recursion limit
    (b'{"m": ' * 50_000 + b"1" + b"}" * 50_000, "bad_json"),
    (b'{"modality": "audio"}', "unknown_modality"),
    (b'{"modality": null}', "unknown_modality"),
    (b'{"modality": "text"}', "modality_mismatch"),  # metadata wins over the members
    (b"{}", None),
])
def test_img2dataset_metadata_problems_are_counted(json_bytes, reason):
    key, files = img2dataset_sample(0)
    skips = SkipLog()
    sample = decode("s.tar", key, dict(files, json=json_bytes), "image_text", skips)
    assert (sample is None) == (reason is not None)
    assert skips.counts() == (only(**{reason: 1}) if reason else only())


def test_a_sample_without_image_or_text_is_a_missing_key():
    skips = SkipLog()
    assert decode("s.tar", "k", {"json": b'{"url": "x"}', "cls": b"3"}, None, skips) is None
    assert skips.counts() == only(missing_key=1)


# -- every decode error is a counted skip; images over the pixel cap are refused from the header ---------------
def png_with_bad_pixels() -> bytes:
    """A PNG whose chunks all have valid CRCs but whose IDAT is not a zlib stream."""
    good = zero_png(8, 8)
    idat = b"not a zlib stream at all"
    return good[:33] + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + \
        good[-12:]


@pytest.mark.parametrize("name,make,options,reason", [
    ("truncated_jpeg", lambda: jpeg((1, 2, 3), (64, 64))[:300], {}, "bad_image"),
    ("text_named_jpg", lambda: b"this is a caption, not an image", {}, "bad_image"),
    ("empty_image", lambda: b"", {}, "bad_image"),
    ("png_bad_pixel_stream", png_with_bad_pixels, {}, "bad_image"),
    ("over_the_default_cap", lambda: zero_png(4097, 4097), {}, "image_too_large"),
    ("over_a_given_cap", lambda: zero_png(101, 100), {"max_image_pixels": 10_000}, "image_too_large"),
    ("pillow_bomb_error", lambda: zero_png(20000, 20000), {"max_image_pixels": 10 ** 12}, "image_too_large"),
    ("at_the_default_cap", lambda: zero_png(4096, 4096), {}, None),
    ("at_a_given_cap", lambda: zero_png(100, 100), {"max_image_pixels": 10_000}, None),
])
def test_image_errors_are_counted_skips(name, make, options, reason):
    skips = SkipLog()
    sample = decode("s.tar", "k", {"png" if make().startswith(b"\x89PNG") else "jpg": make(), "txt": b"a caption"},
                    "image_text", skips, **options)
    assert skips.counts() == (only(**{reason: 1}) if reason else only())
    if reason is None:
        assert sample["image"].size == Image.open(io.BytesIO(make())).size


def test_pillow_warnings_turned_into_errors_are_counted_skips():
    skips = SkipLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `python -W error`: Pillow's DecompressionBombWarning raises
        assert decode("s.tar", "k", {"png": zero_png(10000, 10000), "txt": b"x"}, None, skips,
                      max_image_pixels=10 ** 12) is None
    assert skips.counts() == only(image_too_large=1)


# -- memory caps: captions cut by bytes, oversized members never held whole ------------------------------------
def test_a_long_caption_is_cut_at_a_character_boundary_and_noted():
    caption = "a" * 65535 + "é" + "b" * 10_000  # the 2-byte 'é' straddles byte 65536
    skips = SkipLog()
    sample = decode("s.tar", "k", {"txt": caption.encode()}, "text", skips)
    assert sample["text"] == "a" * 65535 and skips.counts() == only(caption_truncated=1)
    sample = decode("s.tar", "k2", {"txt": "€".encode() * 10}, "text", skips, max_caption_bytes=10)
    assert sample["text"] == "€€€"  # 9 of 10 bytes: the 4th euro sign would be cut in half
    assert decode("s.tar", "k3", {"txt": b"\xff" + b"a" * 100}, "text", skips, max_caption_bytes=10) is None
    assert skips.counts() == only(caption_truncated=2, bad_text=1)


def test_members_over_the_member_cap_are_cut_or_skipped(tmp_path):
    _, files = img2dataset_sample(1)
    path = tmp_path / "big.tar"
    write_samples(path, [("long_caption", {"txt": "é".encode() * 3000, "json": b"{}"}),
                         ("big_image", {"jpg": files["jpg"] + bytes(5000), "txt": b"a caption"}),
                         ("big_json", {"json": json.dumps({"pad": "x" * 5000}).encode(), "txt": b"a caption"}),
                         ("big_unused", {"txt": b"fine", "npy": bytes(9000)}),
                         ("small", {"txt": b"small", "json": b"{}"})])
    skips = SkipLog()
    raw = list(iter_raw(str(path), skips, max_member_bytes=4096, max_caption_bytes=101))
    assert [(k, {e: len(d) for e, d in f.items()}) for k, f in raw] == [
        ("long_caption", {"txt": 101, "json": 2}), ("big_image", {"jpg": 0, "txt": 9}),
        ("big_json", {"json": 0, "txt": 9}), ("big_unused", {"txt": 4, "npy": 0}), ("small", {"txt": 5, "json": 2})]
    texts = {k: s["text"] for k, f in raw if (s := decode(str(path), k, f, None, skips, max_caption_bytes=101))}
    assert texts == {"long_caption": "é" * 50, "big_unused": "fine", "small": "small"}
    assert skips.counts() == only(member_too_large=2, caption_truncated=1)


# -- counts line up across ranks ----------------------------------------------------------------------------------
def test_skip_counts_have_a_fixed_order_and_merge_across_ranks():
    rank0, rank1 = SkipLog(), SkipLog()
    rank0.add("bad_image", "a.tar", "k1")
    rank1.add("image_too_large", "a.tar", "k2")
    for log_ in (rank0, rank1):
        log_.add("corrupt_tar", "/data/b.tar")  # a damaged shard both ranks read
    assert list(rank0.counts()) == list(SKIP_REASONS)
    assert counts_of([a + b for a, b in zip(rank0.vector(), rank1.vector())]) == only(
        bad_image=1, image_too_large=1, corrupt_tar=2)  # a sum counts the shard per rank that met it
    assert SkipLog.merged([rank0.state(), rank1.state()]).counts() == only(bad_image=1, image_too_large=1,
                                                                           corrupt_tar=1)
    assert rank0.seen("/data/b.tar") == ["corrupt_tar"] and rank0.seen("a.tar", "k1") == ["bad_image"]
    assert rank0.seen("a.tar") == [] and rank0.seen("a.tar", "k2") == []
    with pytest.raises(ValueError, match="SKIP_REASONS"):
        rank0.add("bad_jsn", "a.tar", "k")
