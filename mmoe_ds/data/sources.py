"""Where samples come from. Each source yields records in a fixed order:
`Record(split, kind, source, key, image, text, label, license)`.

Embedded (offline, real): Fashion-MNIST from Debian's `dataset-fashion-mnist` when installed,
scikit-learn's digits, scikit-image's bundled photos (caption: the loader's docstring), and
text-only English: WordNet glosses (Debian's `wordnet-base`) or, without it, the license texts
every Debian system ships. Every item lands in exactly one split, so no split leaks into another.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
LICENSES_DIR = Path("/usr/share/common-licenses")

CLASS_NAMES = {
    "fashion_mnist": ["T-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle boot"],
    "digits": [f"handwritten {w}" for w in
               ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]],
}
TEMPLATES = ["{a} {name}", "a picture of {a} {name}", "this is {a} {name}", "{a} {name}, in grayscale"]
# Photos bundled in the scikit-image wheel (others, e.g. `eagle`, need a download: not used).
SKIMAGE_PHOTOS = ["astronaut", "camera", "cat", "coffee", "coins", "horse", "hubble_deep_field", "moon", "page",
                  "rocket", "text", "grass", "gravel", "brick", "colorwheel", "logo", "immunohistochemistry",
                  "retina", "microaneurysms", "clock", "chelsea", "cell"]


@dataclass
class Record:
    split: str
    kind: str
    source: str
    key: str
    image: Image.Image | None
    text: str | None
    label: int | None
    license: str


def _article(name: str) -> str:
    return "an" if name[0].lower() in "aeiou" else "a"


def class_caption(source: str, label: int, template: int = 0) -> str:
    """Caption of class `label` of `source`; template 0 is the canonical one used for ranking."""
    name = CLASS_NAMES[source][label]
    return TEMPLATES[template % len(TEMPLATES)].format(a=_article(name), name=name)


def split_by_index(i: int) -> str:
    """80/10/10 by a fixed index pattern: deterministic and leak-free."""
    return {8: "validation", 9: "test"}.get(i % 10, "train")


def split_by_name(name: str) -> str:
    return split_by_index(int(hashlib.sha1(name.encode()).hexdigest(), 16))


# -- embedded --------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(train_pairs: int, test_pairs: int, image_only: int) -> Iterator[Record]:
    """Train file: pairs for train/validation, then image-only samples; t10k file: the test pairs."""
    lic = "MIT (Zalando Research, Fashion-MNIST)"
    images, labels = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"), _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    for i in range(train_pairs):
        split = "validation" if i % 10 == 9 else "train"
        yield Record(split, "image_text", "fashion_mnist", f"fmnist_{i:05d}", Image.fromarray(images[i]),
                     class_caption("fashion_mnist", int(labels[i]), i // 10), int(labels[i]), lic)
    for j in range(train_pairs, train_pairs + image_only):
        split = "validation" if j % 10 == 9 else "train"
        yield Record(split, "image", "fashion_mnist", f"fmnist_{j:05d}", Image.fromarray(images[j]), None,
                     int(labels[j]), lic)
    images, labels = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"), _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    for i in range(test_pairs):
        yield Record("test", "image_text", "fashion_mnist", f"fmnist_test_{i:05d}", Image.fromarray(images[i]),
                     class_caption("fashion_mnist", int(labels[i])), int(labels[i]), lic)


def digits(image_only_every: int = 7) -> Iterator[Record]:
    from sklearn.datasets import load_digits

    d = load_digits()
    lic = "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits, via scikit-learn)"
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        image = Image.fromarray((img * 255.0 / 16.0).round().astype(np.uint8))
        kind = "image" if i % image_only_every == 3 else "image_text"
        text = class_caption("digits", int(label), i // 10) if kind == "image_text" else None
        yield Record(split_by_index(i), kind, "digits", f"digits_{i:05d}", image, text, int(label), lic)


def skimage_photos() -> Iterator[Record]:
    from skimage import data

    for i, name in enumerate(SKIMAGE_PHOTOS):
        loader = getattr(data, name)
        array = loader()
        caption = (loader.__doc__ or name).strip().splitlines()[0].strip().rstrip(".")
        image = Image.fromarray(np.asarray(array if array.dtype == np.uint8 else (array * 255).clip(0, 255).astype(np.uint8)))
        image.thumbnail((64, 64))
        split = "validation" if i % 5 == 4 else "train"
        yield Record(split, "image_text", "skimage", f"skimage_{name}", image, caption, None,
                     "scikit-image bundled data (BSD-3 / public domain / CC0, see skimage.data)")


def english_text(limit: int) -> tuple[str, list[str], str]:
    """(source name, texts, license): WordNet glosses if installed, else Debian's license texts."""
    if (WORDNET_DIR / "data.noun").exists():
        texts = []
        for pos in ("noun", "verb", "adj", "adv"):
            for line in (WORDNET_DIR / f"data.{pos}").read_text(errors="replace").splitlines():
                if line[:1].isdigit() and "| " in line:
                    gloss = line.split("| ", 1)[1].split(";")[0].strip()
                    if len(gloss) > 12:
                        texts.append(gloss)
        return "wordnet", texts[:limit], "WordNet 3.0 license (Princeton University)"
    texts = []
    for path in sorted(LICENSES_DIR.glob("*")) if LICENSES_DIR.exists() else []:
        if path.is_file():
            for para in path.read_text(errors="replace").split("\n\n"):
                sentence = " ".join(para.split())
                if 20 < len(sentence) < 300:
                    texts.append(sentence)
    return "licenses", texts[:limit], "verbatim license texts (copying permitted)"


def text_only(limit: int) -> Iterator[Record]:
    source, texts, lic = english_text(limit)
    for i, t in enumerate(texts):
        yield Record(split_by_index(i), "text", source, f"{source}_{i:05d}", None, t, None, lic)


def embedded(train_pairs: int = 4000, test_pairs: int = 1000, image_only: int = 500, text_limit: int = 6000) -> tuple[list, dict]:
    """All embedded records and a description of what was used."""
    used = {"fashion_mnist_debian": (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists()}
    parts = [digits(), skimage_photos(), text_only(text_limit)]
    if used["fashion_mnist_debian"]:
        parts.insert(0, fashion_mnist(train_pairs, test_pairs, image_only))
    records = [r for part in parts for r in part]
    used["text_source"] = next((r.source for r in records if r.kind == "text"), None)
    return records, used


# -- user data -------------------------------------------------------------------------------------
def image_folder(folder: str) -> Iterator[Record]:
    """Every image with a same-named .txt caption; split by a hash of its name."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")):
        caption_file = path.with_suffix(".txt")
        if not caption_file.exists():
            continue
        rel = path.relative_to(folder).with_suffix("").as_posix()
        key = "folder_" + "".join(c if c.isalnum() else "_" for c in rel)
        with Image.open(path) as im:
            image = im.copy()
        image.thumbnail((256, 256))
        yield Record(split_by_name(rel), "image_text", "folder", key, image, caption_file.read_text().strip(), None,
                     "user-provided")


def hf_dataset(path: str, image_column: str = "image", text_column: str = "text") -> Iterator[Record]:
    """An HF `datasets` dataset saved with save_to_disk (or a local loadable path), used offline."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError):
        ds = datasets.load_dataset(path)
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split_name, part in splits:
        for col in (image_column, text_column):
            if col not in part.column_names:
                raise ValueError(f"hf dataset {path}: no column {col!r} (columns: {part.column_names}); "
                                 f"pass --image-column/--text-column.")
        for i, row in enumerate(part):
            split = split_name if split_name in ("train", "validation", "test") else split_by_index(i)
            image = row[image_column]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            yield Record(split, "image_text", "hf", f"hf_{split_name or 'all'}_{i:06d}", image, str(row[text_column]),
                         None, "from the source dataset")
