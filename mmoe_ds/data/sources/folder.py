"""`--source folder`: images with same-named `.txt` captions, in any tree of folders.

Pairing: `dir/NAME.<image suffix>` with `dir/NAME.txt` (suffixes case-insensitive). Choices,
each reported by name in the prepare report:
- every file is read in sorted order of its relative path; a sample's key is that path escaped
  injectively (`base.sample_key`), so `a b.png`, `a_b.png`, `r0.png` and `r0.jpg` stay 4 samples;
- `r0.png` and `r0.jpg` sharing `r0.txt`: both are samples with that caption (note `shared_caption`);
- a caption that is not UTF-8 is decoded as UTF-16 (by BOM), else cp1252, else latin-1 (note);
- captions over --max-caption-bytes are cut (note); empty captions are skipped;
- images over --max-image-pixels are skipped from their header, before decoding; truncated or
  damaged images are skipped; any PIL mode is converted to 8-bit L or RGB (note) and the image
  downscaled to fit --max-side;
- a second file with the same pixels as an earlier one is skipped as `duplicate_image`;
- images without caption, captions without image, other files and hidden files are skipped.
The split of a sample is a hash of its relative path (adding files moves no other file).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from .base import (IMAGE_SUFFIXES, ImageProblem, Limits, PrepareReport, Record, Source, SourceError, decode_caption,
                   load_image, read_bounded, sample_key, split_by_name)

CAPTION_SUFFIX = ".txt"
LICENSE = "user-provided"


class FolderSource(Source):
    name = "folder"
    help = ("a folder of images (png, jpg, webp, bmp, gif, tif) with same-named .txt captions, in any sub-folders; "
            "problem files are skipped and named in OUT/skipped.jsonl")

    def __init__(self, folder: str | Path, limits: Limits = Limits()):
        """Args:
            folder: the root; every file under it is considered.
            limits: caps on image size (header check before decoding), caption bytes and output side.
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
        self.limits = limits

    @classmethod
    def from_args(cls, args: Any) -> "FolderSource":
        return cls(args.input, Limits(args.max_side, args.max_image_pixels, args.max_caption_bytes))

    def build_info(self) -> dict:
        return {"input": str(self.root), "limits": asdict(self.limits)}

    def _files(self, report: PrepareReport) -> dict[tuple[str, str], dict[str, Path]]:
        """(parent, stem) -> {suffix: path} of usable-looking files; others go into the report."""
        groups: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
        for path in sorted(self.root.rglob("*"), key=lambda p: p.relative_to(self.root).as_posix()):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts):
                if path.is_file():
                    report.skip(rel.as_posix(), "hidden_file")
                continue
            if not path.is_file():
                if path.is_symlink() and not path.exists():
                    report.skip(rel.as_posix(), "unreadable_file", "a broken link")
                continue
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and suffix != CAPTION_SUFFIX:
                report.skip(rel.as_posix(), "unknown_file_type", f"suffix {path.suffix or '(none)'!r}")
                continue
            group = groups[(rel.parent.as_posix(), path.stem)]
            if suffix == CAPTION_SUFFIX and CAPTION_SUFFIX in group:
                first = group[CAPTION_SUFFIX].relative_to(self.root).as_posix()
                report.skip(rel.as_posix(), "ambiguous_caption", f"{first} is the caption of this name")
                continue
            group[CAPTION_SUFFIX if suffix == CAPTION_SUFFIX else path.suffix] = path
        return groups

    def _caption(self, path: Path, report: PrepareReport) -> str:
        rel = path.relative_to(self.root).as_posix()
        with open(path, "rb") as f:
            data, more = read_bounded(f, self.limits.max_caption_bytes)
        caption = decode_caption(data, self.limits.max_caption_bytes,
                                 path.stat().st_size if more else None)
        if caption.encoding != "utf-8":
            report.note(rel, "caption_not_utf8", f"decoded as {caption.encoding}")
        if caption.cut_from is not None and caption.text:
            report.note(rel, "caption_truncated", f"{caption.cut_from} bytes cut to {self.limits.max_caption_bytes}")
        return caption.text

    def records(self, report: PrepareReport) -> Iterator[Record]:
        first_with_pixels: dict[str, str] = {}
        keys: set[str] = set()
        for (parent, stem), files in sorted(self._files(report).items()):
            images = sorted(s for s in files if s != CAPTION_SUFFIX)
            caption_path = files.get(CAPTION_SUFFIX)
            rel_of = {s: files[s].relative_to(self.root).as_posix() for s in files}
            if not images:
                report.skip(rel_of[CAPTION_SUFFIX], "no_image", "no same-named image file")
                continue
            if caption_path is None:
                for s in images:
                    report.skip(rel_of[s], "no_caption", f"no {stem}{CAPTION_SUFFIX} beside it")
                continue
            try:
                caption = self._caption(caption_path, report)
            except OSError as e:
                for path in [caption_path] + [files[s] for s in images]:
                    report.skip(path.relative_to(self.root).as_posix(), "unreadable_file",
                                f"{type(e).__name__}: {e.strerror}" if path == caption_path else
                                f"its caption {rel_of[CAPTION_SUFFIX]} cannot be read")
                continue
            for s in images:
                rel = rel_of[s]
                if not caption:
                    report.skip(rel, "empty_caption", f"{rel_of[CAPTION_SUFFIX]} is empty or whitespace")
                    continue
                try:
                    data = files[s].read_bytes()
                except OSError as e:
                    report.skip(rel, "unreadable_file", f"{type(e).__name__}: {e.strerror}")
                    continue
                try:
                    loaded = load_image(data, self.limits)
                except ImageProblem as e:
                    report.skip(rel, e.reason, e.detail)
                    continue
                if loaded.pixel_digest in first_with_pixels:
                    report.skip(rel, "duplicate_image", f"same pixels as {first_with_pixels[loaded.pixel_digest]}")
                    continue
                first_with_pixels[loaded.pixel_digest] = rel
                if loaded.image.mode != loaded.original_mode:
                    report.note(rel, "converted", f"{loaded.original_mode} -> {loaded.image.mode}")
                if len(images) > 1:
                    others = ", ".join(rel_of[o] for o in images if o != s)
                    report.note(rel, "shared_caption", f"{rel_of[CAPTION_SUFFIX]} also captions {others}")
                key = sample_key(rel)
                assert key not in keys, f"sample key {key} derived twice"  # injective by construction
                keys.add(key)
                yield Record(split_by_name(rel), "image_text", self.name, key, loaded.image, caption, None, LICENSE,
                             origin=rel)
