"""Gather a DeepSpeed checkpoint of any expert-parallel size into one model.

DeepSpeed writes each expert of each MoE layer to its own file under its *global* id, so
gathering is a merge of state dicts, whatever ep_size wrote them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io.safe_load import safe_torch_load
from ..model import MmoeConfig, MmoeForCausalLM
from ..training.checkpoint import latest_tag, verify_tag


def resolve_tag_dir(ckpt: Path) -> Path:
    """Accepts a run's output dir, its checkpoints dir, or one tag dir.

    Raises: IncompleteCheckpointError (a ValueError) when the tag given, or named by `latest`, lacks a
    model or expert file or has one cut short; FileNotFoundError when there is no checkpoint at all."""
    for candidate in (ckpt, ckpt / "checkpoints"):
        if (candidate / "meta.json").exists():
            verify_tag(candidate, model_only=True)
            return candidate
        tag = latest_tag(candidate, model_only=True) if candidate.is_dir() else None
        if tag:
            return candidate / tag
    raise FileNotFoundError(f"{ckpt}: no complete mmoe-ds checkpoint (meta.json or checkpoints/latest) found.")


def gather_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every per-expert file, keyed by global expert id.

    The files are read weights-only (`mmoe_ds.io.safe_load`; DeepSpeed's model files hold tensors,
    containers and strings only): a file whose pickle would run code raises
    `UnsafeCheckpointError` naming it."""
    state = dict(safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(safe_torch_load(expert_file))
    return state


def load_checkpoint_model(ckpt: str | os.PathLike) -> tuple[MmoeForCausalLM, dict, Path]:
    """Args: ckpt: a run's output dir, its checkpoints/ dir or one tag dir.
    Returns: (the full model on the torch backend in eval mode, the checkpoint's meta.json, the tag dir)."""
    tag_dir = resolve_tag_dir(Path(ckpt))
    meta = json.loads((tag_dir / "meta.json").read_text())
    config = MmoeConfig(**dict(meta["model_config"], moe_backend="torch", ep_size=1))
    model = MmoeForCausalLM(config)
    model.load_state_dict(gather_state_dict(tag_dir), strict=True)
    return model.eval(), meta, tag_dir
