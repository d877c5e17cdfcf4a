"""The `mmoe-ds` console script: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing `main(argv) -> int`; it is imported only
when chosen, so `mmoe-ds export` works without DeepSpeed and `mmoe-ds prepare` without torch's
distributed stack.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "prepare": ("mmoe_ds.data.prepare", "write WebDataset shards (embedded dataset, image folder, HF datasets, text "
                                        "files, emoji)"),
    "index": ("mmoe_ds.data.index", "build a manifest for existing WebDataset shards (local, brace patterns, pipe:, "
                                    "URLs) without rewriting them"),
    "train": ("mmoe_ds.train", "train from a recipe and a DeepSpeed config (use the deepspeed launcher)"),
    "plan": ("mmoe_ds.training.plan", "per-GPU memory (weights, gradients, optimizer, activations) and FLOPs "
             "of a recipe "
                             "at a world size; refuses what cannot fit --gpu-memory"),
    "push": ("mmoe_ds.export.push", "upload an export to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`; "
                             "--dry-run lists the files and the card)"),
    "export": ("mmoe_ds.export", "gather a DeepSpeed checkpoint (any ep_size) into one HF folder"),
    "caption": ("mmoe_ds.export.caption", "caption images with an exported model"),
    "analyze": ("mmoe_ds.analysis.cli", "routing analysis of a run or an export on a held-out probe set "
                                        "(analysis.json, analysis.md, PNGs)"),
    "upcycle": ("mmoe_ds.export.upcycle", "build an MoE model from a dense HF Llama-family LM (+ an HF vision tower)"),
}


def _usage() -> str:
    lines = ["usage: mmoe-ds <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`mmoe-ds SUBCOMMAND ...`: run the subcommand's own `main` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mmoe-ds: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
