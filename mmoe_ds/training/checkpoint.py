"""DeepSpeed checkpoints that survive crashes and changes of expert-parallel size.

Layout: `OUT/checkpoints/<tag>/` holds DeepSpeed's files (one per global expert per MoE layer,
the rest in `mp_rank_00_model_states.pt`, optimizer shards per rank), plus ours: `meta.json`
(step, ep_size, world size, model config) and `rank{r}_state.pt` (that rank's loader position
and RNG states). `OUT/checkpoints/latest` names the newest *complete* tag: it is written last,
atomically, after every rank has finished, so a crash mid-save leaves the previous one in force.

meta.json also lists every file of the tag with its size (`files`, written once all ranks have
saved). A tag that `latest` names but whose files are not all there (meta.json missing, an expert
file pruned or never copied, a file cut short by a full disk or an interrupted copy) is refused,
by resume and by export alike, with one line naming the tag, what is wrong and the complete tags
there are: never a silent start from scratch, nor another checkpoint's weights in its place
(`latest_tag`, `verify_tag`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import IncompleteCheckpointError
from ..io.atomic import atomic_open, atomic_write_text
from ..io.safe_load import RNG_STATE_GLOBALS, SafeLoadCheckpointEngine, deepspeed_globals, safe_torch_load

__all__ = ["Checkpointer", "IncompleteCheckpointError", "atomic_write_text", "checkpoint_dir", "latest_tag", "resume",
           "rng_state", "save", "set_rng_state", "verify_tag"]

MODEL_FILE = "mp_rank_00_model_states.pt"
# How the parameters the optimizer holds are laid out. DeepSpeed's optimizer state (ZeRO's flat fp32
# partitions, Adam's moments) follows the order and shapes of the parameters, which changed when the
# experts became 3-D (w13 / w2 per layer instead of w1, w3, w2 per expert): a checkpoint without this
# mark predates that, so its weights load (the per-expert files convert) but its optimizer state would
# land on the wrong entries and is not loaded.
PARAMETER_LAYOUT = "experts_w13_w2"



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


def latest_tag(ckpt_dir: Path, model_only: bool = False) -> str | None:
    """The tag `ckpt_dir/latest` names, checked complete (`verify_tag`); None when there is no `latest`.

    Raises: IncompleteCheckpointError when the tag it names is missing or incomplete."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    verify_tag(ckpt_dir / tag, model_only, named_by=latest)
    return tag


def expected_files(meta: dict, model_only: bool = False) -> list[str]:
    """The files a tag written with `meta` must hold whatever wrote it: the model file, one file per
    expert per MoE layer (DeepSpeed numbers MoE layers in order) and, unless `model_only`, each
    rank's state."""
    from ..model import MmoeConfig

    config = MmoeConfig(**dict(meta["model_config"], moe_backend="torch", ep_size=1))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    names = [MODEL_FILE] + [f"layer_{layer}_expert_{e}_{MODEL_FILE}" for layer in range(moe_layers)
                            for e in range(config.num_local_experts)]
    return names if model_only else names + [f"rank{r}_state.pt" for r in range(meta["world_size"])]


def is_model_file(name: str) -> bool:
    """The non-expert weights or one expert's (`layer_L_expert_E_mp_rank_00_model_states.pt`)."""
    return name == MODEL_FILE or (name.startswith("layer_") and "_expert_" in name and name.endswith(MODEL_FILE))


def tag_problem(tag_dir: Path, model_only: bool = False) -> str | None:
    """None when `tag_dir` is a complete checkpoint, else what is wrong with it (one phrase).

    Every file meta.json lists must have its size; the expected files must be there (checkpoints
    written before the list was kept: each one a whole zip, as torch.save writes them)."""
    if not (tag_dir / "meta.json").is_file():
        return "it has no meta.json" if tag_dir.is_dir() else "there is no such folder"
    try:
        meta = json.loads((tag_dir / "meta.json").read_text())
        expected = expected_files(meta, model_only)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its meta.json is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    listed = {name: size for name, size in meta.get("files", {}).items() if not model_only or is_model_file(name)}
    for name in expected + sorted(set(listed) - set(expected)):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if name in listed and path.stat().st_size != listed[name]:
            return f"{name} has {path.stat().st_size} bytes, not the {listed[name]} written"
        if name not in listed and not zipfile.is_zipfile(path):
            return f"{name} is not a whole torch.save file (truncated?)"
    return None


def verify_tag(tag_dir: Path, model_only: bool = False, named_by: Path | None = None) -> None:
    """Raises IncompleteCheckpointError (one line: the tag, what is wrong, the complete tags beside it
    and the fix) unless `tag_dir` is complete; `model_only` checks only what an export reads."""
    problem = tag_problem(tag_dir, model_only)
    if problem is None:
        return
    siblings = sorted(p for p in tag_dir.parent.iterdir() if p.is_dir() and p != tag_dir) if tag_dir.parent.is_dir() \
        else []
    complete = [p.name for p in siblings if tag_problem(p, model_only) is None]
    where = f"{named_by} names {tag_dir.name}, but that checkpoint is incomplete" if named_by else \
        f"{tag_dir}: incomplete checkpoint"
    fix = (f"write one of the complete tags here ({', '.join(complete)}) into {named_by}" if named_by and complete
           else f"use one of the complete checkpoints ({', '.join(complete)})" if complete
           else "restore the missing files from a copy, or move the checkpoints away to start anew")
    raise IncompleteCheckpointError(f"{where}: {problem}; refusing to use other weights in its place. To go on, {fix}.")


def save(engine, output_dir: str, step: int, meta: dict, rank_state: dict, keep_last: int) -> str:
    """Collective: every rank must call it."""
    ckpt_dir = checkpoint_dir(output_dir)
    tag = f"step{step:08d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    with atomic_open(ckpt_dir / tag / f"rank{rank}_state.pt", "wb") as f:
        torch.save(rank_state, f)
    dist.barrier()
    if rank == 0:  # every rank's files are written: list them, so that a later loss or truncation shows
        files = {p.name: p.stat().st_size for p in sorted((ckpt_dir / tag).iterdir()) if p.is_file()
                 and p.name != "meta.json"}
        meta = dict(meta, step=step, tag=tag, parameter_layout=PARAMETER_LAYOUT, files=files)
        atomic_write_text(ckpt_dir / tag / "meta.json", json.dumps(meta, indent=1))
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
    the optimizer state, whose shards are laid out per expert-parallel rank; nor does a checkpoint
    written before the 3-D expert parameters (no `parameter_layout` in its meta.json). The returned
    meta then says why under "optimizer_restarted".

    Every file is read weights-only (`mmoe_ds.io.safe_load`): a file whose pickle would run code
    raises `UnsafeCheckpointError` naming it (a `ConfigError`: the trainer stops before training).
    """
    ckpt_dir = checkpoint_dir(output_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    same_layout = meta["ep_size"] == ep_size and meta["world_size"] == world_size
    if not same_layout:
        meta["optimizer_restarted"] = (f"written at ep_size={meta['ep_size']}, world size {meta['world_size']}; "
                                       f"now {ep_size}, {world_size}")
    elif meta.get("parameter_layout") != PARAMETER_LAYOUT:
        same_layout = False
        meta["optimizer_restarted"] = ("written before the 3-D expert parameters: its optimizer state follows the "
                                       "per-expert parameters")
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


class Checkpointer:
    """The run's checkpoints, as the trainer uses them: `resume` the latest (weights, optimizer, loader
    position, RNG), `save` at a step (collective), `record_eval` of a saved step (rank 0).

    Args:
        engine: the DeepSpeed engine whose state is saved and loaded.
        output_dir: the run's folder (checkpoints under `output_dir/checkpoints`).
        meta: what every tag's meta.json holds besides step, tag, files and metrics (ep_size,
            world_size, model_config, processor_dir, report_dir, recipe).
        loader: the training loader whose position each rank saves and restores.
        keep_last: how many tags to keep.
    """

    def __init__(self, engine, output_dir: str | os.PathLike, meta: dict, loader, keep_last: int):
        self.engine, self.output_dir, self.meta = engine, Path(output_dir), meta
        self.loader, self.keep_last = loader, keep_last

    def resume(self) -> dict | None:
        """Collective: load the latest complete checkpoint; the loader position and RNG states are
        restored too when the world size is the one it was written at. Returns its meta (None: none)."""
        resumed = resume(self.engine, str(self.output_dir), self.meta["ep_size"], self.meta["world_size"])
        if resumed is None:
            return None
        meta, rank_state = resumed
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
        return meta

    def save(self, step: int, metrics: dict) -> str:
        """Collective: save `step` with `metrics` (the last evaluation's) in its meta.json; returns the tag."""
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        return save(self.engine, str(self.output_dir), step, dict(self.meta, metrics=metrics), rank_state,
                    self.keep_last)

    def record_eval(self, tag: str, metrics: dict) -> None:
        """The evaluation of a checkpoint's own step, in its meta.json (the export's model card shows it)."""
        meta_path = checkpoint_dir(self.output_dir) / tag / "meta.json"
        meta = json.loads(meta_path.read_text())
        atomic_write_text(meta_path, json.dumps(dict(meta, metrics=metrics), indent=1))
