"""`mmoe-ds export CKPT OUT`: one HF folder from a DeepSpeed checkpoint of any expert-parallel size.

The parts: `gather` merges the per-expert files into one model, `remote_code` ships the model
code (flattened, relative imports only) so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works where neither mmoe_ds nor DeepSpeed is installed (with the
processor's code, so `AutoProcessor.from_pretrained(path, trust_remote_code=True)` works too),
`card` writes the Hub model card, and `mmoe_ds.io.atomic` stages the folder and swaps it in whole.
Weights above `--max-shard-size` are split into safetensors shards with model.safetensors.index.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from transformers import GenerationConfig

from ..errors import IncompleteCheckpointError, UnsafeCheckpointError
from ..io.atomic import staged_directory
from ..model import MmoeForCausalLM
from .card import last_train_record, model_card
from .gather import gather_state_dict, load_checkpoint_model, resolve_tag_dir
from .remote_code import AUTO_MAP, CODE_FILES, PROCESSOR_AUTO_MAP, flatten_imports, write_code

__all__ = ["export", "save_export", "write_model", "disk_state_dict", "main", "load_checkpoint_model",
           "gather_state_dict", "resolve_tag_dir", "model_card", "write_code", "flatten_imports", "CODE_FILES"]
REPORT_FILES = ("routing_report.png", "routing_report.md")
PROCESSOR_CONFIG = "processor_config.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"  # transformers' own default for save_pretrained / push_to_hub


def disk_state_dict(model: MmoeForCausalLM) -> dict:
    """The state dict an export writes: the model's, with each layer's 3-D expert weights (`experts.w13` /
    `experts.w2`) as the per-expert tensors every folder holds on disk (`deepspeed_experts.{e}.w1.weight`,
    ...), each its own contiguous tensor, in the model's order (`to_per_expert`).

    Handing these to `save_pretrained` (rather than letting transformers' registered conversion split
    w13 / w2 while saving) keeps the names per expert with any transformers, 4.x included, and keeps
    the split into shards per tensor: the conversion's outputs share one storage per layer and
    projection, which huggingface_hub's splitter keeps in one shard, so the experts of a layer would
    move between shards as a block. `mmoe-ds upcycle` plans its streamed files from the same dict
    (`upcycle.weight_specs`). `model` may be on the meta device (names and shapes only)."""
    from ..moe.experts import to_per_expert

    return to_per_expert(model.state_dict())


def write_model(model: MmoeForCausalLM, out: Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Weights (one model.safetensors, or shards + model.safetensors.index.json above `max_shard_size`;
    the experts per expert, `disk_state_dict`), config.json (with the auto_map to the shipped code) and
    generation_config.json."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(out, max_shard_size=max_shard_size, state_dict=disk_state_dict(model))
    c = model.config
    # greedy up to the model's length: a caller's max_new_tokens / max_length (lm-eval's 256-token
    # generate_until, the card's example) takes precedence over it, which a default max_new_tokens would not
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                     max_length=c.max_position_embeddings, do_sample=False).save_pretrained(out)


def copy_files(names: list[str] | None, src: Path, out: Path) -> None:
    """Copy the named files of `src` (every regular file if `names` is None) that exist into `out`."""
    for f in (sorted(src.iterdir()) if names is None else [src / n for n in names]):
        if f.is_file():
            shutil.copyfile(f, out / f.name)


def _read_json(path: Path, what: str) -> dict | None:
    """A JSON object file of the processor folder; None if absent; ValueError naming the fix if not JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} of the {what} is not JSON ({e}); re-save the processor with "
                         "MmoeProcessor.save_pretrained or `mmoe-ds prepare`.") from None
    return data if isinstance(data, dict) else None


def add_processor_auto_map(out: Path, max_length: int | None = None) -> bool:
    """Point a processor_config.json saved into `out` at the shipped processor code (`AutoProcessor`;
    `MmoeProcessor.save_pretrained` writes it already, this keeps older processor folders working) and,
    with `max_length` (the model's max_position_embeddings), set it as the processor's and the
    tokenizer's `model_max_length`. A tokenizer saved before the processor made it add <bos> (a
    `bos_token`, a post-processor adding nothing) gets a `<bos> $A` template, so `tokenizer(text)` starts
    as training did.
    Returns: whether the folder has a processor config to point."""
    config = _read_json(out / PROCESSOR_CONFIG, "processor folder")
    if config is None:
        return False
    config["auto_map"] = dict(config.get("auto_map") or {}, **PROCESSOR_AUTO_MAP)
    if max_length is not None:
        config["model_max_length"] = max_length
    (out / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    tokenizer_config = _read_json(out / "tokenizer_config.json", "processor's tokenizer")
    if max_length is not None and tokenizer_config is not None:
        tokenizer_config["model_max_length"] = max_length
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
        bos = tokenizer_config.get("bos_token")
        if isinstance(bos, str) and (out / "tokenizer.json").is_file():
            _tokenizer_adds_bos(out / "tokenizer.json", bos)
    return True


def _tokenizer_adds_bos(path: Path, bos: str) -> None:
    """Give a tokenizer.json whose post-processor adds nothing (none, or transformers' template without
    special tokens) the template `<bos> $A`, as `MmoeProcessor` does to the tokenizer it is given."""
    from tokenizers import Tokenizer, processors

    post = (_read_json(path, "processor's tokenizer") or {}).get("post_processor", {})
    if not (post is None or (isinstance(post, dict) and post.get("type") == "TemplateProcessing"
                             and not post.get("special_tokens"))):
        return
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library's errors are plain Exceptions
        raise ValueError(f"{path.name} of the processor's tokenizer cannot be read ({e}); re-save the processor "
                         "with MmoeProcessor.save_pretrained or `mmoe-ds prepare`.") from None
    bos_id = tokenizer.token_to_id(bos)
    if bos_id is None:
        return
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                             special_tokens=[(bos, bos_id)])
    tokenizer.save(str(path))


def save_export(model: MmoeForCausalLM, out: str | os.PathLike, meta: dict | None = None,
                processor_dir: str | os.PathLike | None = None, report_dir: str | os.PathLike | None = None,
                metrics_file: str | os.PathLike | None = None,
                max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, license: str = "apache-2.0") -> Path:
    """Write an HF folder (weights, config with auto_map, code, processor, generation config,
    model card) to a temp folder, then swap it in: a failure never leaves a half-written export.

    Args:
        model: the full model (torch MoE backend).
        out: the folder to create or replace.
        meta: the checkpoint's meta.json, for the card.
        processor_dir: a saved processor whose files are copied in, with its code and an `AutoProcessor`
            auto_map in processor_config.json.
        report_dir: a run's report folder; its routing report is copied and appended to the card.
        metrics_file: the run's metrics.jsonl; its last training routing statistics give the card's
            capacity and bias audit.
        max_shard_size: weights above this ("2GB", "500MB", bytes) are split into safetensors shards.
        license: the card's license id.
    Returns:
        `out`. Files and folders get the modes a plain write under the umask gives.
    """
    with staged_directory(out, normalize_modes=True) as tmp:  # safetensors writes its file 0600
        write_model(model, tmp, max_shard_size)
        if processor_dir is not None:
            copy_files(None, Path(processor_dir), tmp)
        write_code(tmp, with_processor=add_processor_auto_map(tmp, model.config.max_position_embeddings))
        report_md = None
        if report_dir is not None:
            copy_files(list(REPORT_FILES), Path(report_dir), tmp)
            report_md = Path(report_dir) / "routing_report.md"
        step = (meta or {}).get("step")
        record = last_train_record(Path(metrics_file), step) if metrics_file is not None else None
        card = model_card(meta or {}, model.config, report_md, record, license=license)
        (tmp / "README.md").write_text(str(card))
    return Path(out)


def export(ckpt: str | os.PathLike, out: str | os.PathLike, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
           license: str = "apache-2.0") -> Path:
    """Args: ckpt: a run's output dir, its checkpoints/ dir or one tag dir; out: the HF folder to write;
    max_shard_size: weights above it are sharded; license: the card's license id.
    Returns: `out`."""
    model, meta, tag_dir = load_checkpoint_model(ckpt)
    metrics_file = tag_dir.parent.parent / "metrics.jsonl"  # RUN/checkpoints/TAG -> RUN/metrics.jsonl
    return save_export(model, out, meta, meta.get("processor_dir"), meta.get("report_dir"), metrics_file,
                       max_shard_size, license)


def parse_shard_size(text: str) -> int:
    """"2GB", "500MB", "10KB" (decimal units, like transformers) or plain bytes -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size: {text!r} is not a size; use e.g. 2GB, 500MB or a byte count.")
    return int(float(m.group(1)) * units[m.group(2) or ""])


def main(argv: list[str]) -> int:
    """`mmoe-ds export CHECKPOINT OUT`: write one HF folder from a run's checkpoint (exit 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="mmoe-ds export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run output dir, its checkpoints/ dir, or a tag dir")
    parser.add_argument("out", help="folder to write the HF model to")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="split the weights into safetensors shards of at most this size, with "
                             "model.safetensors.index.json (e.g. 2GB, 500MB; default %(default)s)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the model card (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        max_shard_size = parse_shard_size(args.max_shard_size)
    except ValueError as e:
        parser.error(str(e))
    try:
        path = export(args.checkpoint, args.out, max_shard_size, args.license)
    except (UnsafeCheckpointError, IncompleteCheckpointError) as e:  # tampered, foreign or incomplete: one line
        print(f"mmoe-ds export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {path}")
    return 0
