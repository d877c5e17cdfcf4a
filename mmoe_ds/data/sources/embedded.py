"""The embedded dataset (offline, real data): Fashion-MNIST from Debian's `dataset-fashion-mnist`
when it is installed, scikit-learn's digits, scikit-image's bundled photos (caption: the loader's
docstring), and text-only English: WordNet glosses (Debian's `wordnet-base`), else the license
texts every Debian system ships, else docstrings of the Python standard library. Optionally
(`emoji=True`) Noto Color Emoji rendered to RGB images with their Unicode names as captions
(Debian's `fonts-noto-color-emoji`, see `emoji`); a build that mixes them with the grayscale
sources needs an RGB processor (`prepare --channels 3`), which converts gray images to RGB.
Every item is given one split here; `prepare` also drops cross-split duplicates by content.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import struct
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..captions import class_caption
from .base import Record, split_by_index, to_8bit
from .emoji import EMOJI_FONT, EMOJI_LICENSE, EMOJI_PACKAGE, EmojiCounts, emoji as emoji_records

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
LICENSES_DIR = Path("/usr/share/common-licenses")
# Photos bundled in the scikit-image wheel (`cat` is `chelsea` again; others need a download).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text")
STDLIB_DOC_MODULES = ("argparse", "calendar", "collections", "csv", "datetime", "decimal", "difflib", "email.message",
                      "fractions", "ftplib", "functools", "heapq", "http.client", "imaplib", "inspect", "ipaddress",
                      "logging", "mailbox", "os", "pathlib", "random", "shutil", "smtplib", "statistics", "string",
                      "subprocess", "tarfile", "textwrap", "threading", "unittest", "zipfile")

def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims as big-endian uint32, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(train_pairs: int, test_pairs: int, image_only: int) -> Iterator[Record]:
    """Train file: pairs (every 10th to validation), then image-only samples; t10k file: test pairs."""
    lic = "MIT (Zalando Research, Fashion-MNIST; Debian package dataset-fashion-mnist)"
    images = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    for i in range(min(train_pairs + image_only, len(images))):
        split = "validation" if i % 10 == 9 else "train"
        label = int(labels[i])
        if i < train_pairs:
            yield Record(split, "image_text", "fashion_mnist", f"fmnist_{i:05d}", Image.fromarray(images[i]),
                         class_caption("fashion_mnist", label, i), label, lic)
        else:
            yield Record(split, "image", "fashion_mnist", f"fmnist_{i:05d}", Image.fromarray(images[i]), None,
                         label, lic)
    images = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    for i in range(min(test_pairs, len(images))):
        yield Record("test", "image_text", "fashion_mnist", f"fmnist_test_{i:05d}", Image.fromarray(images[i]),
                     class_caption("fashion_mnist", int(labels[i])), int(labels[i]), lic)


def digits(limit: int | None = None, image_only_every: int = 7) -> Iterator[Record]:
    """scikit-learn's 1,797 8x8 handwritten digits (16 gray levels); every 7th is image-only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    lic = "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits, via scikit-learn)"
    for i, (pixels, label) in enumerate(zip(d.images[:limit], d.target[:limit])):
        image = Image.fromarray((pixels * 255.0 / 16.0).round().astype(np.uint8))
        split = split_by_index(i)
        if i % image_only_every == 3:
            yield Record(split, "image", "digits", f"digits_{i:05d}", image, None, int(label), lic)
        else:
            caption = class_caption("digits", int(label), 0 if split == "test" else i)
            yield Record(split, "image_text", "digits", f"digits_{i:05d}", image, caption, int(label), lic)


def skimage_photos(max_side: int = 64) -> Iterator[Record]:
    """scikit-image's bundled photos, captioned by the first line of their loader's docstring."""
    from skimage import data

    for i, name in enumerate(SKIMAGE_PHOTOS):
        loader = getattr(data, name)
        array = np.asarray(loader())
        if array.dtype != np.uint8:  # `horse` is boolean
            array = (array.astype(np.float64) * (255.0 if array.max() <= 1 else 1.0)).clip(0, 255).astype(np.uint8)
        image = to_8bit(Image.fromarray(array))
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        caption = (loader.__doc__ or name).strip().splitlines()[0].strip().rstrip(".")
        yield Record("validation" if i % 5 == 4 else "train", "image_text", "skimage", f"skimage_{name}", image,
                     caption, None, "scikit-image bundled data (public domain / CC0 / BSD-3, see skimage.data)")


def _wordnet_glosses() -> list[str]:
    """Definitions from WordNet's data files: the gloss after '|' up to its first example."""
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET_DIR / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line[:1].isdigit() and " | " in line:
                gloss = line.split(" | ", 1)[1].split('; "', 1)[0].strip().rstrip(";").strip()
                if len(gloss.split()) >= 4:
                    glosses.append(gloss)
    return glosses


def _license_paragraphs() -> list[str]:
    paragraphs = []
    for path in sorted(p for p in LICENSES_DIR.glob("*") if p.is_file()):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            sentence = " ".join(para.split())
            if 40 < len(sentence) < 400 and sum(c.isalpha() for c in sentence) > 0.7 * len(sentence):
                paragraphs.append(sentence)
    return paragraphs


def _stdlib_docstrings() -> list[str]:
    """First paragraphs of the docstrings of some stdlib modules' public functions, classes and methods."""
    def public(namespace: dict) -> list:
        return [obj for name, obj in sorted(namespace.items()) if not name.startswith("_")
                and (inspect.isfunction(obj) or inspect.isclass(obj))]

    texts = []
    for module_name in STDLIB_DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module left out of a trimmed Python build
            continue
        for obj in public(vars(module)):
            for documented in [obj] + (public(vars(obj)) if inspect.isclass(obj) else []):
                first = " ".join((inspect.getdoc(documented) or "").split("\n\n", 1)[0].split())
                if len(first.split()) >= 5 and ">>>" not in first:
                    texts.append(first)
    return texts


def english_texts(limit: int) -> tuple[str, list[str], str]:
    """(source, up to `limit` distinct texts spread evenly over the whole source, license)."""
    if (WORDNET_DIR / "data.noun").exists():
        source, texts, lic = "wordnet", _wordnet_glosses(), "WordNet 3.0 license (Princeton University)"
    elif LICENSES_DIR.is_dir() and any(LICENSES_DIR.iterdir()):
        source, texts, lic = "licenses", _license_paragraphs(), "verbatim license texts (verbatim copying permitted)"
    else:
        source, texts, lic = "python_docs", _stdlib_docstrings(), "Python standard library docstrings (PSF License)"
    texts = list(dict.fromkeys(texts))  # distinct, first occurrence order
    if len(texts) > limit:
        texts = [texts[i * len(texts) // limit] for i in range(limit)]
    return source, texts, lic


def text_only(limit: int) -> Iterator[Record]:
    source, texts, lic = english_texts(limit)
    for i, text in enumerate(texts):
        yield Record(split_by_index(i), "text", source, f"{source}_{i:05d}", None, text, None, lic)


def embedded(train_pairs: int = 4000, test_pairs: int = 1000, image_only: int = 500,
             text_limit: int = 6000, emoji: bool = False, emoji_size: int = 64,
             emoji_limit: int | None = None, emoji_font: Path = EMOJI_FONT) -> tuple[list[Record], dict]:
    """All embedded records, and which optional system data the build used. The defaults keep
    `prepare` to seconds and the CPU demo to minutes; Fashion-MNIST's own test file gives the
    test pairs, so test images never come from the training file.

    Args:
        train_pairs, test_pairs, image_only: Fashion-MNIST samples of each role.
        text_limit: at most this many text-only samples.
        emoji: also render Noto Color Emoji (RGB, `emoji_size` px, at most `emoji_limit` glyphs,
            from `emoji_font`); without the font this prints a note and builds without them.
    Returns:
        (records, used): `used` names the optional data found; with `emoji`, `used["emoji"]`
        holds the font, its license and the glyph counts (tried, rendered, skipped by reason).
    """
    used = {"fashion_mnist_debian": (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists(),
            "wordnet_debian": (WORDNET_DIR / "data.noun").exists()}
    parts = [digits(), skimage_photos(), text_only(text_limit)]
    if used["fashion_mnist_debian"]:
        parts.insert(0, fashion_mnist(train_pairs, test_pairs, image_only))
    records = [r for part in parts for r in part]
    if emoji:
        used["emoji_debian"] = Path(emoji_font).exists()
        if used["emoji_debian"]:
            counts = EmojiCounts()
            records += list(emoji_records(emoji_size, emoji_limit, Path(emoji_font), counts))
            used["emoji"] = {"font": str(emoji_font), "license": EMOJI_LICENSE, "size": emoji_size,
                             **counts.as_dict()}
        else:
            print(f"note: {emoji_font} not found (Debian package {EMOJI_PACKAGE}; `make system-data` installs it as "
                  "root); building without emoji", file=sys.stderr)
    used["text_source"] = next((r.source for r in records if r.kind == "text"), None)
    return records, used


EMBEDDED_SIZES = {"full": {}, "small": dict(train_pairs=600, test_pairs=200, image_only=100, text_limit=800)}
