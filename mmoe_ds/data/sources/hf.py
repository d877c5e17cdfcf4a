"""`--source hf`: a Hugging Face `datasets` dataset, from what users have.

`--input` may be
- a `save_to_disk` folder (a `Dataset` or a `DatasetDict`), or any folder `load_dataset` reads;
- data files by extension: `.parquet`, `.jsonl`/`.json`, `.csv`/`.tsv`, `.arrow`, or a glob of
  them (`data/*.parquet`, `**/*.jsonl`), read with `load_dataset(<builder>, data_files=...)`;
- a hub id (`user/name`) when online; offline it is a one-line error naming the fix.

Image cells may be `datasets.Image` values (read undecoded, so the pixel cap applies before
decoding), raw bytes, a path (relative paths are resolved against the folder holding the data
files), or arrays. `--image-column none` makes a text-only build. The dataset's own
train/validation/test splits are kept (`valid`, `val`, `dev` count as validation); data files
and other splits are split 80/10/10 by row index. Rows are named `SPLIT[ROW]` in the report.
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
                   escape_key, flatten_to_8bit, load_image, split_by_index)

DATA_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                      ".arrow": "arrow"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
NO_IMAGE = "none"
LICENSE = "as the source dataset"


def _short(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def hub_offline() -> bool:
    import datasets

    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("HF_DATASETS_OFFLINE", ""))
    return env.upper() in ("1", "ON", "YES", "TRUE") or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


class HFSource(Source):
    name = "hf"
    help = ("a Hugging Face datasets dataset: a save_to_disk folder, data files (.parquet .jsonl .json .csv .tsv "
            ".arrow, or a glob), or a hub id when online; columns --image-column (or 'none': text only) and "
            "--text-column")

    def __init__(self, input: str, image_column: str = "image", text_column: str = "text", limits: Limits = Limits()):
        """Args:
            input: see the module docstring.
            image_column: the column holding images, or "none" for text-only data.
            text_column: the column holding captions (or texts).
            limits: caps on image pixels (before decoding), caption bytes and output side.
        Raises `SourceError` (one line) if the input cannot be opened or lacks a column."""
        self.input, self.limits = str(input), limits
        self.image_column = None if image_column.lower() == NO_IMAGE else image_column
        self.text_column = text_column
        self.base_dir, self.parts, self.unsplit = self._open()
        for split_name, part in self.parts:
            for option, column in (("--image-column", self.image_column), ("--text-column", self.text_column)):
                if column is not None and column not in part.column_names:
                    raise SourceError(f"--input {self.input} (split {split_name}): no column {column!r}; it has "
                                      f"{part.column_names}. Pass {option} NAME"
                                      + (" (or --image-column none for text only)." if option == "--image-column"
                                         else "."))

    @classmethod
    def from_args(cls, args: Any) -> "HFSource":
        return cls(args.input, args.image_column, args.text_column,
                   Limits(args.max_side, args.max_image_pixels, args.max_caption_bytes))

    def build_info(self) -> dict:
        return {"input": self.input, "image_column": self.image_column, "text_column": self.text_column,
                "limits": asdict(self.limits)}

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

        path = Path(self.input)
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
            files = sorted(f for f in glob.glob(self.input, recursive=True) if Path(f).is_file())
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
        elif HUB_ID.match(self.input) and not self.input.startswith("."):
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
                              "(.parquet .jsonl .csv .arrow, globs) or a hub id.")
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
            return load_image(bytes(value), self.limits)
        if isinstance(value, str):
            file = Path(value) if Path(value).is_absolute() or self.base_dir is None else self.base_dir / value
            try:
                data = file.read_bytes()
            except OSError as e:
                raise ImageProblem("no_image", f"cannot read {file}: {type(e).__name__}") from None
            return load_image(data, self.limits)
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
                text = row[self.text_column]
                if text is None:
                    report.skip(item, "no_caption", f"{self.text_column!r} is empty (null)")
                    continue
                if not isinstance(text, str):
                    report.skip(item, "bad_text", f"{self.text_column!r} holds a {type(text).__name__}, not a string")
                    continue
                caption = decode_caption(text.encode("utf-8", "replace"), self.limits.max_caption_bytes)
                if not caption.text:
                    report.skip(item, "empty_caption")
                    continue
                if caption.cut_from is not None:
                    report.note(item, "caption_truncated",
                                f"{caption.cut_from} bytes cut to {self.limits.max_caption_bytes}")
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
                split = split_by_index(i) if self.unsplit else SPLIT_NAMES.get(split_name.lower(), split_by_index(i))
                yield Record(split, "text" if image is None else "image_text", self.name, f"{tag}-{i:08d}", image,
                             caption.text, None, LICENSE, origin=item)
