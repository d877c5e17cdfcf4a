"""`--source NAME` -> its `Source` class: `prepare` has one code path for every source.

A new source subclasses `base.Source` and is added to `SOURCES` here; `prepare --help` lists
each one's `help`."""
from __future__ import annotations

from typing import Any

from .base import Source, SourceError
from .bundled import EmbeddedSource
from .covariance import CovarianceSource
from .emoji import EmojiSource
from .folder import FolderSource
from .hf import HFSource
from .text_files import TextFilesSource

SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (EmbeddedSource, FolderSource, HFSource, TextFilesSource,
                                                                 EmojiSource, CovarianceSource)}


def make_source(args: Any) -> Source:
    """The source `args.source` names, built and validated from `prepare`'s options.

    Raises `SourceError` (one line) for an unknown source, a missing or unexpected --input, or bad input."""
    cls = SOURCES.get(args.source)
    if cls is None:
        raise SourceError(f"--source {args.source!r}: unknown; use one of {sorted(SOURCES)}.")
    if cls.needs_input and not args.input:
        raise SourceError(f"--source {args.source} needs --input PATH (see `mmoe-ds prepare --help`).")
    if not cls.needs_input and args.input:
        raise SourceError(f"--source {args.source} takes no --input; drop it, or choose another --source.")
    source = cls.from_args(args)
    source.fractions = (getattr(args, "validation_fraction", source.fractions[0]),
                        getattr(args, "test_fraction", source.fractions[1]))
    return source
