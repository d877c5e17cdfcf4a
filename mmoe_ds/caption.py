"""`mmoe-ds caption MODEL_DIR`: caption test images with an exported model (no DeepSpeed needed).

The model is loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`,
i.e. from the code shipped inside the export, exactly as a user without mmoe-ds would.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .data.processor import MmoeProcessor


def caption_images(model, processor, images, max_new_tokens: int = 12) -> list[str]:
    prompt = processor(images=images, texts=None, add_eos=False)
    image_key = model.config.image_input_name  # pixel_values (HF vision tower) or pixel_patches
    out = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                         **{image_key: prompt[image_key]}, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[:, prompt["input_ids"].shape[1]:]
    return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def main(argv: list[str]) -> int:
    """`mmoe-ds caption MODEL_DIR [--data DIR] [--num N] [--seed S]`: caption N test images drawn
    across the test split (every source and shard, seeded); one JSON line per image.

    Returns:
        the exit status (0).
    """
    from .recipe_data import sample_test_set

    parser = argparse.ArgumentParser(prog="mmoe-ds caption", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data", default="data/embedded", help="prepared dataset whose test split to caption")
    parser.add_argument("--num", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="which test images (drawn across the whole split)")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "manifest.json").exists():
        print(f"mmoe-ds caption: {args.data} is not a prepared dataset (no manifest.json); pass --data DIR "
              f"(written by `mmoe-ds prepare --out DIR`).", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    processor = MmoeProcessor.from_pretrained(args.model_dir)
    examples = sample_test_set(args.data, args.num, args.seed)
    if not examples:
        print(f"mmoe-ds caption: {args.data} has no test image+caption samples; pass --data a prepared dataset "
              f"with a test split.", file=sys.stderr)
        return 2
    with torch.no_grad():
        captions = caption_images(model, processor, [e.image for e in examples])
    for e, c in zip(examples, captions):
        print(json.dumps({"source": e.source, "key": e.key, "reference": e.caption, "generated": c.strip()}))
    return 0
