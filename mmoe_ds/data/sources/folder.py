"""`--source folder`: images with captions, in any tree of folders: same-named `.txt` files, or
Hugging Face's captioned image folder (`metadata.jsonl` / `metadata.csv` with `file_name` and the
caption in --text-column, default `text`; the file applies to its folder and the folders below).

Pairing: `dir/NAME.<image suffix>` with `dir/NAME.txt` (suffixes case-insensitive), unless a
metadata file captions the image (then a same-named .txt is reported as `ambiguous_caption`).
Choices, each reported by name in the prepare report:
- the tree is read folder by folder (names in sorted order; a folder before its sub-folders), so
  memory holds one folder's names, not the tree's; a sample's key is its relative path escaped
  injectively (`base.sample_key`), so `a b.png`, `a_b.png`, `r0.png` and `r0.jpg` stay 4 samples;
  a name that is not valid UTF-8 keeps its exact bytes in the key and the split, and is shown with
  backslash escapes in the report;
- `r0.png` and `r0.jpg` sharing `r0.txt`: both are samples with that caption (note `shared_caption`);
- a metadata caption that is a list (COCO/Flickr style) needs --caption-select: `first`, or `all`
  (one sample per caption, keyed `PATH/j`: a path no file can have);
- a caption that is not UTF-8 is decoded as UTF-16 (by BOM), else cp1252, else latin-1 (note);
- captions over --max-caption-bytes are cut (note); empty captions are skipped;
- image files over --max-image-bytes are skipped from their size (`stat`), never read; images over
  --max-image-pixels are skipped from their header, before decoding; truncated or damaged images
  are skipped; any PIL mode is converted to 8-bit L or RGB (note) and the image downscaled to fit
  --max-side;
- a second file with the same pixels as an earlier one is skipped as `duplicate_image`;
- images without caption, captions without image, other files and hidden files are skipped;
- symbolic links are followed when their target lies inside --input (note `followed_link`); a
  link leaving it (`link_outside_root`), a link back to a folder being read (`link_loop`) and a
  broken link are skipped; FIFOs, sockets and devices are never opened (`special_file`).
The split of a sample is a stable hash of its relative path (--validation-fraction / --test-fraction;
adding files moves no other file).
"""
from __future__ import annotations

import csv
import json
import os
import stat
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .base import (IMAGE_SUFFIXES, ImageProblem, Limits, PrepareReport, Record, Source, SourceError, caption_cells,
                   decode_caption, read_bounded, read_image_file, sample_key, split_by_name, split_note)
from .text_files import JSONL_OVERHEAD, bounded_lines

CAPTION_SUFFIX = ".txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face's imagefolder captions
LICENSE = "user-provided"
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))


def special_kind(mode: int) -> str:
    return next((name for test, name in SPECIAL_KINDS if test(mode)), "not a regular file")


class FolderSource(Source):
    name = "folder"
    help = ("a folder of images (png, jpg, webp, bmp, gif, tif) with same-named .txt captions or a Hugging Face "
            "metadata.jsonl/.csv (file_name + --text-column), in any sub-folders; problem files are skipped and named "
            "in OUT/skipped.jsonl")

    def __init__(self, folder: str | Path, limits: Limits = Limits(), text_column: str = "text",
                 caption_select: str | None = None):
        """Args:
            folder: the root; every file under it is considered.
            limits: caps on image file bytes (from stat) and pixels (header check before decoding),
                caption bytes and output side.
            text_column: the caption field of metadata.jsonl / metadata.csv.
            caption_select: "first" or "all" for metadata captions that are lists (None: such rows are skipped).
        """
        self.root = Path(folder)
        if not self.root.exists():
            raise SourceError(f"--input {folder}: no such folder; pass the folder that holds your images and .txt "
                              "captions.")
        if not self.root.is_dir():
            raise SourceError(f"--input {folder}: is a file, not a folder; --source folder needs a folder of images "
                              "with same-named .txt captions (for a data file use --source hf).")
        if not any(self.root.iterdir()):
            raise SourceError(f"--input {folder}: the folder is empty; put images with same-named .txt captions in it.")
        self.limits, self.text_column, self.caption_select = limits, text_column, caption_select
        self.real_root = self.root.resolve()

    @classmethod
    def from_args(cls, args: Any) -> "FolderSource":
        return cls(args.input, Limits.from_args(args), getattr(args, "text_column", "text"),
                   getattr(args, "caption_select", None))

    def build_info(self) -> dict:
        return {"input": str(self.root), "limits": asdict(self.limits), "text_column": self.text_column,
                "caption_select": self.caption_select}

    def split_note(self) -> str | None:
        return split_note(self.fractions, "a folder names no split")

    # -- walking -----------------------------------------------------------------------------------
    def _walk(self, report: PrepareReport) -> Iterator[list[str]]:
        """Folder by folder (a folder before its sub-folders), the relative paths of its regular files,
        links inside the root followed; everything else is reported. Never opens a file, and holds
        one folder's listing at a time (plus the sub-folders still to visit above it)."""
        active: set[Path] = set()  # real folders on the current path: a link back to one is a loop

        def visit(folder: Path, rel: str, real: Path, hidden: bool) -> Iterator[list[str]]:
            active.add(real)
            files, folders = [], []
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                report.skip(rel or ".", "unreadable_file", f"a folder that cannot be listed: {e.strerror}")
                entries = []
            for entry in entries:
                item = f"{rel}/{entry.name}" if rel else entry.name
                path, is_hidden = Path(entry.path), hidden or entry.name.startswith(".")
                try:
                    if entry.is_symlink():
                        try:
                            target = path.resolve(strict=True)
                        except (OSError, RuntimeError):  # RuntimeError: a loop of links resolving to each other
                            report.skip(item, "unreadable_file", "a broken link")
                            continue
                        if not target.is_relative_to(self.real_root):
                            report.skip(item, "link_outside_root", f"-> {os.readlink(path)}")
                            continue
                        if target.is_dir() and target in active:
                            report.skip(item, "link_loop", f"-> {os.readlink(path)}, a folder already being read")
                            continue
                        if not is_hidden:
                            report.note(item, "followed_link", f"-> {target.relative_to(self.real_root).as_posix()}")
                    else:
                        target = real / entry.name
                    info = path.stat()  # follows a link (checked above to stay inside the root)
                except OSError as e:
                    report.skip(item, "unreadable_file", f"{type(e).__name__}: {e.strerror}")
                    continue
                if stat.S_ISDIR(info.st_mode):
                    folders.append((path, item, target, is_hidden))
                elif is_hidden:
                    report.skip(item, "hidden_file")
                elif not stat.S_ISREG(info.st_mode):
                    report.skip(item, "special_file", f"{special_kind(info.st_mode)}: never opened")
                else:
                    files.append(item)
            del entries
            yield files
            for sub in folders:
                yield from visit(*sub)
            active.discard(real)

        yield from visit(self.root, "", self.real_root, False)

    def _groups(self, files: list[str], report: PrepareReport) -> dict[str, dict[str, str]]:
        """One folder's files: stem -> {suffix: rel} of usable-looking files (metadata files excepted);
        others go into the report. A file's path is root / rel."""
        groups: dict[str, dict[str, str]] = defaultdict(dict)
        for rel in files:
            pure = PurePosixPath(rel)
            if pure.name in METADATA_FILES:
                continue
            suffix = pure.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != CAPTION_SUFFIX:
                report.skip(rel, "unknown_file_type", f"suffix {pure.suffix or '(none)'!r}")
                continue
            group = groups[pure.stem]
            if suffix == CAPTION_SUFFIX and CAPTION_SUFFIX in group:
                report.skip(rel, "ambiguous_caption", f"{group[CAPTION_SUFFIX]} is the caption of this name")
                continue
            group[CAPTION_SUFFIX if suffix == CAPTION_SUFFIX else pure.suffix] = rel
        return groups

    # -- captions ----------------------------------------------------------------------------------
    def _decoded(self, item: str, raw: bytes, total: int | None, report: PrepareReport) -> str:
        caption = decode_caption(raw, self.limits.max_caption_bytes, total)
        if caption.encoding != "utf-8":
            report.note(item, "caption_not_utf8", f"decoded as {caption.encoding}")
        if caption.cut_from is not None and caption.text:
            report.note(item, "caption_truncated", f"{caption.cut_from} bytes cut to {self.limits.max_caption_bytes}")
        return caption.text

    def _caption(self, rel: str, path: Path, report: PrepareReport) -> str:
        with open(path, "rb") as f:
            data, more = read_bounded(f, self.limits.max_caption_bytes)
        return self._decoded(rel, data, path.stat().st_size if more else None, report)

    def _metadata_rows(self, rel: str, path: Path, report: PrepareReport) -> Iterator[tuple[str, dict]]:
        """(item, row) of a metadata.jsonl / metadata.csv, bad lines reported."""
        if rel.endswith(".csv"):
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f)
                while True:
                    item = f"{rel}:{reader.line_num + 1}"
                    try:
                        row = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as e:
                        report.skip(item, "bad_json", f"a CSV row that cannot be parsed: {e}"[:160])
                        return
                    yield item, row
        cap = self.limits.max_caption_bytes * 6 + JSONL_OVERHEAD
        with open(path, "rb") as f:
            for number, data, length in bounded_lines(f, cap):
                item = f"{rel}:{number}"
                if not data.strip():
                    continue
                if length > len(data):
                    report.skip(item, "line_too_long", f"{length} bytes; raise --max-caption-bytes to read it")
                    continue
                try:
                    row = json.loads(data)
                except ValueError as e:
                    report.skip(item, "bad_json", str(e)[:120])
                    continue
                if not isinstance(row, dict):
                    report.skip(item, "bad_json", f"a JSON {type(row).__name__}, not an object")
                    continue
                yield item, row

    def _read_metadata(self, files: list[str], captions: dict[str, tuple[str, Any]],
                       report: PrepareReport) -> None:
        """Add image path (relative to the root) -> (metadata item, caption cell) to `captions`, from
        the metadata files among one folder's `files` (they apply to it and the folders below)."""
        for rel in files:
            if PurePosixPath(rel).name not in METADATA_FILES:
                continue
            folder = PurePosixPath(rel).parent
            try:
                for item, row in self._metadata_rows(rel, self.root / rel, report):
                    name = row.get("file_name")
                    if not isinstance(name, str) or not name:
                        report.skip(item, "bad_json", "no 'file_name' field")
                        continue
                    if self.text_column not in row:
                        report.skip(item, "no_caption", f"no {self.text_column!r} field (use --text-column)")
                        continue
                    target = os.path.normpath((folder / name).as_posix())
                    if target in captions:
                        report.skip(item, "ambiguous_caption", f"{captions[target][0]} captions {name} already")
                        continue
                    captions[target] = (item, row[self.text_column])
            except OSError as e:
                report.skip(rel, "unreadable_file", f"{type(e).__name__}: {e.strerror}")

    def _cell_captions(self, item: str, cell: Any, report: PrepareReport) -> list[str] | None:
        try:
            texts = caption_cells(cell, self.text_column, self.caption_select)
        except ImageProblem as e:
            report.skip(item, e.reason, e.detail)
            return None
        if isinstance(cell, list):
            report.note(item, "caption_list", f"{len(texts)} of {len(cell)} captions used ({self.caption_select})")
        return [self._decoded(item, t.encode("utf-8", "replace"), None, report) for t in texts]

    # -- records -----------------------------------------------------------------------------------
    def records(self, report: PrepareReport) -> Iterator[Record]:
        """Folder by folder, so memory holds one folder's names (plus a digest per image for
        duplicates, and metadata captions not used yet), not the whole tree's."""
        first_with_pixels: dict[bytes, str] = {}
        metadata: dict[str, tuple[str, Any]] = {}
        for listing in self._walk(report):
            self._read_metadata(listing, metadata, report)
            for stem, files in sorted(self._groups(listing, report).items()):
                yield from self._samples(stem, files, metadata, first_with_pixels, report)
        for target, (item, _) in sorted(metadata.items()):  # rows whose image was never met
            report.skip(item, "no_image", f"{target} is not an image file under --input")

    def _samples(self, stem: str, files: dict[str, str], metadata: dict[str, tuple[str, Any]],
                 first_with_pixels: dict[bytes, str], report: PrepareReport) -> Iterator[Record]:
        """The samples of the files sharing one name in one folder (`r0.png`, `r0.jpg`, `r0.txt`).
        Metadata captions are taken out of `metadata` as they are used."""
        images = sorted(s for s in files if s != CAPTION_SUFFIX)
        caption_file = files.get(CAPTION_SUFFIX)
        in_metadata = [files[s] for s in images if files[s] in metadata]
        if caption_file is not None and in_metadata:
            report.skip(caption_file, "ambiguous_caption",
                        f"{metadata[in_metadata[0]][0]} captions {in_metadata[0]}")
            caption_file = None
        if not images:
            if caption_file is not None:
                report.skip(caption_file, "no_image", "no same-named image file")
            return
        shared: list[str] | None = None
        if caption_file is not None:
            try:
                shared = [self._caption(caption_file, self.root / caption_file, report)]
            except OSError as e:
                report.skip(caption_file, "unreadable_file", f"{type(e).__name__}: {e.strerror}")
                for s in images:
                    report.skip(files[s], "unreadable_file", f"its caption {caption_file} cannot be read")
                return
        for s in images:
            rel = files[s]
            cell = None
            if rel in metadata:
                source_of_caption, cell = metadata.pop(rel)
                texts = self._cell_captions(source_of_caption, cell, report)
                if texts is None:
                    continue
            elif shared is not None:
                texts, source_of_caption = shared, caption_file
            else:
                report.skip(rel, "no_caption", f"no {stem}{CAPTION_SUFFIX} beside it and no metadata.jsonl entry")
                continue
            texts = [t for t in texts if t]
            if not texts:
                report.skip(rel, "empty_caption", f"{source_of_caption} is empty or whitespace")
                continue
            try:
                loaded = read_image_file(self.root / rel, self.limits)
            except ImageProblem as e:
                report.skip(rel, e.reason, e.detail)
                continue
            except OSError as e:
                report.skip(rel, "unreadable_file", f"{type(e).__name__}: {e.strerror}")
                continue
            digest = bytes.fromhex(loaded.pixel_digest)
            if digest in first_with_pixels:
                report.skip(rel, "duplicate_image", f"same pixels as {first_with_pixels[digest]}")
                continue
            first_with_pixels[digest] = rel
            if loaded.image.mode != loaded.original_mode:
                report.note(rel, "converted", f"{loaded.original_mode} -> {loaded.image.mode}")
            if shared is not None and len(images) > 1 and rel not in in_metadata:
                others = ", ".join(files[o] for o in images if o != s)
                report.note(rel, "shared_caption", f"{caption_file} also captions {others}")
            split = split_by_name(rel, self.fractions)  # every caption of an image in one split
            listed = isinstance(cell, list) and self.caption_select == "all"
            names = [f"{rel}/{j}" for j in range(len(texts))] if listed else [rel]  # no file is named PATH/j
            for name, text in zip(names, texts):  # sample_key is injective: keys are unique
                yield Record(split, "image_text", self.name, sample_key(name), loaded.image, text, None, LICENSE,
                             origin=name)
