"""Start a run from pretrained weights (`train.init_from`), and choose what trains (`train.freeze`,
`train.reinit`).

`train.init_from` names an HF folder written by `mmoe-ds export` or `mmoe-ds upcycle` (config.json,
safetensors weights, and its processor when it has one). The run's model is that folder's config;
the recipe's `model` section may override only the fields in `OVERRIDABLE_FIELDS` (routing and
loss settings, which change no weight shapes; `router` is merged field by field into the folder's).
The weights are loaded into the DeepSpeed-backend model before `deepspeed.initialize`, each rank
reading only the dense weights and its own experts: global expert g of a layer lives on
expert-parallel rank g // E_local as local expert g % E_local (the layout DeepSpeed's per-expert
checkpoint files and `mmoe_ds.export.gather` use). A checkpoint of the run itself, when there is
one, is loaded afterwards and so takes precedence (resume).

Patterns (`train.freeze`, `train.reinit`) are `fnmatch` globs over parameter names as an export
names them (global expert ids), e.g. `*.deepspeed_moe.gate.*` for every router,
`model.layers.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.*` for one expert, `model.vision.encoder.*`.
A pattern that matches no parameter is an error (a typo must not silently train everything).
- freeze: `requires_grad=False`; the trainer leaves these out of the optimizer.
- reinit: the parameter keeps the fresh initialisation the model got at construction (the model's
  `_init_weights` with the run's seed; experts seeded by global id) instead of the folder's value.
  A parameter the folder lacks (e.g. after a `router.mode` override adds one) must be listed in
  reinit, and so must one whose shape the override changed.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

# config.json keys that are not MmoeConfig arguments, or that the trainer sets itself.
_NOT_CONFIG_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
                    "moe_backend", "ep_size", "_name_or_path")
_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PROCESSOR_CONFIG = "processor_config.json"


@dataclass(frozen=True)
class InitSource:
    """An HF folder to start from.

    Attributes:
        path: the folder.
        config: its config.json as MmoeConfig arguments (without the keys the trainer sets).
        has_processor: whether it carries a processor (processor_config.json + tokenizer files).
    """

    path: Path
    config: dict
    has_processor: bool

    @property
    def num_experts(self) -> int:
        return int(self.config.get("num_local_experts", 4))


@dataclass
class InitReport:
    """What `load_init_weights` did on this rank (global parameter names)."""

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def summary(self, path: Path) -> str:
        return (f"initialised from {path}: {len(self.loaded)} tensors loaded"
                + (f", {len(self.reinitialised)} re-initialised (train.reinit)" if self.reinitialised else ""))



def read_init_source(path: str | Path, where: str = "train.init_from", need_weights: bool = True) -> InitSource:
    """Read the folder's config (no weights are read). Raises ConfigError naming the field and the fix.
    `need_weights=False` (for `train --check`) accepts a folder whose weights are not there yet."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{where}={path}: no such folder; point it at the output of `mmoe-ds export` or "
                          f"`mmoe-ds upcycle`.")
    if not config_file.is_file():
        raise ConfigError(f"{where}={path}: no config.json; point it at the output of `mmoe-ds export` or "
                          f"`mmoe-ds upcycle`.")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}={path}: config.json is not JSON ({e}); "
                          f"export or upcycle the model again.") from None
    if raw.get("model_type") != "mmoe":
        raise ConfigError(f"{where}={path}: a {raw.get('model_type')!r} model, not an mmoe-ds one; turn a dense "
                          f"Llama-family LM into one with `mmoe-ds upcycle --lm {path} --out DIR` and point "
                          f"{where} at DIR.")
    if need_weights and not (folder / "model.safetensors").is_file() and not (folder / SAFETENSORS_INDEX).is_file():
        raise ConfigError(f"{where}={path}: no model.safetensors or {SAFETENSORS_INDEX}; the folder has no weights "
                          f"(export or upcycle the model again).")
    config = {k: v for k, v in raw.items() if k not in _NOT_CONFIG_KEYS}
    return InitSource(folder, config, (folder / PROCESSOR_CONFIG).is_file())


def model_config_kwargs(source: InitSource, overrides: dict) -> dict:
    """The folder's config with the recipe's overridable fields applied (`router` merged field by field)."""
    kwargs = json.loads(json.dumps(source.config))
    for key, value in overrides.items():
        if key == "router":
            kwargs["router"] = dict(kwargs.get("router") or {}, **value)
        else:
            kwargs[key] = value
    return kwargs


# -- parameter names ------------------------------------------------------------------------------
def global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """An expert-parallel rank's parameter name with its local expert id turned into the global one."""
    return _EXPERT.sub(lambda m: f"{m.group(1)}{ep_rank * local_experts + int(m.group(2))}{m.group(3)}", name, count=1)


def global_names(model: nn.Module, ep_rank: int, local_experts: int) -> dict[str, nn.Parameter]:
    """{global name: parameter} of this rank's model."""
    return {global_name(n, ep_rank, local_experts): p for n, p in model.named_parameters()}


def all_ranks_names(model: nn.Module, ep_size: int, local_experts: int) -> list[str]:
    """The global parameter names of the whole model: this rank's dense ones plus every rank's experts."""
    names: dict[str, None] = {}
    for rank in range(ep_size):
        names.update((global_name(n, rank, local_experts), None) for n, _ in model.named_parameters())
    return list(names)


def match(names, patterns: list[str], field_name: str, all_names=None) -> list[str]:
    """The names matching any pattern, in order.

    Raises ConfigError for a pattern that matches none of `all_names` (default `names`): the whole
    model's names, so that a pattern naming another rank's expert is not an error here."""
    names = list(names)
    universe = names if all_names is None else list(all_names)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in universe):
            example = next((n for n in universe if ".deepspeed_moe." in n), universe[0] if universe else "")
            raise ConfigError(f"{field_name}: pattern {pattern!r} matches no parameter; patterns are fnmatch globs "
                              f"over full names such as {example!r} (routers: '*.deepspeed_moe.gate.*').")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


# -- weights --------------------------------------------------------------------------------------
def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of an HF folder (one file or an index of shards)."""
    from safetensors import safe_open

    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each file opened once (safetensors reads only what is asked for)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                out[key] = f.get_tensor(key)
    return out


@torch.no_grad()
def load_init_weights(model: nn.Module, source: InitSource, ep_rank: int, ep_size: int,
                      reinit: list[str]) -> InitReport:
    """Copy the folder's weights into this rank's `model` (dense weights + its experts), except the
    parameters matching `reinit`, which keep their fresh initialisation.

    Args:
        model: the freshly built model (DeepSpeed backend at `ep_size`, or torch backend at 1).
        source: the folder.
        ep_rank: this rank's position in its expert-parallel group.
        ep_size: the expert-parallel size.
        reinit: fnmatch patterns over global parameter names.
    Returns:
        the names loaded and re-initialised.
    Raises:
        ConfigError naming the parameters when the folder and the model disagree.
    """
    local_experts = source.num_experts // ep_size
    params = global_names(model, ep_rank, local_experts)
    buffers = {global_name(n, ep_rank, local_experts): b for n, b in model.named_buffers()
               if n in model.state_dict()}  # persistent buffers only
    everything = all_ranks_names(model, ep_size, local_experts)
    fresh = set(match(params, reinit, "train.reinit", everything)) if reinit else set()
    files = weight_files(source.path)
    where = f"train.init_from={source.path}"
    missing = sorted(n for n in params if n not in files and n not in fresh)
    if missing:
        raise ConfigError(f"{where}: the folder has no weights for {len(missing)} parameter(s) of the recipe's model "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), e.g. after a model.router "
                          f"override; list them in train.reinit to start them fresh, or remove the override.")
    ours = set(everything) | set(buffers)
    foreign = sorted(n for n in files if n not in ours)
    if foreign:
        raise ConfigError(f"{where}: the folder holds {len(foreign)} tensor(s) the recipe's model has no place for "
                          f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); remove the model override "
                          f"that drops them.")
    wanted = [n for n in list(params) + list(buffers) if n in files and n not in fresh]
    tensors = read_tensors(files, wanted)
    target = {**params, **buffers}
    for name in wanted:
        value, dest = tensors[name], target[name]
        if value.shape != dest.shape:
            raise ConfigError(f"{where}: {name} has shape {list(value.shape)} in the folder but {list(dest.shape)} in "
                              f"the recipe's model; list it in train.reinit to start it fresh, or remove the model "
                              f"override that changes it.")
        dest.copy_(value.to(dest.dtype))
    return InitReport(loaded=wanted, reinitialised=sorted(fresh))


def freeze(model: nn.Module, patterns: list[str], ep_rank: int, ep_size: int, local_experts: int) -> list[str]:
    """Set requires_grad=False on this rank's parameters matching `patterns` (global names).
    Returns: their names."""
    params = global_names(model, ep_rank, local_experts)
    everything = all_ranks_names(model, ep_size, local_experts)
    names = match(params, patterns, "train.freeze", everything) if patterns else []
    for name in names:
        params[name].requires_grad_(False)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: all but the frozen ones (train.freeze, a frozen vision tower)."""
    return [p for p in model.parameters() if p.requires_grad]
