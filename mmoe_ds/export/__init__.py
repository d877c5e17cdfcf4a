"""`mmoe-ds export CKPT OUT`: one HF folder from a DeepSpeed checkpoint of any expert-parallel size.

The parts: `gather` merges the per-expert files into one model, `remote_code` ships the model
code (flattened, relative imports only) so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works where neither mmoe_ds nor DeepSpeed is installed, `card` writes
the model card, and `mmoe_ds.atomic` stages the folder and swaps it in whole.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig

from ..atomic import staged_directory
from ..model import MmoeForCausalLM
from .card import model_card
from .gather import gather_state_dict, load_checkpoint_model, resolve_tag_dir
from .remote_code import AUTO_MAP, CODE_FILES, flatten_imports, write_code

__all__ = ["export", "save_export", "main", "load_checkpoint_model", "gather_state_dict", "resolve_tag_dir",
           "model_card", "write_code", "flatten_imports", "CODE_FILES"]
REPORT_FILES = ("routing_report.png", "routing_report.md")


def write_model(model: MmoeForCausalLM, out: Path) -> None:
    """Weights, config.json (with the auto_map to the shipped code) and generation_config.json."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(out)
    c = model.config
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                     max_new_tokens=16, do_sample=False).save_pretrained(out)


def copy_files(names: list[str] | None, src: Path, out: Path) -> None:
    """Copy the named files of `src` (every regular file if `names` is None) that exist into `out`."""
    for f in (sorted(src.iterdir()) if names is None else [src / n for n in names]):
        if f.is_file():
            shutil.copyfile(f, out / f.name)


def save_export(model: MmoeForCausalLM, out: str | os.PathLike, meta: dict | None = None,
                processor_dir: str | os.PathLike | None = None, report_dir: str | os.PathLike | None = None) -> Path:
    """Write an HF folder (weights, config with auto_map, code, processor, generation config,
    model card) to a temp folder, then swap it in: a failure never leaves a half-written export.

    Args:
        model: the full model (torch MoE backend).
        out: the folder to create or replace.
        meta: the checkpoint's meta.json, for the card.
        processor_dir: a saved processor whose files are copied in.
        report_dir: a run's report folder; its routing report is copied and appended to the card.
    Returns:
        `out`. Files and folders get the modes a plain write under the umask gives.
    """
    with staged_directory(out, normalize_modes=True) as tmp:  # safetensors writes its file 0600
        write_model(model, tmp)
        write_code(tmp)
        if processor_dir is not None:
            copy_files(None, Path(processor_dir), tmp)
        report_md = None
        if report_dir is not None:
            copy_files(list(REPORT_FILES), Path(report_dir), tmp)
            report_md = Path(report_dir) / "routing_report.md"
        (tmp / "README.md").write_text(model_card(meta or {}, model.config, report_md))
    return Path(out)


def export(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Args: ckpt: a run's output dir, its checkpoints/ dir or one tag dir; out: the HF folder to write.
    Returns: `out`."""
    model, meta, _ = load_checkpoint_model(ckpt)
    return save_export(model, out, meta, meta.get("processor_dir"), meta.get("report_dir"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmoe-ds export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run output dir, its checkpoints/ dir, or a tag dir")
    parser.add_argument("out", help="folder to write the HF model to")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")
    return 0
