"""Class names and caption templates of the labelled embedded sources.

Captions are built from class names through several grammatical templates so the model sees
varied phrasing; template 0 is the canonical caption that zero-shot caption ranking scores
("an ankle boot" against the other classes' captions).
"""
from __future__ import annotations

CLASS_NAMES = {
    "fashion_mnist": ["T-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle boot"],
    "digits": [f"handwritten {w}" for w in
               ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]],
    # the generated textures of sources/covariance.py: scale x stripe orientation
    "covariance": [f"{s} {o}" for s in ("coarse", "fine")
                   for o in ("horizontal", "vertical", "diagonal", "antidiagonal")],
}
TEMPLATES = ("{a} {name}", "a picture of {a} {name}", "this is {a} {name}", "{a} {name}, in grayscale",
             "a photo showing {a} {name}")


def indefinite_article(noun_phrase: str) -> str:
    """'an' before a vowel sound as spelled ("an ankle boot"), else 'a' ("a T-shirt")."""
    return "an" if noun_phrase[:1].lower() in "aeiou" else "a"


def class_caption(source: str, label: int, template: int = 0) -> str:
    """Caption of class `label` of `source` ("fashion_mnist" or "digits"); template 0 is canonical."""
    if source not in CLASS_NAMES:
        raise ValueError(f"class_caption: source must be one of {sorted(CLASS_NAMES)}, got {source!r}.")
    name = CLASS_NAMES[source][label]
    return TEMPLATES[template % len(TEMPLATES)].format(a=indefinite_article(name), name=name)


def class_captions(source: str) -> list[str]:
    """The canonical caption of every class of `source`, in label order (the ranking candidates)."""
    return [class_caption(source, label) for label in range(len(CLASS_NAMES[source]))]
