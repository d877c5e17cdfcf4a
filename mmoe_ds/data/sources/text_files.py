"""`--source text`: text-only samples from `.txt` and `.jsonl` files (a file, a folder, or a glob).

- `.txt`: one text per non-blank line (blank lines only separate);
- `.jsonl`: one JSON object per non-blank line, its text in `--text-column` (default "text").
Each line is read with a bounded buffer: a text over --max-caption-bytes is cut (note); a
`.jsonl` line too long to hold a text of that size is skipped (`line_too_long`). Lines that are
not UTF-8 are decoded with the caption fallback (cp1252, else latin-1; note). Items are named
`FILE:LINE`; a sample's split is a hash of that name.
"""
from __future__ import annotations

import glob
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .base import (Limits, PrepareReport, Record, Source, SourceError, decode_caption, sample_key, split_by_name,
                   split_note)

TEXT_SUFFIXES = (".txt", ".jsonl")
JSONL_OVERHEAD = 64 * 1024  # room for a line's other fields and JSON escapes beyond the text's own cap
LICENSE = "user-provided"


def bounded_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """(line number from 1, the line's first `max_bytes` + a few bytes, the line's full length);
    a long line's rest is read in chunks and dropped, so memory stays bounded."""
    number = 0
    while True:
        head = stream.readline(max_bytes + 8)
        if not head:
            return
        number += 1
        length = len(head)
        tail = head
        while not tail.endswith(b"\n"):
            tail = stream.readline(1 << 20)
            if not tail:
                break
            length += len(tail)
        yield number, head.rstrip(b"\r\n"), length - (1 if tail.endswith(b"\n") else 0)


class TextFilesSource(Source):
    name = "text"
    help = ("text-only samples from .txt files (one text per non-blank line) and .jsonl files (one object per line, "
            "text in --text-column): a file, a folder or a glob")

    def __init__(self, input: str, text_column: str = "text", limits: Limits = Limits()):
        """Args:
            input: a .txt/.jsonl file, a folder (searched recursively) or a glob.
            text_column: the field holding the text in .jsonl objects.
            limits: `max_caption_bytes` caps each text.
        Raises `SourceError` (one line) when no text file is found."""
        self.input, self.text_column, self.limits = str(input), text_column, limits
        path = Path(self.input)
        if path.is_dir():
            self.root = path
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        elif path.is_file() or glob.has_magic(self.input):
            files = sorted(Path(f) for f in glob.glob(self.input, recursive=True) if Path(f).is_file())
            self.root = path.parent
            while glob.has_magic(str(self.root)):
                self.root = self.root.parent
            others = [str(f) for f in files if f.suffix.lower() not in TEXT_SUFFIXES]
            if others:
                raise SourceError(f"--input {self.input}: {others[0]} is not a .txt or .jsonl file; --source text "
                                  "reads only those (images: --source folder; parquet/csv: --source hf).")
        else:
            raise SourceError(f"--input {self.input}: no such file or folder; pass .txt/.jsonl files, a folder of "
                              "them or a glob.")
        if not files:
            raise SourceError(f"--input {self.input}: no .txt or .jsonl file found; pass a file, a folder or a glob "
                              "of them.")
        self.files = files

    @classmethod
    def from_args(cls, args: Any) -> "TextFilesSource":
        return cls(args.input, args.text_column, Limits.from_args(args))

    def build_info(self) -> dict:
        return {"input": self.input, "files": len(self.files), "text_column": self.text_column,
                "limits": asdict(self.limits)}

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _text(self, item: str, data: bytes, length: int, report: PrepareReport) -> str:
        caption = decode_caption(data, self.limits.max_caption_bytes, length if length > len(data) else None)
        if caption.encoding != "utf-8":
            report.note(item, "caption_not_utf8", f"decoded as {caption.encoding}")
        if caption.cut_from is not None and caption.text:
            report.note(item, "caption_truncated", f"{caption.cut_from} bytes cut to {self.limits.max_caption_bytes}")
        return caption.text

    def _jsonl_text(self, item: str, data: bytes, length: int, report: PrepareReport) -> str | None:
        if length > len(data):
            report.skip(item, "line_too_long", f"{length} bytes; raise --max-caption-bytes to read it")
            return None
        try:
            row = json.loads(data)
        except ValueError as e:
            report.skip(item, "bad_json", str(e)[:120])
            return None
        if not isinstance(row, dict):
            report.skip(item, "bad_json", f"a JSON {type(row).__name__}, not an object")
            return None
        value = row.get(self.text_column)
        if value is None:
            report.skip(item, "no_caption", f"no {self.text_column!r} field (use --text-column)")
            return None
        if not isinstance(value, str):
            report.skip(item, "bad_text", f"{self.text_column!r} holds a {type(value).__name__}, not a string")
            return None
        return self._text(item, value.encode("utf-8", "replace"), len(value.encode("utf-8", "replace")), report)

    def split_note(self) -> str | None:
        return split_note(self.fractions, "text files name no split")

    def records(self, report: PrepareReport) -> Iterator[Record]:
        for path in self.files:
            rel = self._rel(path)
            jsonl = path.suffix.lower() == ".jsonl"
            cap = self.limits.max_caption_bytes * 6 + JSONL_OVERHEAD if jsonl else self.limits.max_caption_bytes
            with open(path, "rb") as f:
                for number, data, length in bounded_lines(f, cap):
                    if not data.strip():
                        continue
                    item = f"{rel}:{number}"
                    text = (self._jsonl_text if jsonl else self._text)(item, data, length, report)
                    if text is None:
                        continue
                    if not text:
                        report.skip(item, "empty_caption")
                        continue
                    yield Record(split_by_name(item, self.fractions), "text", self.name, sample_key(item), None, text,
                                 None, LICENSE, origin=item)
