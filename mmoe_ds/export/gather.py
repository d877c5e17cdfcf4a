"""Gather a DeepSpeed checkpoint of any expert-parallel size into one model.

DeepSpeed writes each expert of each MoE layer to its own file under its *global* id, so
gathering is a merge of state dicts, whatever ep_size wrote them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import latest_tag
from ..model import MmoeConfig, MmoeForCausalLM


def resolve_tag_dir(ckpt: Path) -> Path:
    """Accepts a run's output dir, its checkpoints dir, or one tag dir."""
    for candidate in (ckpt, ckpt / "checkpoints"):
        if (candidate / "meta.json").exists():
            return candidate
        tag = latest_tag(candidate) if candidate.is_dir() else None
        if tag:
            return candidate / tag
    raise FileNotFoundError(f"{ckpt}: no complete mmoe-ds checkpoint (meta.json or checkpoints/latest) found.")


def gather_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every per-expert file, keyed by global expert id."""
    # weights_only=False: DeepSpeed's files also hold its config objects; these are our own files.
    state = dict(torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(expert_file, map_location="cpu", weights_only=False))
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
