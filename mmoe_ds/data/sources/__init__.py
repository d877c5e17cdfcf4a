"""Where samples come from: every source implements `base.Source` and yields `Record`s in a
fixed order (deterministic builds), naming what it skips or changes in a `PrepareReport`.
Sources (`registry.SOURCES`): `embedded` (the offline real dataset), `folder` (images with .txt
captions or a metadata.jsonl/.csv), `hf` (a `datasets` dataset: save_to_disk folder, data files,
hub id), `text` (.txt/.jsonl text-only files)."""
from ..captions import CLASS_NAMES, class_caption, class_captions
from .base import (IMAGE_SUFFIXES, NOTE_KINDS, SKIP_REASONS, Limits, PrepareReport, Record, ReportEntry, Source,
                   SourceError, sample_key, split_by_index, split_by_name, to_8bit)
from .bundled import EmbeddedSource
from .emoji import EmojiSource
from .embedded import EMBEDDED_SIZES, embedded, english_texts, text_only
from .folder import FolderSource
from .hf import HFSource
from .registry import SOURCES, make_source
from .text_files import TextFilesSource

__all__ = ["CLASS_NAMES", "EMBEDDED_SIZES", "IMAGE_SUFFIXES", "NOTE_KINDS", "SKIP_REASONS", "SOURCES",
           "EmbeddedSource", "EmojiSource", "FolderSource", "HFSource", "Limits", "PrepareReport", "Record",
           "ReportEntry", "Source", "SourceError", "TextFilesSource", "class_caption", "class_captions", "embedded",
           "english_texts", "make_source", "sample_key", "split_by_index", "split_by_name", "text_only", "to_8bit"]
