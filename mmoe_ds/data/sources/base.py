"""The one interface every source implements, and what sources share.

A `Source` yields `Record`s in a fixed order (deterministic builds) and writes everything it
leaves out, cuts or converts into a `PrepareReport`: each skip names the file or row and a
reason from `SKIP_REASONS`; each note names what was changed (`NOTE_KINDS`). `prepare` prints
the report's summary and writes it beside the shards (`skipped.jsonl`, `notes.jsonl`).

Shared helpers: stable splits, injective sample keys, bounded caption decoding and guarded
image loading (pixel cap from the header before decoding, truncation always an error, any PIL
mode converted to 8-bit L or RGB).
"""
from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import stat
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..shards import PNG_SIGNATURE
from ..shards import check_png_chunks, strict_decoding  # the loader's checks, one implementation

DEFAULT_FRACTIONS = (0.1, 0.1)  # (validation, test): prepare's --validation-fraction / --test-fraction
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Why a file or row is left out of a build (prepare's reasons; the loader has its own in schema).
SKIP_REASONS = {
    "not_an_image": "an image-named file PIL cannot identify (text renamed .png, empty file, ...)",
    "corrupt_image": "an image that fails to decode: truncated, damaged chunk or marker",
    "too_many_pixels": "width x height above --max-image-pixels (checked from the header, before decoding)",
    "no_caption": "an image without a caption (no same-named .txt, or a row whose text is missing)",
    "no_image": "a caption file without a same-named image, or a row whose image is missing",
    "empty_caption": "a caption or text that is empty or whitespace only",
    "duplicate_image": "the same pixels as an earlier file (the first one is kept)",
    "ambiguous_caption": "a second caption file for one name (a.txt and a.TXT): the first in sorted order is used",
    "unreadable_file": "a file that cannot be read (permissions, I/O error, a broken link)",
    "special_file": "a FIFO, socket or device file: never opened (reading one could block or never end)",
    "link_outside_root": "a symbolic link whose target lies outside --input (not followed)",
    "link_loop": "a symbolic link to a folder already being read (a loop): not followed again",
    "image_too_large": "an image file over --max-image-bytes (from its size, before any byte is read)",
    "unknown_file_type": "a file that is neither an image nor a .txt caption",
    "hidden_file": "a file or folder whose name starts with '.' (.DS_Store, .ipynb_checkpoints, ...)",
    "bad_json": "a .jsonl line that is not a JSON object",
    "bad_text": "a text value that is not a string",
    "line_too_long": "a .jsonl line too long to hold a text of --max-caption-bytes (not parsed)",
    "cross_split_duplicate": "content already in an earlier split (test, then validation, then train)",
}
# What a source changed but kept.
NOTE_KINDS = {
    "converted": "image mode converted to 8-bit L or RGB (CMYK, 16-bit, palette, alpha, ...)",
    "caption_not_utf8": "caption decoded with the stated fallback (UTF-16 by BOM, else cp1252, else latin-1)",
    "caption_truncated": "caption cut to --max-caption-bytes (at a character boundary)",
    "shared_caption": "one .txt captions several same-named images (r0.png, r0.jpg): each is a sample",
    "followed_link": "a symbolic link inside --input, read through (its files keep the link's path)",
    "caption_list": "a list of captions: the first one taken (--caption-select first) or one sample each (all)",
}


def display_name(text: str) -> str:
    """A printable, UTF-8-encodable form of a file name: bytes that are not UTF-8 (decoded by Python
    with surrogateescape) are shown as backslash escapes (`caf\\xe9.png`), so reports and JSON
    can always be written; the sample key keeps the exact bytes (`sample_key`)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class SourceError(ValueError):
    """Bad input or options for a source: a one-line message naming the problem and the fix."""


@dataclass
class Record:
    split: str
    kind: str  # one of schema.SAMPLE_KINDS
    source: str
    key: str
    image: Image.Image | None
    text: str | None
    label: int | None
    license: str
    origin: str = ""  # the file or row it came from, for reports ("" -> source/key)

    @property
    def item(self) -> str:
        return self.origin or f"{self.source}/{self.key}"


@dataclass(frozen=True)
class ReportEntry:
    item: str  # a file path relative to the input, or a row ("train[17]", "notes.jsonl:12")
    reason: str  # a key of SKIP_REASONS (skips) or NOTE_KINDS (notes)
    detail: str = ""


@dataclass
class PrepareReport:
    """Everything a build left out (`skipped`) or changed (`notes`), each naming its item."""
    skipped: list[ReportEntry] = field(default_factory=list)
    notes: list[ReportEntry] = field(default_factory=list)

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"PrepareReport.skip: unknown reason {reason!r}; add it to SKIP_REASONS.")
        self.skipped.append(ReportEntry(display_name(item), reason, display_name(detail)))

    def note(self, item: str, kind: str, detail: str = "") -> None:
        if kind not in NOTE_KINDS:
            raise ValueError(f"PrepareReport.note: unknown kind {kind!r}; add it to NOTE_KINDS.")
        self.notes.append(ReportEntry(display_name(item), kind, display_name(detail)))

    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.reason for e in self.skipped).items()))

    def note_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.reason for e in self.notes).items()))

    def summary(self, examples: int = 3) -> str:
        """Human-readable lines: per reason, the count and the first few items."""
        lines = []
        for title, entries in (("skipped", self.skipped), ("changed", self.notes)):
            counts = Counter(e.reason for e in entries)
            lines.append(f"{title}: {sum(counts.values())}" + ("" if counts else " (none)"))
            for reason, n in sorted(counts.items()):
                names = [e.item for e in entries if e.reason == reason][:examples]
                more = f", ... (+{n - len(names)})" if n > len(names) else ""
                lines.append(f"  {reason}: {n}  ({', '.join(names)}{more})")
        return "\n".join(lines)

    def write(self, folder: Path) -> None:
        """`skipped.jsonl` and `notes.jsonl`: one JSON object {item, reason, detail} per line."""
        for name, entries in (("skipped.jsonl", self.skipped), ("notes.jsonl", self.notes)):
            text = "".join(json.dumps(asdict(e), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
            (Path(folder) / name).write_text(text, encoding="utf-8")


class Source(ABC):
    """Where samples come from. Subclasses set `name` and `help` (shown by `prepare --help`),
    validate their options in `__init__` (raising `SourceError`), and yield records in a fixed
    order from `records`, reporting every left-out or changed item."""
    name: ClassVar[str]
    help: ClassVar[str]
    needs_input: ClassVar[bool] = True
    # (validation, test) fractions for samples whose input names no split (set by `make_source`)
    fractions: tuple[float, float] = DEFAULT_FRACTIONS

    @classmethod
    @abstractmethod
    def from_args(cls, args: Any) -> "Source":
        """Build from `prepare`'s parsed options."""

    @abstractmethod
    def records(self, report: PrepareReport) -> Iterator[Record]:
        """Every usable sample, in a fixed order; everything else goes into `report`."""

    def build_info(self) -> dict:
        """Facts about this build for the manifest's `build` entry (input, options, system data used)."""
        return {}

    def split_note(self) -> str | None:
        """After `records`: a line saying how the held-out splits were made when the input did not
        name them (None when every split came from the input itself)."""
        return None


@dataclass(frozen=True)
class Limits:
    """Caps that keep one bad file from costing unbounded memory or time."""
    max_side: int = 256  # images are downscaled to fit (aspect kept)
    max_image_pixels: int = 64 * 1024 * 1024  # width x height from the header; larger files are skipped
    max_caption_bytes: int = 4096  # longer captions are cut at a character boundary
    max_image_bytes: int = 64 << 20  # image files larger than this are skipped from their size, never read

    @classmethod
    def from_args(cls, args: Any) -> "Limits":
        """From `prepare`'s options (a missing option keeps its default)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})

    def __post_init__(self):
        for name in ("max_side", "max_image_pixels", "max_caption_bytes", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise SourceError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")


# -- splits and keys --------------------------------------------------------------------------------
def split_by_index(i: int) -> str:
    """80/10/10 by a fixed index pattern: deterministic and leak-free by construction."""
    return {8: "validation", 9: "test"}.get(i % 10, "train")


def split_by_name(name: str, fractions: tuple[float, float] = DEFAULT_FRACTIONS) -> str:
    """A stable split for a sample from a hash of its name or key (adding samples moves no other):
    `test` with probability fractions[1], `validation` with fractions[0], else `train`. Names that
    are not valid UTF-8 (surrogate-escaped by Python) hash by their exact bytes."""
    validation, test = fractions
    u = int(hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2 ** 32
    return "test" if u < test else "validation" if u < test + validation else "train"


def split_note(fractions: tuple[float, float], why: str) -> str:
    """The line `prepare` prints when it made the held-out splits itself."""
    return (f"splits: validation {fractions[0]:.0%}, test {fractions[1]:.0%} of the samples, by a stable hash of "
            f"each sample's key ({why}); change with --validation-fraction / --test-fraction")


MAX_KEY_CHARS = 90  # a USTAR member name holds 100 bytes: KEY + ".json"
HASHED_KEY_PREFIX = "_z"  # never produced by escaping ('_' is always followed by two hex digits there)


def escape_key(text: str) -> str:
    """Injective, tar- and WebDataset-safe: ASCII letters, digits and '-' stay, every other UTF-8
    byte becomes '_' + two lowercase hex digits (so no '.', '/' or space survives)."""
    return "".join(chr(b) if (chr(b).isascii() and chr(b).isalnum()) or b == 0x2D else f"_{b:02x}"
                   for b in text.encode("utf-8", "surrogateescape"))


def sample_key(name: str) -> str:
    """The sample key of a relative path (or "path:line"): `escape_key` when it fits in
    `MAX_KEY_CHARS`, else `_z` + its SHA-256, a form escaping can never produce."""
    key = escape_key(name)
    if len(key) <= MAX_KEY_CHARS:
        return key
    return HASHED_KEY_PREFIX + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()


# -- captions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caption:
    text: str
    encoding: str  # "utf-8" or the fallback used
    cut_from: int | None  # bytes before the cut, when it was cut


def decode_caption(data: bytes, max_bytes: int, total_bytes: int | None = None) -> Caption:
    """Bytes -> stripped text: UTF-8 (a BOM dropped); UTF-16 when a UTF-16 BOM says so; else
    cp1252, else latin-1 (which decodes anything). Text over `max_bytes` UTF-8 bytes is cut at a
    character boundary. `total_bytes`: the file's size when the caller read only a bounded prefix."""
    partial = total_bytes is not None and total_bytes > len(data)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text, encoding = data.decode("utf-16", errors="ignore" if partial else "replace"), "utf-16"
    else:
        try:  # final=False when the read was bounded: a character cut at the end is dropped, not an error
            text, encoding = codecs.getincrementaldecoder("utf-8")().decode(
                data.removeprefix(codecs.BOM_UTF8), final=not partial), "utf-8"
        except UnicodeDecodeError:
            try:
                text, encoding = data.decode("cp1252"), "cp1252"
            except UnicodeDecodeError:  # cp1252 leaves 5 bytes undefined
                text, encoding = data.decode("latin-1"), "latin-1"
    text = text.strip()
    raw = text.encode("utf-8")
    cut_from = total_bytes if partial else None
    if len(raw) > max_bytes:
        cut_from = cut_from or len(raw)
        text = raw[:max_bytes].decode("utf-8", errors="ignore").strip()
    return Caption(text, encoding, cut_from)


def read_bounded(stream: BinaryIO, max_bytes: int) -> tuple[bytes, bool]:
    """Up to `max_bytes` plus a little (room to finish a character); True if there was more."""
    data = stream.read(max_bytes + 8)
    return data, bool(stream.read(1))


class ImageProblem(Exception):
    """Why an image (or a caption cell) cannot be used: `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


CAPTION_SELECT = ("first", "all")  # --caption-select: what a list of captions gives


def caption_cells(value: Any, column: str, select: str | None) -> list[str]:
    """The caption(s) a cell holds, before decoding: [text] for a string; for a list of strings
    (COCO/Flickr `sentences`), its first non-empty one (`select="first"`) or every one (`"all"`).
    Raises ImageProblem: `no_caption` (null, empty list), `bad_text` (not a string, or a list
    without `select`: the detail names --caption-select)."""
    if value is None:
        raise ImageProblem("no_caption", f"{column!r} is empty (null)")
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        if select is None:
            raise ImageProblem("bad_text", f"{column!r} holds a list of {len(value)} captions; pass --caption-select "
                                           "first (its first caption) or all (one sample per caption)")
        if not all(isinstance(v, str) for v in value):
            kinds = sorted({type(v).__name__ for v in value if not isinstance(v, str)})
            raise ImageProblem("bad_text", f"{column!r} holds a list with {kinds} items, not only strings")
        texts = [v for v in value if v.strip()]
        if not texts:
            raise ImageProblem("no_caption", f"{column!r} holds no non-empty caption")
        return texts[:1] if select == "first" else texts
    raise ImageProblem("bad_text", f"{column!r} holds a {type(value).__name__}, not a string")


# -- images -----------------------------------------------------------------------------------------


IMAGE_SIGNATURES = (PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(data: bytes) -> bool:
    """Starts with the signature of an image format (PNG, JPEG, GIF, BMP, TIFF, WebP)."""
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_8bit(image: Image.Image) -> Image.Image:
    """8-bit grayscale or RGB: what PNG shards hold and the processor expects."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit gray: scale the actual range to 0..255
        x = np.asarray(image, dtype=np.float64)
        lo, hi = float(x.min()), float(x.max())
        return Image.fromarray(((x - lo) * (255.0 / (hi - lo if hi > lo else 1.0))).round().astype(np.uint8))
    return image.convert("L" if image.mode in ("1", "LA") else "RGB")


def flatten_to_8bit(image: Image.Image) -> Image.Image:
    """Like `to_8bit`, but transparent pixels are composited over white (not their hidden colour)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return flat.convert("L") if image.mode in ("LA", "La") else flat
    return to_8bit(image)


@dataclass
class LoadedImage:
    image: Image.Image  # 8-bit L or RGB, downscaled to fit max_side
    original_mode: str
    original_size: tuple[int, int]
    pixel_digest: str  # of the full-size converted pixels: equal digests are true duplicates


def load_image(data: bytes, limits: Limits) -> LoadedImage:
    """Decode image bytes under `limits`; raises `ImageProblem` with a SKIP_REASONS reason.

    Order: identify from the header, check width x height against the cap (nothing decoded
    yet), verify PNG chunk CRCs, decode strictly (truncation is an error), apply the EXIF
    orientation, convert to 8-bit, downscale to `max_side`."""
    with strict_decoding():
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageProblem("too_many_pixels", str(e)[:160]) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            # an image's signature with a header PIL cannot read is a damaged image, not a non-image
            if looks_like_image(data):
                raise ImageProblem("corrupt_image", f"unreadable header: {type(e).__name__}: {e}"[:160]) from None
            raise ImageProblem("not_an_image", f"no known image format ({len(data)} bytes, starting {data[:8]!r})"
                               if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"[:160]) from None
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ImageProblem("too_many_pixels", f"{width}x{height} = {width * height} pixels > "
                                                  f"--max-image-pixels {limits.max_image_pixels}")
        try:
            if data.startswith(PNG_SIGNATURE):  # PIL skips most CRCs: a cut PNG would decode part-black
                check_png_chunks(data)
            mode = image.mode
            image.load()
            image = ImageOps.exif_transpose(image)
            converted = flatten_to_8bit(image)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for damaged data
            raise ImageProblem("corrupt_image", f"{type(e).__name__}: {e}"[:160]) from None
    digest = hashlib.sha1(f"{converted.mode}{converted.size}".encode() + converted.tobytes()).hexdigest()
    if max(converted.size) > limits.max_side:
        converted = converted.copy()
        converted.thumbnail((limits.max_side, limits.max_side), Image.BICUBIC)
    return LoadedImage(converted, mode, (width, height), digest)


def read_image_file(path: Path, limits: Limits) -> LoadedImage:
    """Load an image file under `limits`, its size bounded before any byte is read: not a regular
    file (FIFO, device) -> `special_file`, never opened; larger than `max_image_bytes` (from stat)
    -> `image_too_large`; and no more than the cap is read, so a file growing meanwhile is caught
    too. Raises ImageProblem, or OSError when the file cannot be read."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ImageProblem("special_file", "not a regular file: never opened")
    cap = limits.max_image_bytes
    if info.st_size > cap:
        raise ImageProblem("image_too_large", f"{info.st_size} bytes > --max-image-bytes {cap}")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ImageProblem("image_too_large", f"over --max-image-bytes {cap} (the file grew while read)")
    return load_image(data, limits)
