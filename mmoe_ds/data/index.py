"""`mmoe-ds index`: a manifest for existing WebDataset shards, read where they are, never rewritten.

Takes shards in any layout the reader understands (img2dataset's `KEY.jpg|png|webp` + `KEY.txt` +
`KEY.json` without a modality field, or what `prepare` writes), as local paths, glob or brace
patterns (`shard-{000000..000099}.tar`), `pipe:` commands or fsspec URLs (`https://`, `s3://`...).
A glob's matches that are not tar files (img2dataset's `.parquet` and `_stats.json`) are ignored
and counted; a missing or unreadable shard is an error (exit 2) unless --allow-missing, which
leaves it out of the manifest and lists it. Every shard is read once: samples are counted per
kind (the `.json` modality when there is one, else inferred from the members: image+text,
image-only or text-only), the first captions feed the tokenizer, and sha256 sums are taken on
request.

Output (OUT is created if needed; the shards stay where they are):
  OUT/manifest.json   shards {location: {split, source, kind, kinds, samples, sha256?}}, counts
                      [split][kind], sources, processor, build. A location is a path relative to
                      OUT for shards inside OUT, else the absolute path, URL or pipe command.
                      `kind` is the shard's kind, or "mixed" when it holds several (then `kinds`
                      gives the count of each; the loader's streams filter by kind).
  OUT/processor/      the tokenizer (trained on the first --tokenizer-captions train captions, or
                      --tokenizer PATH) + processor_config.json (image size, patch, channels)
Both are written beside their final name and renamed into place; the manifest last.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..io.atomic import atomic_write_text, staged_directory
from .loader import file_sha256
from .manifest import manifest_path
from .schema import SAMPLE_KINDS, SPLITS
from .shards import iter_raw
from .streams import sample_kind
from .tokenizer import train_tokenizer

HELP = "build a manifest for existing WebDataset shards (local, brace patterns, pipe:, URLs) without rewriting them"


@dataclass
class ShardScan:
    """What one read of a shard found."""
    location: str
    kinds: Counter = field(default_factory=Counter)  # samples per kind
    unclassified: int = 0  # samples whose kind could not be told (bad .json, unknown modality, no members)
    damage: Counter = field(default_factory=Counter)  # reader skips (corrupt_tar: the rest of the shard lost)
    captions: list[str] = field(default_factory=list)
    sha256: str | None = None

    @property
    def samples(self) -> int:
        """Samples of every kind in the shard."""
        return sum(self.kinds.values())


def is_remote(location: str) -> bool:
    """Whether a shard location is a `pipe:` command or a URL (kept as it is in the manifest)."""
    return location.startswith("pipe:") or "://" in location


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_tar_name(name: str) -> bool:
    """Whether a file name ends like a (possibly compressed) tar archive."""
    return name.lower().endswith(TAR_SUFFIXES)


@dataclass
class Expansion:
    """What the patterns name: shard locations, plus what a glob matched that is not a shard
    (img2dataset's `.parquet` / `_stats.json` beside its tars: ignored and counted) and named
    local files that do not exist."""
    locations: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def expand(pattern: str, found: Expansion | None = None) -> list[str]:
    """Shard locations of a pattern: brace expansion, then (local paths) glob; sorted, distinct.
    Local paths become absolute. A glob's matches that are not tar files are ignored (recorded in
    `found.ignored`); a named file that does not exist, or a local pattern matching nothing, is an
    error, or recorded in `found.missing` when `found` is given (--allow-missing)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        if is_remote(item):
            out.append(item)
            continue
        magic = glob.has_magic(item)
        matches = sorted(glob.glob(os.path.expanduser(item))) if magic else [os.path.expanduser(item)]
        if magic and found is not None:
            found.ignored.extend(os.path.abspath(m) for m in matches if os.path.isfile(m) and not is_tar_name(m))
            matches = [m for m in matches if not os.path.isfile(m) or is_tar_name(m)]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            if found is None:
                raise ValueError(f"no shard file {missing[0] if missing else item!r} (from pattern {pattern!r}); "
                                 "check the path, or quote the pattern so the shell does not expand it.")
            found.missing.extend(os.path.abspath(m) for m in missing or [item])
        out.extend(os.path.abspath(m) for m in matches if os.path.isfile(m))
    return sorted(set(out), key=out.index)


def source_name(pattern: str) -> str:
    """A source name from a pattern: its file name up to the first brace, glob or digit run
    (`/data/cc3m-{000..009}.tar` -> "cc3m"), else the folder's name, else "shards"."""
    body = pattern.split(" ")[-1] if pattern.startswith("pipe:") else pattern
    body = body.split("?", 1)[0].rstrip("/")
    parent, _, base = body.rpartition("/")
    stem = re.split(r"[{*?\[]|\d{2,}|\.tar|\.tgz", base, maxsplit=1)[0].strip("-_.")
    if not stem:
        stem = parent.rpartition("/")[2]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.")
    return stem or "shards"


def hash_split(location: str, validation: float, test: float) -> str:
    """A stable split for a shard from its file name alone (the same wherever it is served from)."""
    name = location.rstrip("/").rpartition("/")[2]
    u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2 ** 32
    return "test" if u < test else "validation" if u < test + validation else "train"


def scan_shard(location: str, want_captions: int, max_caption_bytes: int, sha256: bool) -> ShardScan:
    """Read one shard through the shard opener: counts per kind, the first captions, damage."""
    scan = ShardScan(location)
    for _, files in iter_raw(location, scan.damage):
        kind = sample_kind(files)
        if kind is None:
            scan.unclassified += 1
            continue
        scan.kinds[kind] += 1
        if len(scan.captions) < want_captions and kind in ("image_text", "text"):
            text = files.get("txt", b"")[:max_caption_bytes].decode("utf-8", "ignore").strip()
            if text:
                scan.captions.append(text)
    if sha256:
        scan.sha256 = file_sha256(location)
    return scan


def manifest_key(location: str, out: Path) -> str:
    """Relative to OUT for a local shard inside it (the dataset folder stays movable), else as is."""
    if is_remote(location):
        return location
    try:
        return Path(location).relative_to(out.resolve()).as_posix()
    except ValueError:
        return location


def write_atomically(out: Path, processor, manifest: dict) -> None:
    """processor/ then manifest.json (the commit point), each staged beside its final name and
    renamed into place, with the modes a plain write gives; the shards in OUT are never touched."""
    with staged_directory(out / "processor", normalize_modes=True) as staged:
        processor.save_pretrained(staged)
    atomic_write_text(manifest_path(out), json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The `mmoe-ds index` command line."""
    parser = argparse.ArgumentParser(prog="mmoe-ds index", description=HELP,
                                     epilog="example: mmoe-ds index --train 'data/cc/{00000..00099}.tar' "
                                            "--validation 'data/cc/{00100..00101}.tar' --out data/cc-index")
    for split in SPLITS:
        parser.add_argument(f"--{split}", action="append", default=[], metavar="PATTERN",
                            help=f"shards of the {split} split (repeatable): path, glob, brace pattern, pipe:CMD "
                                 "or URL")
    parser.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                        help="shards split by a stable hash of their file names (see --validation-fraction, "
                             "--test-fraction); repeatable")
    parser.add_argument("--validation-fraction", type=float, default=0.0, help="with --shards (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="with --shards (default 0)")
    parser.add_argument("--source", help="source name for every shard (default: from each pattern's file name)")
    parser.add_argument("--out", required=True, help="dataset folder for manifest.json and processor/")
    parser.add_argument("--sha256", choices=["auto", "on", "off"], default="auto",
                        help="record each shard's sha256 (an extra read): auto = local files only (default)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="a saved tokenizer (e.g. another dataset's processor/) instead of training one")
    parser.add_argument("--tokenizer-captions", type=int, default=10000,
                        help="train the tokenizer on the first N train captions (default 10000)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per sequence, image positions included (default: image patches + 64)")
    parser.add_argument("--max-caption-bytes", type=int, default=65536,
                        help="captions read for the tokenizer are cut here")
    parser.add_argument("--workers", type=int, default=4, help="shards read at once (threads; helps remote data)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="index the shards that are there: missing or unreadable shards (a 404, a failing pipe) "
                             "are left out of the manifest and listed, instead of an error (exit 2)")
    args = parser.parse_args(argv)
    if not any(getattr(args, s) for s in SPLITS) and not args.shards:
        parser.error("give shards: --train PATTERN (and --validation/--test), or --shards PATTERN")
    fractions = (args.validation_fraction, args.test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        parser.error("--validation-fraction and --test-fraction must lie in [0, 1) and add up to less than 1")
    if args.tokenizer_captions < 1 or args.workers < 1 or args.max_caption_bytes < 1:
        parser.error("--tokenizer-captions, --workers and --max-caption-bytes must be >= 1")
    return args


def plan(args: argparse.Namespace, found: Expansion | None = None) -> dict[str, tuple[str, str]]:
    """location -> (split, source) for every shard named on the command line; non-tar files a glob
    matched, and (with --allow-missing) missing files, go into `found`."""
    planned: dict[str, tuple[str, str]] = {}
    found = found if found is not None else Expansion()
    named = [(split, p) for split in SPLITS for p in getattr(args, split)] + [(None, p) for p in args.shards]
    for split, pattern in named:
        source = args.source or source_name(pattern)
        missing_before = len(found.missing)
        locations = expand(pattern, found)
        if len(found.missing) > missing_before and not args.allow_missing:
            raise ValueError(f"no shard file {found.missing[missing_before]!r} (from pattern {pattern!r}); check the "
                             "path, or quote the pattern so the shell does not expand it (--allow-missing indexes "
                             "the shards that are there).")
        for location in locations:
            target = split or hash_split(location, args.validation_fraction, args.test_fraction)
            if location in planned and planned[location][0] != target:
                raise ValueError(f"shard {location} is listed for both {planned[location][0]} and {target}; give each "
                                 "shard one split.")
            planned[location] = (target, source)
    return planned


def build_manifest(args: argparse.Namespace, planned: dict[str, tuple[str, str]], scans: list[ShardScan],
                   out: Path, processor, tokenizer_note: dict) -> dict:
    """The manifest of the scanned shards (`data/manifest.py` reads it): per shard its split,
    source, samples per kind, damage and sha256; counts per split and kind; how it was built."""
    shards, counts = {}, {split: {kind: 0 for kind in SAMPLE_KINDS} for split in SPLITS}
    for scan in scans:
        split, source = planned[scan.location]
        kinds = {kind: scan.kinds[kind] for kind in SAMPLE_KINDS if scan.kinds[kind]}
        info = {"split": split, "source": source, "samples": scan.samples, "kinds": kinds,
                "kind": next(iter(kinds)) if len(kinds) == 1 else ("mixed" if kinds else "none")}
        if scan.unclassified:
            info["unclassified"] = scan.unclassified
        if scan.damage:
            info["damage"] = dict(scan.damage)
        if scan.sha256:
            info["sha256"] = scan.sha256
        shards[manifest_key(scan.location, out)] = info
        for kind, n in kinds.items():
            counts[split][kind] += n
    build = {"command": "index", "inputs": {split: getattr(args, split) for split in SPLITS if getattr(args, split)},
             "tokenizer": tokenizer_note, "in_place": True}
    if args.shards:
        build["inputs"]["hashed"] = {"patterns": args.shards, "validation_fraction": args.validation_fraction,
                                     "test_fraction": args.test_fraction}
    return {"format": "mmoe-ds webdataset v1", "shards": shards, "counts": counts,
            "sources": sorted({source for _, source in planned.values()}), "classes": {},
            "processor": processor.to_dict(), "build": build}


def make_processor(args: argparse.Namespace, captions: list[str]):
    """The dataset's processor: with the tokenizer of --tokenizer, or one trained on `captions`."""
    from transformers import PreTrainedTokenizerFast

    from .processor import MmoeProcessor

    if args.tokenizer:
        if not (Path(args.tokenizer) / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {args.tokenizer}: no tokenizer.json there; give a folder with a saved fast "
                             "tokenizer (e.g. another dataset's processor/), or leave --tokenizer out to train one.")
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
        except Exception as e:  # transformers raises many types for unusable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--tokenizer {args.tokenizer}: cannot load it ({first}); give a folder saved by "
                             "save_pretrained, or leave --tokenizer out to train one.") from None
        note = {"path": str(args.tokenizer)}
    else:
        if not captions:
            raise ValueError("the train shards hold no caption or text to train a tokenizer on; pass --tokenizer PATH.")
        tokenizer = train_tokenizer(captions, args.vocab_size)
        note = {"trained_on_captions": len(captions), "vocab_size": args.vocab_size}
    num_patches = (args.image_size // max(args.patch_size, 1)) ** 2
    max_length = args.max_length or num_patches + 64
    processor = MmoeProcessor(tokenizer, image_size=args.image_size, patch_size=args.patch_size,
                              num_channels=args.channels, max_length=max_length)
    return processor, note


def main(argv: list[str]) -> int:
    """Index existing shards in place.

    Args:
        argv: command-line arguments (see `mmoe-ds index --help`).

    Returns:
        0 on success (a JSON summary on stdout), 2 on bad input (one line on stderr).
    """
    args = parse_args(argv)
    out = Path(args.out)
    try:
        found = Expansion()
        planned = plan(args, found)
        locations = list(planned)

        def scan(location: str) -> ShardScan:
            wants = args.tokenizer_captions if planned[location][0] == "train" and not args.tokenizer else 0
            sha = args.sha256 == "on" or (args.sha256 == "auto" and not is_remote(location))
            return scan_shard(location, wants, args.max_caption_bytes, sha)

        if not locations:
            raise ValueError(f"no shard found ({len(found.ignored)} non-tar files ignored, {len(found.missing)} "
                             "missing); check the patterns.")
        with ThreadPoolExecutor(max_workers=min(args.workers, len(locations))) as pool:
            scans = list(pool.map(scan, locations))
        unreadable = [s for s in scans if s.damage.get("unreadable_shard")]
        if unreadable and not args.allow_missing:
            raise ValueError(f"{len(unreadable)} shard(s) cannot be read, first {unreadable[0].location} (missing, a "
                             "404, a failing pipe: see above); fix the location, or pass --allow-missing to index the "
                             "others.")
        found.missing.extend(s.location for s in unreadable)
        scans = [s for s in scans if not s.damage.get("unreadable_shard")]
        if not any(s.samples for s in scans if planned[s.location][0] == "train"):
            raise ValueError("the train shards hold no readable sample; check the patterns (and the damage report "
                             "on stderr).")
        captions = [c for s in scans for c in s.captions][:args.tokenizer_captions]
        processor, tokenizer_note = make_processor(args, captions)
        manifest = build_manifest(args, planned, scans, out, processor, tokenizer_note)
        manifest["build"].update(ignored_files=len(found.ignored), missing_shards=found.missing)
        write_atomically(out, processor, manifest)
    except (ValueError, OSError) as e:  # bad input or options: a message, not a traceback
        print(f"mmoe-ds index: {e}", file=sys.stderr)
        return 2
    for s in scans:
        if s.damage or s.unclassified:
            print(f"mmoe-ds index: shard {s.location}: {s.samples} samples indexed; damage {dict(s.damage)}, "
                  f"{s.unclassified} samples of unknown kind left out", file=sys.stderr)
    if found.ignored:
        print(f"mmoe-ds index: {len(found.ignored)} files that are not tar shards ignored (e.g. "
              f"{', '.join(Path(f).name for f in found.ignored[:3])})", file=sys.stderr)
    if found.missing:
        print(f"mmoe-ds index: {len(found.missing)} missing or unreadable shards left out (--allow-missing): "
              f"{', '.join(found.missing[:3])}{', ...' if len(found.missing) > 3 else ''}", file=sys.stderr)
    if not any(any(counts.values()) for split, counts in manifest["counts"].items() if split != "train"):
        print("mmoe-ds index: note: only a train split; evaluation has nothing held out. Name held-out shards with "
              "--validation/--test PATTERN, or pass --shards PATTERN with --validation-fraction/--test-fraction "
              "(a stable hash of the shard names).", file=sys.stderr)
    print(json.dumps({"out": str(out), "shards": len(scans), "counts": manifest["counts"],
                      "damaged_shards": sum(1 for s in scans if s.damage), "ignored_files": len(found.ignored),
                      "missing_shards": len(found.missing)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
