"""WebDataset tar shards: a byte-deterministic writer and a reader that never raises on bad data.

A sample is the consecutive tar members sharing a key (the member name up to the first dot of
its last path component): `KEY.png|jpg|jpeg|webp` (image), `KEY.txt` (caption or text),
`KEY.json` (metadata: modality, source, label, license). Shards written by other tools work
too: without a `modality` in the metadata, or without metadata at all (img2dataset writes
url/caption/size fields only), the sample's kind is inferred from the members present.

Locations: `open_shard` opens local paths, `file://`, `pipe:COMMAND`, `http(s)://` (webdataset's
`gopen`, through curl) and other fsspec URLs (`s3://`, `gs://`, ...). Compressed shards (gzip,
bzip2, xz; `.tar.gz`/`.tgz` or any name: detected by their magic bytes) are read as they stream.

The writer fixes mtime, owner, mode and member order so two builds are byte-identical; the
reader turns every kind of damage into a counted, logged skip, and bounds its memory: a member
over `max_member_bytes` is never held whole, captions are cut to `max_caption_bytes` (at a UTF-8
character boundary, counted as `caption_truncated`) before any tokenization, and images over
`max_image_pixels` are refused from their header, before decoding (`image_too_large`).
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import json
import lzma
import struct
import tarfile
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

from PIL import Image, ImageFile

from .schema import SAMPLE_KINDS, SKIP_REASONS  # noqa: F401  (SKIP_REASONS re-exported)
from .skips import SkipLog, record_skip
from .tar_reader import Oversized, TarDamage, iter_members

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTENSIONS = ("txt",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CAPTION_BYTES = 65536
MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096
MAX_MEMBER_BYTES = 64 << 20
GOPEN_SCHEMES = ("pipe", "http", "https", "sftp", "ftps", "scp", "ais")  # webdataset's openers (curl, shell)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)  # PNG without time chunks: deterministic
    return buf.getvalue()


class ShardWriter:
    """Writes samples into `pattern % index` tars of `samples_per_shard` samples each."""

    def __init__(self, pattern: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}.")
        self.pattern, self.samples_per_shard = pattern, samples_per_shard
        self.tar: tarfile.TarFile | None = None
        self.paths: list[str] = []
        self.counts: list[int] = []

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (WebDataset splits names there)")
        if self.tar is None or self.counts[-1] >= self.samples_per_shard:
            self._next_shard()
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(files[ext]), 0, 0o444, 0, 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(files[ext]))
        self.counts[-1] += 1

    def _next_shard(self) -> None:
        self.close()
        self.paths.append(self.pattern % len(self.paths))
        self.counts.append(0)
        self.tar = tarfile.open(self.paths[-1], "w", format=tarfile.USTAR_FORMAT)

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: `dir/key.ext.more` -> ("dir/key", "ext.more"); None without an extension."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class ShardUnreadable(OSError):
    """A shard's location cannot be opened or read: a missing file, a network or storage error, a
    pipe command that fails, an fsspec backend that is not installed. Not damage to the archive."""


class _Guarded:
    """A read-only stream over an opened location: `read(n)` returns n bytes unless at the end,
    bytes given back with `unread` come first, and any error of the location becomes ShardUnreadable
    (so the layers above can tell a broken network from a damaged archive)."""

    def __init__(self, stream, url: str):
        self._stream, self._url, self._head = stream, url, b""

    def unread(self, data: bytes) -> None:
        self._head = data + self._head

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            out, self._head = self._head + self._read_raw(-1), b""
            return out
        parts, self._head = [self._head[:n]], self._head[n:]
        want = n - len(parts[0])
        while want > 0 and (chunk := self._read_raw(want)):
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def _read_raw(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except Exception as e:  # OSError, fsspec backends' own errors, a pipe's exit status...
            raise ShardUnreadable(f"reading {self._url}: {type(e).__name__}: {e}") from e


def _is_local(url: str, scheme: str) -> bool:
    if scheme == "" or len(scheme) == 1:  # one letter: a Windows drive
        return True
    if scheme in GOPEN_SCHEMES or "://" in url:
        return False
    try:
        return Path(url).exists()  # a local name with a colon, e.g. "shard:1.tar"
    except OSError:
        return False


def _open_location(url: str) -> BinaryIO:
    scheme = urlparse(url).scheme.lower()
    if _is_local(url, scheme):
        return open(url, "rb", buffering=1 << 20)
    if scheme == "file":
        return open(url2pathname(urlparse(url).path), "rb", buffering=1 << 20)
    if scheme in GOPEN_SCHEMES:
        from webdataset.gopen import gopen
        try:
            return gopen(url, "rb")
        except FileNotFoundError as e:  # the command itself is missing
            raise ShardUnreadable(f"{url}: webdataset opens {scheme}: locations with a command ({e.filename}), "
                                  "which is not installed; install it or use a local copy") from e
    try:
        import fsspec
    except ImportError:
        raise ShardUnreadable(f"{url}: {scheme}:// locations are opened through fsspec; install it (`pip install "
                              f"fsspec`) and its {scheme} backend (e.g. s3fs, gcsfs, adlfs).") from None
    return fsspec.open(url, "rb").open()


def _close(stream) -> Exception | None:
    try:
        stream.close()  # a `pipe:` or curl stream reports its command's exit status here
    except Exception as e:
        return e
    return None


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """The raw (still compressed, if it is) bytes of a shard, wherever it lives.

    Args:
        url: a local path, `file://PATH`, `pipe:COMMAND` (its stdout), `http(s)://...` (webdataset's
            gopen, through curl), or any other fsspec URL (`s3://`, `gs://`, `hf://`, ...; fsspec and
            the protocol's backend must be installed).

    Yields:
        A binary stream whose `read(n)` returns n bytes unless at the end.

    Raises:
        ShardUnreadable: the location cannot be opened or read, or a pipe/curl command exits with
            an error; the message names the shard.
    """
    url = str(url)
    try:
        stream = _open_location(url)
    except ShardUnreadable:
        raise
    except Exception as e:  # FileNotFoundError, gopen's ValueError, an fsspec backend's ImportError...
        raise ShardUnreadable(f"cannot open shard {url}: {type(e).__name__}: {e}") from e
    try:
        yield _Guarded(stream, url)
    except Exception as e:
        error = _close(stream)
        if error is not None and not isinstance(e, ShardUnreadable):  # a failing command explains cut data
            raise ShardUnreadable(f"reading {url}: {type(error).__name__}: {error}") from e
        raise
    except BaseException:  # GeneratorExit: the reader stopped early; a pipe's SIGPIPE status is no error
        _close(stream)
        raise
    error = _close(stream)
    if error is not None:
        raise ShardUnreadable(f"reading {url}: {type(error).__name__}: {error}") from error


def _uncompressed(stream: _Guarded) -> BinaryIO:
    """The tar stream inside `stream`: gzip, bzip2 and xz are detected by their magic bytes."""
    head = stream.read(10)
    stream.unread(head)
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return bz2.BZ2File(stream, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, "rb")
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise TarDamage("a zstd-compressed shard: not read natively; decompress it or read it through "
                        "`pipe:zstd -dc SHARD`")
    return stream


def iter_raw(shard: str, skips: SkipLog | Counter, *, max_member_bytes: int = MAX_MEMBER_BYTES,
             max_caption_bytes: int = MAX_CAPTION_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order; never raises.

    A sample is handed out once it is known to be complete: when the first member of the next
    sample has been read (another key, or an extension the sample already has), or when the
    archive ends properly. A key is handed out once per read: a later sample with a key already
    seen in the shard (next to the first or far from it) is left out and counted as
    `duplicate_key` (the first one is kept), so a one-pass read never yields a key twice. Damage
    (a cut anywhere, a header failing its checksum, a zeroed header, junk after the end, a damaged
    compressed stream, an archive without any file) ends the shard there with one `corrupt_tar`; a location that cannot
    be opened or read (missing file, network, failing pipe command) with one `unreadable_shard`;
    the sample being assembled is dropped with it.

    Args:
        shard: any location `open_shard` takes; plain or gzip/bzip2/xz-compressed tar.
        skips: where skips are counted.
        max_member_bytes: a member larger than this is not read into memory: a text member (`.txt`)
            keeps its first `max_caption_bytes`, any other keeps nothing; either arrives as an
            `Oversized` (a bytes with the full `size`), which `decode` cuts or skips
            (`caption_truncated` / `member_too_large`).
        max_caption_bytes: see max_member_bytes.
    """
    def keep(name: str) -> int:
        parts = split_member_name(name)
        return max_caption_bytes if parts is not None and parts[1] in TEXT_EXTENSIONS else 0

    pending: tuple[str, dict[str, bytes]] | None = None
    seen: set[str] = set()  # keys handed out (or being assembled) in this read of the shard
    dropping: str | None = None  # the key of a duplicate sample whose members are being passed over
    dropped_exts: set[str] = set()
    try:
        with open_shard(shard) as raw:
            for name, data in iter_members(_uncompressed(raw), max_member_bytes=max_member_bytes, keep_bytes=keep):
                parts = split_member_name(name)
                if parts is None:
                    continue
                key, ext = parts
                if dropping is not None:
                    if key == dropping and ext not in dropped_exts:  # the duplicate's other members
                        dropped_exts.add(ext)
                        continue
                    dropping = None
                if pending is not None and (pending[0] != key or ext in pending[1]):  # a new sample starts
                    yield pending
                    pending = None
                if pending is None and key in seen:  # a second sample with a key already used
                    record_skip(skips, "duplicate_key", shard, key, "a second sample with this key in the shard: "
                                                                    "the first one is kept")
                    dropping, dropped_exts = key, {ext}
                    continue
                seen.add(key)
                pending = pending or (key, {})
                pending[1][ext] = data
    except ShardUnreadable as e:
        record_skip(skips, "unreadable_shard", shard, detail=str(e)[:300])
        return
    except (TarDamage, OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # OSError: gzip/bz2 stream damage
        record_skip(skips, "corrupt_tar", shard, detail=f"{type(e).__name__}: {e}"[:300])
        return
    if pending is not None:
        yield pending


def infer_kind(files: dict[str, bytes]) -> str | None:
    """The sample kind its members make (image+text, image, text), for samples whose metadata does
    not name one; None when it has neither an image (png/jpg/jpeg/webp) nor a text (txt) member."""
    has_image = any(ext in files for ext in IMAGE_EXTENSIONS)
    has_text = any(ext in files for ext in TEXT_EXTENSIONS)
    if has_image:
        return "image_text" if has_text else "image"
    return "text" if has_text else None


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than allowed."""


def check_png_chunks(data: bytes) -> None:
    """Every chunk's CRC, up to IEND: decoders skip most of them, so a flipped byte in the pixel
    data would otherwise decode silently into wrong pixels."""
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise ValueError("PNG truncated")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(data[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise ValueError(f"PNG chunk {kind!r} at byte {pos} is damaged")
        if kind == b"IEND":
            return
        pos = end + 4


@contextlib.contextmanager
def strict_decoding():
    """Truncated files must fail even if another library set PIL's LOAD_TRUNCATED_IMAGES."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an image, refusing from its header (before any pixel is decoded) one of more than
    `max_pixels` pixels. (JPEG's reduced-size `draft` decoding is not used: the cap is a refusal,
    the same for every format, and counted as `image_too_large`.)"""
    if data.startswith(PNG_SIGNATURE):
        check_png_chunks(data)
    try:
        image = Image.open(io.BytesIO(data))  # parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise ImageTooLarge(str(e)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels, over max_image_pixels={max_pixels}")
    with strict_decoding():  # a truncated image is an error even if some library relaxed PIL
        image.load()
    return image


def _cut_caption(raw: bytes, max_bytes: int) -> tuple[str, bool]:
    """(text, whether it was cut): at most max_bytes of UTF-8, cut at a character boundary."""
    if not isinstance(raw, Oversized) and len(raw) <= max_bytes:
        return raw.decode("utf-8"), False
    # final=False: a character split by the cut is dropped, invalid bytes before it still raise
    return codecs.getincrementaldecoder("utf-8")().decode(raw[:max_bytes], final=False), True


def decode(shard: str, key: str, files: dict[str, bytes], expected_kind: str | None,
           skips: SkipLog | Counter, *, max_caption_bytes: int = MAX_CAPTION_BYTES,
           max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict | None:
    """A decoded sample, or None (counted and logged) if unusable; never raises.

    The kind is the metadata's `modality` when it has one, else inferred from the members present
    (`infer_kind`), so img2dataset shards (`.jpg` + `.txt` + `.json` of url/caption fields, or no
    `.json`) decode as they are.

    Args:
        shard, key: for the skip log.
        files: {ext: bytes} from `iter_raw`.
        expected_kind: the kind the manifest lists for this shard (None: any).
        skips: where skips are counted.
        max_caption_bytes: captions longer than this are cut to it, at a UTF-8 character boundary,
            before anything tokenizes them; the sample is kept and noted as `caption_truncated`.
        max_image_pixels: images of more pixels (read from the header) are skipped as
            `image_too_large` without being decoded.

    Returns:
        {"kind", "image" (PIL image or None), "text" (str or None), "meta" (the .json's object, {}
        without one), "key"}, or None.
    """
    def skip(reason: str, detail: str = "") -> None:
        record_skip(skips, reason, shard, key, detail)

    meta: dict = {}
    if "json" in files:
        if isinstance(files["json"], Oversized):
            return skip("member_too_large", f".json of {files['json'].size} bytes")
        try:
            meta = json.loads(files["json"])
        except (ValueError, RecursionError) as e:  # RecursionError: deeply nested metadata
            return skip("bad_json", f"{type(e).__name__}: {e}"[:120])
        if not isinstance(meta, dict):
            return skip("bad_json", f"a JSON {type(meta).__name__}, not an object")
    if "modality" in meta:
        kind = meta["modality"]
        if not isinstance(kind, str) or kind not in SAMPLE_KINDS:
            return skip("unknown_modality", repr(kind)[:60])
    else:
        kind = infer_kind(files)
        if kind is None:
            return skip("missing_key", "no image or text member, and no modality in metadata")
    if expected_kind is not None and kind != expected_kind:
        return skip("modality_mismatch", f"{kind!r} in a {expected_kind!r} shard")
    image = text = None
    if kind in ("image_text", "image"):
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            return skip("missing_key", "no image member")
        if isinstance(files[ext], Oversized):
            return skip("member_too_large", f".{ext} of {files[ext].size} bytes")
        try:
            image = _open_image(files[ext], max_image_pixels)
        except ImageTooLarge as e:
            return skip("image_too_large", str(e)[:120])
        except Exception as e:  # PIL raises many types (SyntaxError, OSError, ValueError, warnings as errors...)
            return skip("bad_image", f"{type(e).__name__}: {e}"[:120])
    if kind in ("image_text", "text"):
        if "txt" not in files:
            return skip("missing_key", "no .txt")
        try:
            text, cut = _cut_caption(files["txt"], max_caption_bytes)
        except UnicodeDecodeError as e:
            return skip("bad_text", str(e)[:120])
        text = text.strip()
        if not text:
            return skip("empty_caption")
        if cut:
            size = getattr(files["txt"], "size", len(files["txt"]))
            skip("caption_truncated", f"{size} bytes cut to {max_caption_bytes}")
    return {"kind": kind, "image": image, "text": text, "meta": meta, "key": key}
