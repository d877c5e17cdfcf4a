"""`--source embedded`: the offline real dataset of `embedded.py`, behind the `Source` interface."""
from __future__ import annotations

from typing import Any, Iterator

from .base import PrepareReport, Record, Source, SourceError
from .embedded import EMBEDDED_SIZES, embedded
from .emoji import DEFAULT_SIZE as EMOJI_DEFAULT_SIZE

EXTRAS = ("emoji",)  # optional parts `--with` adds to the embedded dataset


class EmbeddedSource(Source):
    name = "embedded"
    help = ("the offline real dataset (Fashion-MNIST from Debian when installed, scikit-learn digits, scikit-image "
            "photos, English texts); no --input; --small for a reduced build; --with emoji adds Noto Color Emoji "
            "(RGB: use --channels 3)")
    needs_input = False

    def __init__(self, small: bool = False, extras: tuple[str, ...] = (), emoji_size: int = EMOJI_DEFAULT_SIZE):
        """Args:
            small: the reduced build (`EMBEDDED_SIZES["small"]`) used by tests and quick demos.
            extras: optional parts from `EXTRAS` ("emoji"); without their system data the build
                goes on without them, with a note.
            emoji_size: side of the rendered emoji images, in pixels."""
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise SourceError(f"--with {unknown[0]}: unknown; the embedded dataset can add {list(EXTRAS)}.")
        if emoji_size < 1:
            raise SourceError(f"--emoji-size must be >= 1, got {emoji_size}.")
        self.size, self.extras, self.emoji_size = ("small" if small else "full"), tuple(extras), emoji_size
        self._used: dict = {}

    @classmethod
    def from_args(cls, args: Any) -> "EmbeddedSource":
        return cls(small=args.small, extras=tuple(args.extras or ()), emoji_size=args.emoji_size)

    def records(self, report: PrepareReport) -> Iterator[Record]:
        extra = dict(emoji=True, emoji_size=self.emoji_size) if "emoji" in self.extras else {}
        records, self._used = embedded(**EMBEDDED_SIZES[self.size], **extra)
        yield from records

    def build_info(self) -> dict:
        """Which optional system data the build used (known once `records` has run), and the size."""
        return {**self._used, "size": self.size}
