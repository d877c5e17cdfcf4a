"""`mmoe-ds prepare`: write WebDataset shards, a trained tokenizer and the processor.

Output (built in a temp dir beside OUT, then renamed into place: an error leaves nothing half-written):
  OUT/{train,validation,test}/<source>-<kind>-NNNNNN.tar   one kind per shard
  OUT/processor/      byte-level BPE tokenizer (trained on the train split) + processor_config.json
  OUT/manifest.json   shards (split, source, kind, samples, sha256), counts, class names, build facts,
                      and the counts of the prepare report (`report`: skipped and changed, per reason)
  OUT/skipped.jsonl   every file or row left out: {"item", "reason", "detail"} per line
  OUT/notes.jsonl     every file or row changed but kept (mode converted, caption cut or re-decoded)
A summary of the report is printed. Every error is one line naming the problem and the fix.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import textwrap
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..atomic import staged_directory
from .captions import CLASS_NAMES, TEMPLATES
from .schema import SAMPLE_KINDS, SPLITS
from .shards import ShardWriter, png_bytes
from .sources import Limits, PrepareReport, Record, SourceError
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
    """Keep each content in one split only (test first, then validation), so no split leaks into
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_files(r: Record) -> dict[str, bytes]:
    meta = {"modality": r.kind, "source": r.source, "label": r.label, "license": r.license}
    files = {"json": json.dumps(meta, sort_keys=True).encode()}
    if r.image is not None:
        files["png"] = png_bytes(r.image)
    if r.text is not None:
        files["txt"] = r.text.encode("utf-8")
    return files


def _write_shards(records: list[Record], root: Path, samples_per_shard: int, seed: int) -> dict[str, dict]:
    """One shard series per (split, source, kind), samples in a seeded order. Returns shard infos."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.split, r.source, r.kind)].append(r)
    shards = {}
    for (split, source, kind), items in sorted(groups.items()):
        order = np.random.default_rng([seed, zlib.crc32(f"{split}/{source}/{kind}".encode())]).permutation(len(items))
        (root / split).mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(str(root / split / f"{source}-{kind}-%06d.tar"), samples_per_shard)
        for i in order:
            writer.write(items[i].key, _sample_files(items[i]))
        writer.close()
        for path, count in zip(writer.paths, writer.counts):
            rel = Path(path).relative_to(root).as_posix()
            shards[rel] = {"split": split, "source": source, "kind": kind, "samples": count,
                           "sha256": sha256(Path(path))}
    return shards


def write_dataset(records: list[Record], out: Path, samples_per_shard: int = 500, seed: int = 0,
                  vocab_size: int = 2048, processor_kwargs: dict | None = None, build: dict | None = None,
                  report: PrepareReport | None = None) -> Path:
    """Shards + processor + manifest (+ the report's skipped.jsonl/notes.jsonl) for `records`,
    swapped into `out` only when complete.

    Args:
        records: the samples; keys must be unique per source.
        out: the output folder (replaced as a whole).
        report: what the sources left out or changed; cross-split duplicates are added to it.
    Returns:
        `out`.
    Raises:
        ValueError: duplicate keys, or no training sample (the message names the skip counts)."""
    from .processor import MmoeProcessor

    check_out(Path(out))
    report = report if report is not None else PrepareReport()
    keys = Counter((r.source, r.key) for r in records)
    if any(n > 1 for n in keys.values()):
        raise ValueError(f"duplicate sample keys: {sorted(k for k, n in keys.items() if n > 1)[:5]}")
    records, duplicates = drop_cross_split_duplicates(records, report)
    if not any(r.split == "train" for r in records):
        skipped = ", ".join(f"{reason} {n}" for reason, n in report.skip_counts().items()) or "nothing skipped"
        raise ValueError(f"no training samples found ({len(records)} usable in other splits; {skipped}); check "
                         "--source/--input and that images have same-named .txt captions.")
    out = Path(out)
    with staged_directory(out, normalize_modes=True) as tmp:  # renamed onto `out` only when complete
        shards = _write_shards(records, tmp, samples_per_shard, seed)
        tokenizer = train_tokenizer([r.text for r in records if r.split == "train" and r.text], vocab_size)
        processor = MmoeProcessor(tokenizer, **(processor_kwargs or {}))
        processor.save_pretrained(tmp / "processor")
        counts = {split: {kind: 0 for kind in SAMPLE_KINDS} for split in SPLITS}
        for info in shards.values():
            counts[info["split"]][info["kind"]] += info["samples"]
        manifest = {"format": "mmoe-ds webdataset v1", "seed": seed, "shards": shards, "counts": counts,
                    "sources": sorted({r.source for r in records}), "classes": CLASS_NAMES,
                    "caption_templates": list(TEMPLATES), "dropped_cross_split_duplicates": dict(duplicates),
                    "processor": processor.to_dict(), "build": build or {},
                    "report": {"skipped": report.skip_counts(), "changed": report.note_counts()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        report.write(tmp)
    return out


def check_out(out: Path) -> None:
    """`out` may be new, empty, or an earlier prepare output (it is replaced): never a user's file or folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder path (it is created).")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
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
    if args.vocab_size < 260:
        return f"--vocab-size {args.vocab_size} is below the 256 byte symbols plus 4 special tokens; use >= 260"
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    parser.add_argument("--text-column", default="text", help="hf: caption column; text: the .jsonl field")
    defaults = Limits()
    parser.add_argument("--max-side", type=_positive, default=defaults.max_side,
                        help="images are stored downscaled to fit this side (aspect kept)")
    parser.add_argument("--max-image-pixels", type=_pixels, default=defaults.max_image_pixels,
                        help="skip images with more pixels (from the header, before decoding); K/M/G suffixes, "
                             "default 64M")
    parser.add_argument("--max-caption-bytes", type=_positive, default=defaults.max_caption_bytes,
                        help="captions/texts are cut to this many UTF-8 bytes (reported)")
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
        records = list(source.records(report))
        build = {"source": source.name, **source.build_info()}
        out = write_dataset(records, Path(args.out), args.samples_per_shard, args.seed, args.vocab_size,
                            processor_kwargs, build, report)
    except (SourceError, ValueError) as e:  # bad input or options: a message, not a traceback
        print(f"mmoe-ds prepare: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system error: unreadable input, --out not writable, disk full
        if e.errno is None:  # not a file-system error (PIL raises OSError too): a bug, keep its traceback
            raise
        print(f"mmoe-ds prepare: {e.filename or args.out}: {e.strerror or e}; check that --input is readable and "
              "--out writable (with free space).", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(report.summary())
    print(f"details: {out / 'skipped.jsonl'}, {out / 'notes.jsonl'}")
    print(json.dumps({"out": str(out), "counts": manifest["counts"], "build": build}))
    return 0
