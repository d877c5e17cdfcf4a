"""`mmoe-ds prepare`: write WebDataset shards, a trained tokenizer and the processor.

Output (written to a temp dir, then renamed into place):
  OUT/{train,validation,test}/<source>-<kind>-NNNNNN.tar
  OUT/processor/          tokenizer (byte-level BPE, trained offline) + processor config
  OUT/manifest.json       shards with sample counts and sha256, sources, class names
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

from .schema import IMAGE_TOKEN, SPECIAL_TOKENS, SPLITS
from .shards import ShardWriter, png_bytes
from .sources import CLASS_NAMES, embedded, hf_dataset, image_folder


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"], IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=[IMAGE_TOKEN], **SPECIAL_TOKENS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_dataset(records: list, out: Path, samples_per_shard: int, vocab_size: int, extra: dict,
                  image_size: int = 28, patch_size: int = 7, max_length: int = 64) -> Path:
    from .processor import MmoeProcessor

    if not records:
        raise ValueError("no samples found; check --source/--input.")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        groups = defaultdict(list)
        for r in records:
            groups[(r.split, r.source, r.kind)].append(r)
        shards = {}
        for (split, source, kind), items in sorted(groups.items()):
            (tmp / split).mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(str(tmp / split / f"{source}-{kind}-%06d.tar"), samples_per_shard)
            for r in items:
                files = {"json": json.dumps({"modality": r.kind, "source": r.source, "label": r.label,
                                             "license": r.license}, sort_keys=True).encode()}
                if r.image is not None:
                    files["png"] = png_bytes(r.image)
                if r.text is not None:
                    files["txt"] = r.text.encode()
                writer.write(r.key, files)
            writer.close()
            for path, count in zip(writer.paths, writer.counts):
                rel = Path(path).relative_to(tmp).as_posix()
                shards[rel] = {"split": split, "source": source, "kind": kind, "samples": count, "sha256": sha256(Path(path))}
        train_texts = [r.text for r in records if r.split == "train" and r.text]
        processor = MmoeProcessor(train_tokenizer(train_texts, vocab_size), image_size=image_size,
                                  patch_size=patch_size, max_length=max_length)
        processor.save_pretrained(tmp / "processor")
        counts = {s: defaultdict(int) for s in SPLITS}
        for info in shards.values():
            counts[info["split"]][info["kind"]] += info["samples"]
        manifest = {"format": "mmoe-ds webdataset v1", "shards": shards, "counts": counts, "classes": CLASS_NAMES,
                    "sources": sorted({r.source for r in records}), **extra}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmoe-ds prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["embedded", "folder", "hf"], default="embedded")
    parser.add_argument("--input", help="folder of images with .txt captions, or an HF dataset path")
    parser.add_argument("--out", default="data/embedded")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--small", action="store_true", help="a reduced embedded build (tests)")
    args = parser.parse_args(argv)
    if args.source == "embedded":
        sizes = dict(train_pairs=600, test_pairs=200, image_only=100, text_limit=800) if args.small else {}
        records, used = embedded(**sizes)
    else:
        if not args.input:
            parser.error(f"--source {args.source} needs --input PATH")
        records = list(image_folder(args.input) if args.source == "folder"
                       else hf_dataset(args.input, args.image_column, args.text_column))
        used = {"input": str(args.input)}
    out = write_dataset(records, Path(args.out), args.samples_per_shard, args.vocab_size, {"build": used},
                        max_length=args.max_length)
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "counts": manifest["counts"], "build": used}))
    return 0
