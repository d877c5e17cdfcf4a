"""Noto Color Emoji rendered to RGB images, captioned with their Unicode names: a second real,
offline image-caption dataset ("red apple", "sunrise over mountains").

The font comes from Debian's `fonts-noto-color-emoji` (OFL-1.1; `make system-data` installs it).
It is a bitmap (CBDT) font: FreeType draws it only at its one strike size, 109 (136x128 px),
and only in colour with `embedded_color=True`. Every code point of the font's character map is
tried in code-point order; a glyph is used when it has a Unicode name, is not ASCII (the font
maps `#`, `*` and the digits only as bases of keycap sequences) and draws at least one visible
pixel. Each kept glyph is composited on a white background, padded to a square and resized to
`size` px. Splits: the i-th kept glyph goes to `split_by_index(i)` (80/10/10), so builds are
deterministic and the order never depends on the machine.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from .base import PrepareReport, Record, Source, SourceError, split_by_index

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_PACKAGE = "fonts-noto-color-emoji"
EMOJI_LICENSE = "OFL-1.1 (Noto Color Emoji, Debian fonts-noto-color-emoji)"
DEFAULT_SIZE = 64
STRIKE_SIZE = 109  # the font's only bitmap size; any other size fails to load
BACKGROUND = (255, 255, 255)


@dataclass
class EmojiCounts:
    """What a build tried and why glyphs were left out (reasons: no_unicode_name, ascii, empty_render)."""

    tried: int = 0
    rendered: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"tried": self.tried, "rendered": self.rendered, "skipped": dict(sorted(self.skipped.items()))}


def font_code_points(font_path: Path = EMOJI_FONT) -> list[int]:
    """The code points of the font's best Unicode character map, ascending."""
    from fontTools.ttLib import TTFont  # a dependency of matplotlib, so always installed with mmoe-ds

    with TTFont(str(font_path), lazy=True) as font:
        return sorted(font.getBestCmap())


def caption_of(char: str) -> str | None:
    """The lower-cased Unicode name ("red apple"), or None for a code point without a name."""
    name = unicodedata.name(char, None)
    return name.lower() if name else None


def render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int) -> Image.Image | None:
    """`char` drawn in colour on white, padded to a square, resized to size x size RGB; None if
    the glyph draws no visible pixel."""
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("RGBA", (max(right, 1), max(bottom, 1)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    visible = canvas.getchannel("A").getbbox()
    if visible is None:
        return None
    side = max(canvas.size)
    square = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    square.alpha_composite(canvas, ((side - canvas.width) // 2, (side - canvas.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def emoji(size: int = DEFAULT_SIZE, limit: int | None = None, font_path: Path = EMOJI_FONT,
          counts: EmojiCounts | None = None) -> Iterator[Record]:
    """Image+text records of the font's emoji, in code-point order.

    Args:
        size: side of the square RGB images, in pixels.
        limit: at most this many records (None: all, about 1,390).
        font_path: the Noto Color Emoji font file.
        counts: filled with what was tried, rendered and skipped (by reason).
    Returns:
        An iterator of `Record`s (source "emoji", kind "image_text", label None).
    Raises:
        FileNotFoundError: the font is missing (naming the Debian package to install).
    """
    if size < 1:
        raise ValueError(f"emoji: size must be >= 1 pixel, got {size}.")
    if not Path(font_path).exists():
        raise FileNotFoundError(f"{font_path}: no Noto Color Emoji font; install Debian's {EMOJI_PACKAGE} "
                                f"(`apt-get install -y {EMOJI_PACKAGE}`, or `make system-data` as root).")
    counts = counts if counts is not None else EmojiCounts()
    font = ImageFont.truetype(str(font_path), STRIKE_SIZE)
    for code_point in font_code_points(Path(font_path)):
        if limit is not None and counts.rendered >= limit:
            return
        counts.tried += 1
        char = chr(code_point)
        caption = caption_of(char)
        if caption is None:
            counts.skipped["no_unicode_name"] += 1
            continue
        if code_point < 0x80:
            counts.skipped["ascii"] += 1
            continue
        image = render_glyph(font, char, size)
        if image is None:
            counts.skipped["empty_render"] += 1
            continue
        yield Record(split_by_index(counts.rendered), "image_text", "emoji", f"emoji_u{code_point:05x}", image,
                     caption, None, EMOJI_LICENSE)
        counts.rendered += 1


class EmojiSource(Source):
    """`--source emoji`: the emoji alone (RGB: prepare with `--channels 3`). Glyphs left out are
    counted by reason in the manifest's `build` entry (they are font facts, not damaged input)."""
    name = "emoji"
    help = (f"Noto Color Emoji rendered to RGB, captioned with Unicode names (Debian {EMOJI_PACKAGE}, OFL-1.1); "
            "no --input; use --channels 3")
    needs_input = False

    def __init__(self, size: int = DEFAULT_SIZE, font_path: Path = EMOJI_FONT):
        """Args:
            size: side of the stored square RGB images, in pixels.
            font_path: the Noto Color Emoji font file."""
        if size < 1:
            raise SourceError(f"emoji: image size must be >= 1 pixel, got {size}.")
        if not Path(font_path).exists():
            raise SourceError(f"--source emoji: {font_path} not found; install Debian's {EMOJI_PACKAGE} "
                              f"(`apt-get install -y {EMOJI_PACKAGE}`, or `make system-data` as root).")
        self.size, self.font_path, self.counts = size, Path(font_path), EmojiCounts()

    @classmethod
    def from_args(cls, args: Any) -> "EmojiSource":
        return cls(size=getattr(args, "emoji_size", DEFAULT_SIZE))

    def records(self, report: PrepareReport) -> Iterator[Record]:
        self.counts = EmojiCounts()
        yield from emoji(self.size, font_path=self.font_path, counts=self.counts)

    def build_info(self) -> dict:
        return {"emoji": {"font": str(self.font_path), "license": EMOJI_LICENSE, "size": self.size,
                          **self.counts.as_dict()}}
