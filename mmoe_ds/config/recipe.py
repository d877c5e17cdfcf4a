"""Training recipes (`recipes/*.json`) and the checks a run must pass before any worker starts.

A recipe has three sections: `data` (where the shards are, the per-batch modality mix),
`model` (`MmoeConfig` fields, including `router`), `train` (steps, evaluation, checkpoints,
expert-parallel size). Every error names the file, the field and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.loader import LOADER_LIMITS, composition_problem, limit_problem
from ..errors import ConfigError
from ..moe.config import MODALITIES

# What evaluation can measure; `data.eval_metrics: "auto"` measures whatever the prepared data serves.
EVAL_METRICS = ("caption_loss", "text_ppl", "retrieval", "class_rank")
# Recipe `model` fields that may change a model started from `train.init_from`: no weight depends on them.
OVERRIDABLE_FIELDS = ("router", "num_experts_per_tok", "router_aux_loss_coef", "image_loss_coef",
                      "output_router_logits", "freeze_vision_tower")



@dataclass
class DataSection:
    dir: str = "data/embedded"
    composition: dict[str, int] = field(default_factory=lambda: {"image_text": 6, "text": 1, "image": 1})
    max_length: int = 64
    num_workers: int = 0
    eval_batches: int = 4  # per rank, for caption loss and text perplexity
    ranking_images: int = 200  # labelled test images for zero-shot class ranking (all ranks; embedded sources)
    retrieval_candidates: int = 50  # distinct test captions per image->text retrieval (0: off)
    eval_metrics: Any = "auto"  # "auto" (what the data serves) or a list from EVAL_METRICS the data must serve
    prepare_if_missing: bool = True  # build the embedded dataset when data.dir is the default and missing
    # Loader caps, passed through to LoaderConfig (when the loader has them).
    max_caption_bytes: int = LOADER_LIMITS["max_caption_bytes"]
    max_image_pixels: int = LOADER_LIMITS["max_image_pixels"]
    verify_sha256: bool = False


@dataclass
class TrainSection:
    output_dir: str = "runs/demo"
    steps: int = 200
    expert_parallel_size: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_last: int = 2
    progress_bar: bool = True
    # Start from an HF folder (`mmoe-ds export` / `mmoe-ds upcycle` output); see mmoe_ds/training/init_from.py.
    init_from: str | None = None
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameters that do not train
    reinit: list[str] = field(default_factory=list)  # fnmatch patterns of init_from parameters started fresh
    # Optimizer parameter groups: [{"params": [fnmatch patterns], "lr_multiplier": x}] trains the matching
    # parameters at x times the DeepSpeed config's learning rate (the schedule scales every group alike).
    param_groups: list[dict] = field(default_factory=list)


def check_param_groups(groups, path) -> None:
    """train.param_groups: a list of {"params": [non-empty patterns], "lr_multiplier": number > 0}."""
    example = '[{"params": ["*.deepspeed_moe.gate.*"], "lr_multiplier": 10}]'
    if not isinstance(groups, list):
        raise ConfigError(f"{path}: train.param_groups must be a list such as {example} (got {groups!r}).")
    for i, g in enumerate(groups):
        ok = (isinstance(g, dict) and set(g) == {"params", "lr_multiplier"} and isinstance(g["params"], list)
              and g["params"] and all(isinstance(x, str) and x for x in g["params"])
              and isinstance(g["lr_multiplier"], (int, float)) and not isinstance(g["lr_multiplier"], bool)
              and g["lr_multiplier"] > 0)
        if not ok:
            raise ConfigError(f"{path}: train.param_groups[{i}] must be {{\"params\": [patterns], \"lr_multiplier\": "
                              f"number > 0}}, e.g. {example} (got {g!r}).")


@dataclass
class Recipe:
    data: DataSection
    model: dict[str, Any]
    train: TrainSection
    path: str = "<recipe>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = str(path)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: recipe file not found; pass --recipe recipes/<name>.json.") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}).") from None
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: dict, path: str = "<recipe>") -> "Recipe":
        unknown = sorted(set(raw) - {"data", "model", "train", "description"})
        if unknown:
            raise ConfigError(f"{path}: unknown top-level sections {unknown}; use data, model, train.")
        recipe = cls(_section(DataSection, raw.get("data", {}), path, "data"), dict(raw.get("model", {})),
                     _section(TrainSection, raw.get("train", {}), path, "train"), path)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        p, d, t = self.path, self.data, self.train
        problem = composition_problem(d.composition)
        if problem:
            raise ConfigError(f"{p}: data.composition {problem} (samples per batch; got {d.composition}).")
        if d.retrieval_candidates != 0 and d.retrieval_candidates < 2:
            raise ConfigError(f"{p}: data.retrieval_candidates must be 0 (off) or >= 2 (got {d.retrieval_candidates}).")
        if d.eval_metrics != "auto" and (not isinstance(d.eval_metrics, list)
                                         or not set(d.eval_metrics) <= set(EVAL_METRICS)):
            raise ConfigError(f"{p}: data.eval_metrics must be \"auto\" or a list from {list(EVAL_METRICS)} "
                              f"(got {d.eval_metrics!r}).")
        for name in LOADER_LIMITS:
            problem = limit_problem(getattr(d, name))
            if problem:
                raise ConfigError(f"{p}: data.{name} {problem} (got {getattr(d, name)!r}).")
        if d.eval_batches < 1:
            raise ConfigError(f"{p}: data.eval_batches must be >= 1 (got {d.eval_batches}).")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_last", "expert_parallel_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"{p}: train.{name} must be >= 1 (got {getattr(t, name)}).")
        for name in ("freeze", "reinit"):
            patterns = getattr(t, name)
            if not isinstance(patterns, list) or not all(isinstance(x, str) and x for x in patterns):
                raise ConfigError(f"{p}: train.{name} must be a list of parameter-name patterns such as "
                                  f"[\"*.deepspeed_moe.gate.*\"] (got {patterns!r}).")
        check_param_groups(t.param_groups, p)
        if t.reinit and not t.init_from:
            raise ConfigError(f"{p}: train.reinit re-initialises weights loaded by train.init_from, which is not set "
                              f"(every parameter starts fresh already); set train.init_from or remove train.reinit.")
        for reserved in ("moe_backend", "ep_size", "vocab_size"):
            if reserved in self.model:
                raise ConfigError(f"{p}: model.{reserved} is set by mmoe-ds (backend, train.expert_parallel_size, "
                                  f"tokenizer); remove it from the recipe.")
        modalities = self.model.get("router", {}).get("modalities")
        if modalities is not None and tuple(modalities) != MODALITIES:
            raise ConfigError(f"{p}: model.router.modalities={modalities} does not match the data's modalities "
                              f"{list(MODALITIES)}; remove the field or fix its order.")
        if t.init_from is not None:
            if not isinstance(t.init_from, str) or not t.init_from:
                raise ConfigError(f"{p}: train.init_from must be the path of an `mmoe-ds export` or `mmoe-ds upcycle` "
                                  f"folder (got {t.init_from!r}).")
            check_overrides(self.model, p)
            # The model's other checks need the folder's config.json: see mmoe_ds.training.checks.check_init_from.
            return
        if self.model.get("vision_encoder", "patch") != "patch":
            raise ConfigError(f"{p}: model.vision_encoder={self.model['vision_encoder']!r} needs the vision model's "
                              f"weights and image processor; build the model with `mmoe-ds upcycle --lm LM --vision "
                              f"VISION --out DIR` and set train.init_from to DIR (leave vision_encoder out).")
        experts = self.model.get("num_local_experts", 4)
        if experts % t.expert_parallel_size:
            raise ConfigError(f"{p}: train.expert_parallel_size={t.expert_parallel_size} must divide "
                              f"model.num_local_experts={experts}.")

    @property
    def micro_batch_size(self) -> int:
        return sum(self.data.composition.values())

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": self.model, "train": asdict(self.train)}


def _section(cls, raw: dict, path: str, name: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown fields {[f'{name}.{u}' for u in unknown]}; valid: {sorted(known)}.")
    return cls(**raw)


ZERO3_UNSUPPORTED = ("zero_optimization.stage=3 is not supported with DeepSpeed's native MoE (expert parallelism); "
                     "use stage 0, 1 or 2.")


def load_ds_config(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found; pass --deepspeed_config ds_configs/<name>.json."
                          ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from None


def validate_launch(recipe: Recipe, ds_config: dict, ds_path: str, world_size: int) -> dict:
    """Cross-checks of recipe, DeepSpeed config and world size; returns the DeepSpeed config to use."""
    ep = recipe.train.expert_parallel_size
    if world_size % ep:
        raise ConfigError(f"{recipe.path}: train.expert_parallel_size={ep} must divide the world size {world_size} "
                          f"(processes); launch a multiple of {ep} processes or change expert_parallel_size.")
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(f"{ds_path}: {ZERO3_UNSUPPORTED}")
    if ds_config.get("fp16", {}).get("enabled") and ds_config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{ds_path}: fp16.enabled and bf16.enabled are both true; enable one.")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != recipe.micro_batch_size:
        raise ConfigError(f"{ds_path}: train_micro_batch_size_per_gpu={micro} but {recipe.path} data.composition "
                          f"sums to {recipe.micro_batch_size} samples per batch; make them equal (or drop the field).")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    total = ds_config.get("train_batch_size")
    if total is not None and total != recipe.micro_batch_size * gas * world_size:
        raise ConfigError(f"{ds_path}: train_batch_size={total} != micro batch {recipe.micro_batch_size} x "
                          f"gradient_accumulation_steps {gas} x {world_size} processes; fix it or drop the field.")
    if "optimizer" not in ds_config:
        raise ConfigError(f"{ds_path}: no 'optimizer' section; add e.g. "
                          f"{{\"type\": \"AdamW\", \"params\": {{\"lr\": 3e-4}}}}.")
    config = json.loads(json.dumps(ds_config))
    config["train_micro_batch_size_per_gpu"] = recipe.micro_batch_size
    config.setdefault("gradient_accumulation_steps", 1)
    config.pop("train_batch_size", None)
    scheduler = config.get("scheduler", {})
    if scheduler.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        scheduler.setdefault("params", {}).setdefault("total_num_steps", recipe.train.steps)
    tb = config.get("tensorboard")
    if tb and tb.get("enabled") and not tb.get("output_path"):
        tb["output_path"] = str(Path(recipe.train.output_dir) / "tensorboard")
        tb.setdefault("job_name", "mmoe")
    return config

def check_overrides(model_section: dict, where: str) -> None:
    """Raise ConfigError if a recipe starting from `train.init_from` sets a model field that is not overridable."""
    fixed = sorted(set(model_section) - set(OVERRIDABLE_FIELDS))
    if fixed:
        also = "; also " + ", ".join(f"model.{f}" for f in fixed[1:]) if fixed[1:] else ""
        raise ConfigError(f"{where}: model.{fixed[0]} cannot be changed when starting from train.init_from (the "
                          f"weights fix it{also}); "
                          f"remove it from the recipe's model section (only {list(OVERRIDABLE_FIELDS)} may be set).")
