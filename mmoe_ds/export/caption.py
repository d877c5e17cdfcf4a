"""`mmoe-ds caption MODEL_DIR [IMAGE ...]`: caption image files (or test images) with an exported model.

The model is loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, i.e.
from the code shipped inside the export, exactly as a user without mmoe_ds would (no DeepSpeed
needed); the processor is this package's (so exports written before its HF call still work).
Given image files or folders, one caption per file; without, captions for test images drawn
across a prepared dataset's test split (`--data`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..data.manifest import has_manifest

BATCH = 16  # images captioned per generate call


def caption_images(model, processor, images, max_new_tokens: int = 12) -> list[str]:
    """Greedy captions of PIL images (or uint8 arrays): the processor's HF call gives the prompt
    (<bos> + the image's <image> tokens), `generate` continues it."""
    prompt = processor(images=list(images), return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def image_files(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The image files named, or inside the folders named (not recursive, sorted by name).
    Returns: (files, one-line errors for paths that are neither an image file nor a folder)."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                errors.append(f"{p}: a folder with no image files ({', '.join(sorted(extensions)[:6])}, ...)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def open_image(path: Path):
    """The decoded image, or None with the reason (not an image, damaged, too many pixels)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy(), None
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, DecompressionBombError)
        return None, f"{type(e).__name__}: {e}"[:160]


def caption_files(model, processor, files: list[Path], max_new_tokens: int) -> int:
    """Print one JSON line {"file", "generated"} per image file; an unreadable file is named on stderr
    and skipped. Returns: the number of files captioned."""
    done = 0
    for start in range(0, len(files), BATCH):
        batch = []
        for f in files[start:start + BATCH]:
            image, why = open_image(f)
            if image is None:
                print(f"mmoe-ds caption: skipped {f}: not a readable image ({why})", file=sys.stderr)
            else:
                batch.append((f, image))
        if not batch:
            continue
        with torch.no_grad():
            captions = caption_images(model, processor, [im for _, im in batch], max_new_tokens)
        for (f, _), c in zip(batch, captions):
            print(json.dumps({"file": str(f), "generated": c.strip()}))
        done += len(batch)
    return done


def main(argv: list[str]) -> int:
    """`mmoe-ds caption MODEL_DIR [IMAGE_OR_FOLDER ...] [--data DIR] [--num N] [--seed S]`: with images,
    one JSON line per image file; without, caption N test images drawn across the test split (every
    source and shard, seeded), one JSON line each.

    Returns:
        the exit status: 0, or 2 for a path that does not exist, no readable image, or no dataset.
    """
    parser = argparse.ArgumentParser(prog="mmoe-ds caption", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="an export (`mmoe-ds export`) or a Hub repo id")
    parser.add_argument("images", nargs="*", help="image files or folders of images to caption (default: test images "
                                                  "of --data)")
    parser.add_argument("--data", default="data/embedded", help="prepared dataset whose test split to caption")
    parser.add_argument("--num", type=int, default=6, help="test images to caption (without IMAGE arguments)")
    parser.add_argument("--seed", type=int, default=0, help="which test images (drawn across the whole split)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="caption length bound (default %(default)s)")
    args = parser.parse_args(argv)
    files: list[Path] = []
    if args.images:
        files, errors = image_files(args.images)
        if errors:
            print(f"mmoe-ds caption: {errors[0]}; pass image files or folders that hold them.", file=sys.stderr)
            return 2
    elif not has_manifest(args.data):
        print(f"mmoe-ds caption: {args.data} is not a prepared dataset (no manifest.json); pass image files, or "
              f"--data DIR (written by `mmoe-ds prepare --out DIR`).", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from ..data.processor import MmoeProcessor

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    processor = MmoeProcessor.from_pretrained(args.model_dir)
    if files:
        if caption_files(model, processor, files, args.max_new_tokens) == 0:
            print("mmoe-ds caption: none of the files is a readable image.", file=sys.stderr)
            return 2
        return 0
    from ..training.data_plan import sample_test_set

    examples = sample_test_set(args.data, args.num, args.seed)
    if not examples:
        print(f"mmoe-ds caption: {args.data} has no test image+caption samples; pass --data a prepared dataset "
              f"with a test split.", file=sys.stderr)
        return 2
    with torch.no_grad():
        captions = caption_images(model, processor, [e.image for e in examples], args.max_new_tokens)
    for e, c in zip(examples, captions):
        print(json.dumps({"source": e.source, "key": e.key, "reference": e.caption, "generated": c.strip()}))
    return 0
