"""`mmoe-ds prepare`: write WebDataset shards, a trained tokenizer and the processor.

Output (built in a temp dir beside OUT, then renamed into place: an error leaves nothing half-written):
  OUT/{train,validation,test}/<n>-<kind>-<source>-NNNNNN.tar   one kind per shard; image+text shards
                      first (n: the kind's number), so HF's webdataset builder sees every column
  OUT/processor/      byte-level BPE tokenizer (trained on the train split) + processor_config.json
  OUT/manifest.json   shards (split, source, kind, samples, sha256), counts, class names, build facts,
                      and the counts of the prepare report (`report`: skipped and changed, per reason)
  OUT/skipped.jsonl   every file or row left out: {"item", "reason", "detail"} per line
  OUT/notes.jsonl     every file or row changed but kept (mode converted, caption cut or re-decoded)
A summary of the report is printed. Every error is one line naming the problem and the fix.
Samples are written as they are read (spooled to disk, then shuffled into shards): memory does not
grow with the images. Inputs without held-out splits get them by a stable hash of each sample's
key (--validation-fraction / --test-fraction), with a note.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import textwrap
import zlib
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..io.atomic import staged_directory
from .captions import CLASS_NAMES, TEMPLATES
from .manifest import has_manifest, manifest_path, read_manifest
from .schema import SAMPLE_KINDS, SPLITS
from .shards import ShardWriter, png_bytes
from .sources import Limits, PrepareReport, Record, SourceError
from .sources.base import CAPTION_SELECT, DEFAULT_FRACTIONS, display_name
from .sources.bundled import EMOJI_DEFAULT_SIZE, EXTRAS
from .sources.registry import SOURCES, make_source
from .tokenizer import train_tokenizer

SPLIT_PRIORITY = {"test": 0, "validation": 1, "train": 2}  # a duplicate stays in the first of these


def content_key(record: Record) -> str:
    """What makes two samples the same for leakage: the pixels if there is an image, else the text."""
    if record.image is not None:
        im = record.image
        return "img:" + hashlib.sha1(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()
    return "txt:" + " ".join(record.text.split()).casefold()


def drop_cross_split_duplicates(records: list[Record],
                               report: PrepareReport | None = None) -> tuple[list[Record], Counter]:
    """The rule `_Spooler.kept` applies while streaming, on a list (its reference in the tests):
    each content stays in one split only (test first, then validation), so no split leaks into
    another; duplicates within a split (one image, several captions) are kept. Each dropped
    record is named in `report` (reason `cross_split_duplicate`)."""
    owner: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: SPLIT_PRIORITY[r.split]):  # stable: source order within a split
        owner.setdefault(content_key(r), r)
    kept, dropped = [], Counter()
    for r in records:
        first = owner[content_key(r)]
        if first.split == r.split:
            kept.append(r)
            continue
        dropped[r.split] += 1
        if report is not None:
            report.skip(r.item, "cross_split_duplicate", f"same content as {first.item} in {first.split}")
    return kept, dropped


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sample_files(r: Record) -> dict[str, bytes]:
    """The members of one sample. The `.json` keeps where it came from (`origin`: the input file or row)."""
    meta = {"modality": r.kind, "source": r.source, "label": r.label, "license": r.license,
            "origin": display_name(r.item)}
    files = {"json": json.dumps(meta, sort_keys=True).encode()}
    if r.image is not None:
        files["png"] = png_bytes(r.image)
    if r.text is not None:
        files["txt"] = r.text.encode("utf-8")
    return files


class _Spool:
    """The encoded samples of one shard series, on disk in arrival order (a sample is read back by
    its index), so that `prepare` holds no sample in memory: only a few integers per sample."""

    def __init__(self, path: Path):
        self.file = open(path, "w+b")
        self.offsets: array = array("q")

    def add(self, key: str, files: dict[str, bytes]) -> None:
        self.file.seek(0, os.SEEK_END)
        self.offsets.append(self.file.tell())
        parts = [key.encode()] + [x for ext, data in sorted(files.items()) for x in (ext.encode(), data)]
        self.file.write(struct.pack("<I", len(parts)) + b"".join(struct.pack("<Q", len(x)) + x for x in parts))

    def get(self, i: int) -> tuple[str, dict[str, bytes]]:
        self.file.seek(self.offsets[i])
        parts = []
        for _ in range(struct.unpack("<I", self.file.read(4))[0]):
            parts.append(self.file.read(struct.unpack("<Q", self.file.read(8))[0]))
        return parts[0].decode(), {parts[j].decode(): parts[j + 1] for j in range(1, len(parts), 2)}

    def __len__(self) -> int:
        return len(self.offsets)


class _Spooler:
    """Takes records as a source yields them: each is encoded at once into its series' spool, and
    only (content digest, split, series, index) is kept for the cross-split check and the shuffle."""

    def __init__(self, folder: Path):
        self.folder, self.series, self.numbers = folder, {}, {}
        folder.mkdir()
        self.content, self.priority = array("Q"), array("b")  # per sample, in arrival order
        self.where: array = array("q")  # series number * 2**32 + index in the series
        self.keys: array = array("Q")  # digest of (source, key): duplicates are a bug of the source
        self.train_texts: list[str] = []  # what the tokenizer trains on (text only, no pixels)

    def add(self, r: Record) -> None:
        name = (r.split, r.source, r.kind)
        if name not in self.series:
            self.numbers[name] = len(self.series)
            self.series[name] = _Spool(self.folder / f"{len(self.series)}.bin")
        spool = self.series[name]
        self.content.append(_digest64(content_key(r)))
        self.priority.append(SPLIT_PRIORITY[r.split])
        self.where.append(self.numbers[name] * 2 ** 32 + len(spool))
        self.keys.append(_digest64(f"{r.source}/{r.key}"))
        spool.add(r.key, _sample_files(r))
        if r.split == "train" and r.text:
            self.train_texts.append(r.text)

    def check_keys(self) -> None:
        keys = np.frombuffer(self.keys, dtype=np.uint64)
        unique, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate sample keys: {int((counts > 1).sum())} keys are used twice (a source bug)")

    def kept(self, report: PrepareReport) -> tuple[np.ndarray, Counter]:
        """A keep flag per sample: each content stays in one split only (test first, then
        validation), duplicates within a split are kept; every dropped sample is reported."""
        content = np.frombuffer(self.content, dtype=np.uint64)
        priority = np.frombuffer(self.priority, dtype=np.int8)
        order = np.lexsort((np.arange(len(content)), priority, content))  # by content, best split, arrival
        first = np.ones(len(order), dtype=bool)
        first[1:] = content[order][1:] != content[order][:-1]
        owner = np.empty(len(content), dtype=np.int64)
        owner[order] = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        owner = order[owner]  # the first sample of each content's best split
        keep = priority == priority[owner]
        dropped: Counter = Counter()
        for i in np.flatnonzero(~keep):
            split = self._split(int(i))
            dropped[split] += 1
            o = int(owner[i])
            report.skip(self._origin(int(i)), "cross_split_duplicate",
                        f"same content as {self._origin(o)} in {self._split(o)}")
        return keep, dropped

    def train_samples(self, keep: np.ndarray) -> int:
        return int((keep & (np.frombuffer(self.priority, dtype=np.int8) == SPLIT_PRIORITY["train"])).sum())

    def _entry(self, i: int) -> tuple[tuple[str, str, str], int]:
        series, index = divmod(self.where[i], 2 ** 32)
        return list(self.series)[series], index

    def _split(self, i: int) -> str:
        return self._entry(i)[0][0]

    def _origin(self, i: int) -> str:
        name, index = self._entry(i)
        return json.loads(self.series[name].get(index)[1]["json"])["origin"]

    def write_shards(self, root: Path, keep: np.ndarray, samples_per_shard: int, seed: int) -> dict[str, dict]:
        """One shard series per (split, source, kind), the kept samples in a seeded order (the same
        order for the same input, whatever the buffer). Returns shard infos."""
        where = np.frombuffer(self.where, dtype=np.int64)
        shards = {}
        for (split, source, kind) in sorted(self.series):
            spool = self.series[(split, source, kind)]
            mine = (where >> 32) == self.numbers[(split, source, kind)]
            items = where[mine & keep] & (2 ** 32 - 1)  # kept samples of this series, in arrival order
            if not len(items):
                continue
            order = np.random.default_rng([seed, zlib.crc32(f"{split}/{source}/{kind}".encode())]).permutation(
                len(items))
            (root / split).mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(str(root / split / shard_pattern(source, kind)), samples_per_shard)
            for i in order:
                writer.write(*spool.get(int(items[i])))
            writer.close()
            spool.file.close()
            for path, count in zip(writer.paths, writer.counts):
                rel = Path(path).relative_to(root).as_posix()
                shards[rel] = {"split": split, "source": source, "kind": kind, "samples": count,
                               "sha256": sha256(Path(path))}
        return shards


def shard_pattern(source: str, kind: str) -> str:
    """`<kind number>-<kind>-<source>-NNNNNN.tar`: in every split the image+text shards sort first
    (kind numbers follow schema.SAMPLE_KINDS), so a reader that infers columns from the first shard
    (Hugging Face's `webdataset` builder) sees png, txt and json, and loses no caption."""
    return f"{SAMPLE_KINDS.index(kind)}-{kind}-{source}-%06d.tar"


def write_dataset(records: Iterable[Record], out: Path, samples_per_shard: int = 500, seed: int = 0,
                  vocab_size: int = 2048, processor_kwargs: dict | None = None, build: dict | None = None,
                  report: PrepareReport | None = None, facts: Callable[[], dict] | None = None) -> Path:
    """Shards + processor + manifest (+ the report's skipped.jsonl/notes.jsonl) for `records`,
    swapped into `out` only when complete.

    Records are encoded and spooled to disk as they arrive (an iterator is consumed once): memory
    holds a few integers per sample and the train texts (for the tokenizer), not the samples.

    Args:
        records: the samples (any iterable, e.g. a source's generator); keys must be unique per source.
        out: the output folder (replaced as a whole).
        report: what the sources left out or changed; cross-split duplicates are added to it.
        facts: called once the records are read: more `build` entries (the source's facts, and
            `splits`: how the held-out splits were made when the input named none).
    Returns:
        `out`.
    Raises:
        ValueError: duplicate keys, or no training sample (the message names the skip counts)."""
    from .processor import MmoeProcessor

    check_out(Path(out))
    report = report if report is not None else PrepareReport()
    out = Path(out)
    with staged_directory(out, normalize_modes=True) as tmp:  # renamed onto `out` only when complete
        spooler = _Spooler(tmp / ".spool")
        for r in records:
            spooler.add(r)
        spooler.check_keys()
        build = dict(build or {}, **(facts() if facts is not None else {}))
        keep, duplicates = spooler.kept(report)
        if not spooler.train_samples(keep):
            skipped = ", ".join(f"{reason} {n}" for reason, n in report.skip_counts().items()) or "nothing skipped"
            raise ValueError(f"no training samples found ({int(keep.sum())} usable in other splits; {skipped}); "
                             "check --source/--input: --source folder needs images with same-named .txt captions "
                             "or a metadata.jsonl/.csv (file_name + text); data files and datasets: --source hf.")
        shards = spooler.write_shards(tmp, keep, samples_per_shard, seed)
        shutil.rmtree(tmp / ".spool")
        tokenizer = train_tokenizer(spooler.train_texts, vocab_size)
        processor = MmoeProcessor(tokenizer, **(processor_kwargs or {}))
        processor.save_pretrained(tmp / "processor")
        counts = {split: {kind: 0 for kind in SAMPLE_KINDS} for split in SPLITS}
        for info in shards.values():
            counts[info["split"]][info["kind"]] += info["samples"]
        manifest = {"format": "mmoe-ds webdataset v1", "seed": seed, "shards": shards, "counts": counts,
                    "sources": sorted({info["source"] for info in shards.values()}), "classes": CLASS_NAMES,
                    "caption_templates": list(TEMPLATES), "dropped_cross_split_duplicates": dict(duplicates),
                    "processor": processor.to_dict(), "build": build or {},
                    "report": {"skipped": report.skip_counts(), "changed": report.note_counts()}}
        manifest_path(tmp).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        report.write(tmp)
    return out


def source_facts(source) -> dict:
    """The manifest's `build` entries a source knows once its records are read."""
    note = source.split_note()
    return {**source.build_info(), **({"splits": note} if note else {})}


def check_out(out: Path) -> None:
    """`out` may be new, empty, or an earlier prepare output (it is replaced): never a user's file or folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder path (it is created).")
    if out.is_dir() and any(out.iterdir()) and not has_manifest(out):
        raise ValueError(f"--out {out} is a non-empty folder that is not a prepared dataset (no manifest.json); it "
                         "would be replaced: pass a new folder.")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must lie in [0, 1)")
    return value


def _pixels(text: str) -> int:
    """An integer, or with a K/M/G suffix (powers of 1024): 64M."""
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return _positive(text[:-1] if factor > 1 else text) * factor


def _sources_help() -> str:
    return "\n".join(textwrap.fill(cls.help, 100, break_on_hyphens=False, initial_indent=f"  {name:<9} ",
                                   subsequent_indent=" " * 12) for name, cls in SOURCES.items())


def check_options(args: argparse.Namespace) -> str | None:
    """The first problem with the processor options, named with the flag to change, or None."""
    if args.image_size % args.patch_size:
        return (f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}; use e.g. "
                f"--image-size {max(1, args.image_size // args.patch_size) * args.patch_size}")
    patches = (args.image_size // args.patch_size) ** 2
    if args.max_length < patches + 3:
        return (f"--max-length {args.max_length} cannot hold {patches} image patches plus <bos>, a token and <eos>; "
                f"use --max-length {patches + 3} or more, or a larger --patch-size")
    if args.validation_fraction + args.test_fraction >= 1:
        return (f"--validation-fraction {args.validation_fraction} and --test-fraction {args.test_fraction} leave no "
                "training sample; keep their sum below 1 (e.g. 0.1 each)")
    if args.vocab_size < 260:
        return f"--vocab-size {args.vocab_size} is below the 256 byte symbols plus 4 special tokens; use >= 260"
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The `mmoe-ds prepare` command line."""
    parser = _OneLineParser(prog="mmoe-ds prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=__doc__.split("\n\n")[0] + "\n\nsources (--source):\n" + _sources_help(),
                            epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--source", choices=list(SOURCES), default="embedded", help="where samples come from (above)")
    parser.add_argument("--input", help="folder / hf: path, data files or glob, hub id / text: file, folder or glob")
    parser.add_argument("--out", default="data/embedded", help="output folder (replaced as a whole when complete)")
    parser.add_argument("--samples-per-shard", type=_positive, default=500)
    parser.add_argument("--seed", type=int, default=0, help="order of samples inside the shards")
    parser.add_argument("--small", action="store_true", help="embedded: a reduced build (tests, quick demos)")
    parser.add_argument("--with", dest="extras", action="append", choices=list(EXTRAS), metavar="PART",
                        help=f"embedded: add an optional part {list(EXTRAS)} (repeatable)")
    parser.add_argument("--emoji-size", type=_positive, default=EMOJI_DEFAULT_SIZE,
                        help="embedded --with emoji / emoji: side of the rendered emoji images")
    parser.add_argument("--vocab-size", type=_positive, default=2048)
    parser.add_argument("--max-length", type=_positive, default=64,
                        help="tokens per sequence, image positions included")
    parser.add_argument("--image-size", type=_positive, default=28, help="side the processor resizes images to")
    parser.add_argument("--patch-size", type=_positive, default=7, help="must divide --image-size")
    parser.add_argument("--channels", type=int, default=1, choices=[1, 3], help="processor: 1 gray, 3 RGB")
    parser.add_argument("--image-column", default="image", help="hf: image column, or 'none' for text only")
    parser.add_argument("--text-column", default="text",
                        help="hf: caption column; text: the .jsonl field; folder: the metadata.jsonl/.csv field")
    parser.add_argument("--caption-select", choices=CAPTION_SELECT, default=None,
                        help="hf / folder metadata: a caption cell holding a list: its first caption, or all (one "
                             "sample per caption, in the row's split)")
    parser.add_argument("--validation-fraction", type=_fraction, default=DEFAULT_FRACTIONS[0],
                        help="samples held out for validation when the input names no validation split (stable hash "
                             "of each sample's key; default 0.1)")
    parser.add_argument("--test-fraction", type=_fraction, default=DEFAULT_FRACTIONS[1],
                        help="the same for the test split (default 0.1)")
    defaults = Limits()
    parser.add_argument("--max-side", type=_positive, default=defaults.max_side,
                        help="images are stored downscaled to fit this side (aspect kept)")
    parser.add_argument("--max-image-pixels", type=_pixels, default=defaults.max_image_pixels,
                        help="skip images with more pixels (from the header, before decoding); K/M/G suffixes, "
                             "default 64M")
    parser.add_argument("--max-caption-bytes", type=_positive, default=defaults.max_caption_bytes,
                        help="captions/texts are cut to this many UTF-8 bytes (reported)")
    parser.add_argument("--max-image-bytes", type=_pixels, default=defaults.max_image_bytes,
                        help="folder / hf image files and cells larger than this are skipped from their size, never "
                             "read; K/M/G suffixes, default 64M")
    args = parser.parse_args(argv)
    problem = check_options(args)
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str]) -> int:
    """`mmoe-ds prepare`. Returns 0, or 2 after a one-line error on stderr (nothing written)."""
    args = parse_args(argv)
    processor_kwargs = dict(image_size=args.image_size, patch_size=args.patch_size, num_channels=args.channels,
                            max_length=args.max_length)
    report = PrepareReport()
    try:
        check_out(Path(args.out))
        source = make_source(args)
        out = write_dataset(source.records(report), Path(args.out), args.samples_per_shard, args.seed,
                            args.vocab_size, processor_kwargs, {"source": source.name}, report,
                            lambda: source_facts(source))
    except (SourceError, ValueError) as e:  # bad input or options: a message, not a traceback
        print(f"mmoe-ds prepare: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system error: unreadable input, --out not writable, disk full
        if e.errno is None:  # not a file-system error (PIL raises OSError too): a bug, keep its traceback
            raise
        print(f"mmoe-ds prepare: {e.filename or args.out}: {e.strerror or e}; check that --input is readable and "
              "--out writable (with free space).", file=sys.stderr)
        return 2
    manifest = read_manifest(out)
    if manifest["build"].get("splits"):
        print(f"note: {manifest['build']['splits']}")
    print(report.summary())
    print(f"details: {out / 'skipped.jsonl'}, {out / 'notes.jsonl'}")
    print(json.dumps({"out": str(out), "counts": manifest["counts"], "build": manifest["build"]}))
    return 0
