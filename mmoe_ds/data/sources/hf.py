"""`--source hf`: a Hugging Face `datasets` dataset, from what users have.

`--input` may be
- a `save_to_disk` folder (a `Dataset` or a `DatasetDict`), or any folder `load_dataset` reads;
- data files by extension: `.parquet`, `.jsonl`/`.json`, `.csv`/`.tsv`, `.arrow`, or a glob of
  them (`data/*.parquet`, `**/*.jsonl`), read with `load_dataset(<builder>, data_files=...)`;
- a hub id (`owner/name`) when online; offline it is a one-line error naming the fix.

A local path is always a path: it is resolved to an absolute one before `load_dataset` sees it, so
a folder named like a `datasets` builder (`imagefolder`, `parquet`, `json`, `csv`) is read as that
folder, never as the builder over the current directory. A hub id is tried only when no such
path exists and the input looks like `owner/name`.

Image cells may be `datasets.Image` values (read undecoded, so the pixel cap applies before
decoding), raw bytes, a path (relative paths are resolved against the folder holding the data
files), or arrays. `--image-column none` makes a text-only build. The dataset's own
train/validation/test splits are kept (`valid`, `val`, `dev` count as validation). A held-out split
the input lacks (data files, a folder or DatasetDict with only `train`) is taken from its other
rows by a stable hash of each row's key (--validation-fraction / --test-fraction, 10% each by
default), and `prepare` says so. A caption column holding lists (COCO/Flickr `sentences`) needs
--caption-select: `first`, or `all` (one sample per caption, keys `ROWKEY_cJJJ`, all in the row's
split). Rows are named `SPLIT[ROW]` in the report.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .base import (ImageProblem, Limits, LoadedImage, PrepareReport, Record, Source, SourceError, decode_caption,
                   caption_cells, escape_key, flatten_to_8bit, load_image, read_image_file, split_by_name,
                   split_note)

DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                      ".arrow": "arrow"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: a bare name could be a builder
NO_IMAGE = "none"
LICENSE = "as the source dataset"


def _short(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _is_list(feature: Any) -> bool:
    """A `datasets` feature holding a list per row (`[Value]`, `List`, `Sequence`, `LargeList`)."""
    import datasets

    kinds = tuple(getattr(datasets, name) for name in ("Sequence", "List", "LargeList") if hasattr(datasets, name))
    return isinstance(feature, (list, *kinds))


def hub_offline() -> bool:
    import datasets

    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("HF_DATASETS_OFFLINE", ""))
    return env.upper() in ("1", "ON", "YES", "TRUE") or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


class HFSource(Source):
    name = "hf"
    help = ("a Hugging Face datasets dataset: a save_to_disk folder, data files (.parquet .jsonl .json .csv .tsv "
            ".arrow, or a glob), or a hub id when online; columns --image-column (or 'none': text only) and "
            "--text-column")

    def __init__(self, input: str, image_column: str = "image", text_column: str = "text", limits: Limits = Limits(),
                 caption_select: str | None = None):
        """Args:
            input: see the module docstring.
            image_column: the column holding images, or "none" for text-only data.
            text_column: the column holding captions (or texts).
            limits: caps on image pixels (before decoding), caption bytes and output side.
            caption_select: "first" or "all" for a caption column of lists (None: such rows are skipped).
        Raises `SourceError` (one line) if the input cannot be opened or lacks a column."""
        self.input, self.limits = str(input), limits
        self.image_column = None if image_column.lower() == NO_IMAGE else image_column
        self.text_column, self.caption_select = text_column, caption_select
        self.base_dir, self.parts, self.unsplit = self._open()
        named = {SPLIT_NAMES.get(name.lower()) for name, _ in self.parts} if not self.unsplit else set()
        self.missing = [split for split in ("validation", "test") if split not in named]  # made by hashing
        if caption_select is None and any(_is_list(part.features.get(text_column)) for _, part in self.parts):
            raise SourceError(f"--input {self.input}: column {text_column!r} holds lists of captions; pass "
                              "--caption-select first (its first caption) or all (one sample per caption).")
        for split_name, part in self.parts:
            for option, column in (("--image-column", self.image_column), ("--text-column", self.text_column)):
                if column is not None and column not in part.column_names:
                    raise SourceError(f"--input {self.input} (split {split_name}): no column {column!r}; it has "
                                      f"{part.column_names}. Pass {option} NAME"
                                      + (" (or --image-column none for text only)." if option == "--image-column"
                                         else "."))

    @classmethod
    def from_args(cls, args: Any) -> "HFSource":
        return cls(args.input, args.image_column, args.text_column, Limits.from_args(args),
                   getattr(args, "caption_select", None))

    def build_info(self) -> dict:
        return {"input": self.input, "image_column": self.image_column, "text_column": self.text_column,
                "caption_select": self.caption_select, "limits": asdict(self.limits)}

    def _fractions(self) -> tuple[float, float]:
        """(validation, test) fractions hashed out of the other rows: only for the splits the input lacks."""
        return tuple(f if s in self.missing else 0.0 for s, f in zip(("validation", "test"), self.fractions))

    def split_note(self) -> str | None:
        if not self.missing:
            return None
        why = "the input has no split" if self.unsplit else f"the input has no {' or '.join(self.missing)} split"
        return split_note(self._fractions(), why)

    def _split(self, split_name: str, row_key: str) -> str:
        """The input's own split, else (train and unknown names) a stable hash of the row's key for
        the held-out splits the input lacks."""
        named = None if self.unsplit else SPLIT_NAMES.get(split_name.lower())
        if named in ("validation", "test"):
            return named
        return split_by_name(row_key, self._fractions())

    # -- opening ---------------------------------------------------------------------------------
    def _open(self) -> tuple[Path | None, list[tuple[str, Any]], bool]:
        """`_load` without datasets' progress bars: prepare's output is its report."""
        import datasets

        quiet_before = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            return self._load()
        finally:
            if quiet_before:
                datasets.enable_progress_bars()

    def _load(self) -> tuple[Path | None, list[tuple[str, Any]], bool]:
        """(folder for relative image paths, [(split, Dataset)], whether to split by row index)."""
        import datasets

        path = Path(self.input).expanduser()
        if path.exists():  # a local path, never a builder or hub name: datasets gets it absolute
            path = path.resolve()
        if path.is_dir():
            base, unsplit = path, False
            try:
                if any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
                    ds = datasets.load_from_disk(str(path))
                else:
                    ds = datasets.load_dataset(str(path))
            except Exception as e:  # datasets raises many types for unreadable folders
                raise SourceError(f"--input {self.input}: the datasets library cannot read this folder ({_short(e)}); "
                                  "pass a save_to_disk folder or data files (.parquet .jsonl .csv .arrow).") from None
        elif path.is_file() or glob.has_magic(self.input):
            pattern = str(path) if path.is_file() else self.input
            files = sorted(os.path.abspath(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
            if not files:
                raise SourceError(f"--input {self.input}: no file matches this pattern; check the path and quoting.")
            suffixes = sorted({Path(f).suffix.lower() for f in files})
            unknown = [s or "(none)" for s in suffixes if s not in DATA_FILE_BUILDERS]
            if unknown:
                raise SourceError(f"--input {self.input}: files ending {unknown} are not data files datasets reads; "
                                  f"use {sorted(DATA_FILE_BUILDERS)} (or --source folder / text).")
            builders = sorted({DATA_FILE_BUILDERS[s] for s in suffixes})
            if len(builders) > 1:
                raise SourceError(f"--input {self.input}: mixes file types {suffixes}; pass one type at a time.")
            kwargs = {"delimiter": "\t"} if suffixes == [".tsv"] else {}
            try:
                ds = datasets.load_dataset(builders[0], data_files=files, split="train", **kwargs)
            except Exception as e:
                raise SourceError(f"--input {self.input}: datasets could not read it as {builders[0]} ({_short(e)}); "
                                  "check that the files are valid.") from None
            base = Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))
            unsplit = True
        elif HUB_ID.match(self.input) and not self.input.startswith("."):  # no such local path: a hub id
            if hub_offline():
                raise SourceError(f"--input {self.input}: no such local path, and the hub dataset {self.input!r} "
                                  "cannot be downloaded offline (HF_HUB_OFFLINE is set); unset it, or pass a local "
                                  "save_to_disk folder or data files.")
            try:
                ds = datasets.load_dataset(self.input)
            except Exception as e:
                raise SourceError(f"--input {self.input}: no such local path, and loading it from the hub failed "
                                  f"({_short(e)}); check the id and your connection.") from None
            base, unsplit = None, False
        else:
            raise SourceError(f"--input {self.input}: no such file or folder; pass a save_to_disk folder, data files "
                              "(.parquet .jsonl .csv .arrow, globs) or a hub id (owner/name).")
        if isinstance(ds, datasets.DatasetDict):
            parts = sorted(ds.items())
        else:
            parts, unsplit = [("train", ds)], True
        if self.image_column is not None:
            parts = [(name, part.cast_column(self.image_column, datasets.Image(decode=False))
                      if isinstance(part.features.get(self.image_column), datasets.Image) else part)
                     for name, part in parts]
        return base, parts, unsplit

    # -- rows ------------------------------------------------------------------------------------
    def _image(self, value: Any) -> LoadedImage:
        """A cell -> LoadedImage, or ImageProblem (reason `no_image` for a missing or unreadable file)."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise ImageProblem("no_image", "the image cell is empty")
        if isinstance(value, (bytes, bytearray)):
            if len(value) > self.limits.max_image_bytes:
                raise ImageProblem("image_too_large", f"{len(value)} bytes > --max-image-bytes "
                                                      f"{self.limits.max_image_bytes}")
            return load_image(bytes(value), self.limits)
        if isinstance(value, str):
            file = Path(value) if Path(value).is_absolute() or self.base_dir is None else self.base_dir / value
            try:
                return read_image_file(file, self.limits)  # size bounded from stat before any read
            except OSError as e:
                raise ImageProblem("no_image", f"cannot read {file}: {type(e).__name__}") from None
        if isinstance(value, Image.Image):
            image = value
        else:
            array = np.asarray(value)
            if array.size > self.limits.max_image_pixels * 4:
                raise ImageProblem("too_many_pixels", f"array of shape {array.shape}")
            try:
                image = Image.fromarray(array.astype(np.uint8) if array.dtype == bool else array)
            except (TypeError, ValueError) as e:
                raise ImageProblem("corrupt_image", f"an array PIL cannot read: {_short(e)}") from None
        if image.width * image.height > self.limits.max_image_pixels:
            raise ImageProblem("too_many_pixels", f"{image.width}x{image.height}")
        converted = flatten_to_8bit(image).copy()
        converted.thumbnail((self.limits.max_side, self.limits.max_side), Image.BICUBIC)
        return LoadedImage(converted, image.mode, image.size, "")

    def records(self, report: PrepareReport) -> Iterator[Record]:
        for split_name, part in self.parts:
            tag = escape_key(split_name)
            for i, row in enumerate(part):
                item = f"{split_name}[{i}]"
                try:
                    cells = caption_cells(row[self.text_column], self.text_column, self.caption_select)
                except ImageProblem as e:
                    report.skip(item, e.reason, e.detail)
                    continue
                listed = isinstance(row[self.text_column], list)
                if listed:
                    report.note(item, "caption_list", f"{len(cells)} of {len(row[self.text_column])} captions used "
                                                      f"({self.caption_select})")
                texts = []
                for cell in cells:
                    caption = decode_caption(cell.encode("utf-8", "replace"), self.limits.max_caption_bytes)
                    if caption.cut_from is not None and caption.text:
                        report.note(item, "caption_truncated",
                                    f"{caption.cut_from} bytes cut to {self.limits.max_caption_bytes}")
                    texts.append(caption.text)
                if not any(texts):
                    report.skip(item, "empty_caption")
                    continue
                image = None
                if self.image_column is not None:
                    try:
                        loaded = self._image(row[self.image_column])
                    except ImageProblem as e:
                        report.skip(item, e.reason, e.detail)
                        continue
                    if loaded.image.mode != loaded.original_mode:
                        report.note(item, "converted", f"{loaded.original_mode} -> {loaded.image.mode}")
                    image = loaded.image
                row_key = f"{tag}-{i:08d}"
                split = self._split(split_name, row_key)  # every caption of a row in the row's split
                many = listed and self.caption_select == "all"
                for j, text in enumerate(texts):
                    if text:
                        yield Record(split, "text" if image is None else "image_text", self.name,
                                     f"{row_key}_c{j:03d}" if many else row_key, image, text, None, LICENSE,
                                     origin=f"{item}[{j}]" if many else item)
