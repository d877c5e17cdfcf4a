"""DeepSpeed checkpoints that survive crashes and changes of expert-parallel size.

Layout: `OUT/checkpoints/<tag>/` holds DeepSpeed's files (one per global expert per MoE layer,
the rest in `mp_rank_00_model_states.pt`, optimizer shards per rank), plus ours: `meta.json`
(step, ep_size, world size, model config) and `rank{r}_state.pt` (that rank's loader position
and RNG states). `OUT/checkpoints/latest` names the newest *complete* tag: it is written last,
atomically, after every rank has finished, so a crash mid-save leaves the previous one in force.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .atomic import atomic_open, atomic_write_text
from .safe_load import RNG_STATE_GLOBALS, SafeLoadCheckpointEngine, deepspeed_globals, safe_torch_load

__all__ = ["atomic_write_text", "checkpoint_dir", "latest_tag", "resume", "rng_state", "save", "set_rng_state"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag / "meta.json").exists() else None


def save(engine, output_dir: str, step: int, meta: dict, rank_state: dict, keep_last: int) -> str:
    """Collective: every rank must call it."""
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step{step:08d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    with atomic_open(ckpt_dir / tag / f"rank{rank}_state.pt", "wb") as f:
        torch.save(rank_state, f)
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / tag / "meta.json", json.dumps(dict(meta, step=step, tag=tag), indent=1))
        atomic_write_text(ckpt_dir / "latest", tag)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def resume(engine, output_dir: str, ep_size: int, world_size: int) -> tuple[dict, dict | None] | None:
    """Load the latest complete checkpoint into `engine`; returns (meta, this rank's state) or None.

    A different ep_size reloads the weights (DeepSpeed regroups the per-expert files) but not
    the optimizer state, whose shards are laid out per expert-parallel rank.

    Every file is read weights-only (`mmoe_ds.safe_load`): a file whose pickle would run code
    raises `UnsafeCheckpointError` naming it (a `ConfigError`: the trainer stops before training).
    """
    ckpt_dir = checkpoint_dir(output_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    same_layout = meta["ep_size"] == ep_size and meta["world_size"] == world_size
    load_checkpoint_weights_only(engine, ckpt_dir, tag, same_layout)
    if not same_layout:  # the optimizer restarts; step counters and the LR schedule continue
        engine.global_steps = meta["step"]
        engine.global_samples = meta["step"] * engine.train_batch_size()
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step(meta["step"])
    rank_file = ckpt_dir / tag / f"rank{dist.get_rank()}_state.pt"
    same_ranks = meta["world_size"] == world_size
    rank_state = safe_torch_load(rank_file, allowed=RNG_STATE_GLOBALS) if same_ranks else None
    return meta, rank_state


def load_checkpoint_weights_only(engine, ckpt_dir: Path, tag: str, same_layout: bool) -> None:
    """`engine.load_checkpoint` with DeepSpeed's file reads made weights-only (its own reader uses
    `weights_only=False`): our checkpoint engine wrapper is in place for the load, then removed."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = SafeLoadCheckpointEngine(inner, deepspeed_globals())
    try:
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=not same_layout,
                               load_optimizer_states=same_layout, load_lr_scheduler_states=same_layout)
    finally:
        engine.checkpoint_engine = inner
