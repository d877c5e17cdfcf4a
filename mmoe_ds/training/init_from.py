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

Patterns (`train.freeze`, `train.reinit`) are `fnmatch` globs over tensor names as an export names
them (global expert ids): `*.deepspeed_moe.gate.*` for every router, `model.vision.encoder.*`,
`model.layers.1.ffn.deepspeed_moe.experts.*` for every expert of layer 1,
`model.layers.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.*` for its expert 3. The model holds a
layer's experts as two 3-D parameters (`...experts.w13` = every expert's w1 and w3, `...experts.w2`,
mmoe_ds/moe/experts.py); those names are accepted too, and stand for all the per-expert weights in them.
A pattern that matches no tensor is an error (a typo must not silently train everything).
- freeze: `requires_grad=False`; the trainer leaves these out of the optimizer. requires_grad belongs
  to a whole parameter, so a pattern that covers some but not all experts of a layer (on any
  expert-parallel rank), or an expert's w1 without its w3, cannot be honoured and is an error naming
  the layer; freeze all of that layer's experts or none.
- reinit: the tensor keeps the fresh initialisation the model got at construction (the model's
  `_init_weights` with the run's seed; experts seeded by global id) instead of the folder's value;
  per expert (each expert's slice of w13 / w2 is loaded or kept on its own).
  A tensor the folder lacks (e.g. after a `router.mode` override adds one) must be listed in
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
from ..moe.experts import HELD_IN, PER_EXPERT, LocalExperts

# config.json keys that are not MmoeConfig arguments, or that the trainer sets itself.
_NOT_CONFIG_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
                    "moe_backend", "ep_size", "_name_or_path")
_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
_STACKED = re.compile(r"^(.*\.experts\.)(w13|w2)$")  # a 3-D expert parameter; group 1: the experts' prefix
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
    """An expert-parallel rank's per-expert name with its local expert id turned into the global one."""
    return _EXPERT.sub(lambda m: f"{m.group(1)}{ep_rank * local_experts + int(m.group(2))}{m.group(3)}", name, count=1)


def global_names(model: nn.Module, ep_rank: int, local_experts: int) -> dict[str, nn.Parameter]:
    """{name: parameter} of this rank's model: the tensors requires_grad and optimizer groups act on.
    A layer's experts are two of them, `...experts.w13` / `...experts.w2`, holding this rank's local
    experts under the same name on every rank (`named_tensors` names each expert's slice)."""
    return {global_name(n, ep_rank, local_experts): p for n, p in model.named_parameters()}


def named_tensors(model: nn.Module, ep_rank: int, local_experts: int) -> dict[str, torch.Tensor]:
    """{name as an export names it: tensor} of this rank's model: dense parameters, and per expert
    `...experts.deepspeed_experts.{global id}.{w1,w3,w2}.weight`, writable views into w13 / w2
    (global id = ep_rank * local_experts + local id), in state-dict order. Copying into a view
    writes that expert's slice of the 3-D parameter, which is how `load_init_weights` loads experts."""
    experts = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, LocalExperts)}
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        stacked = _STACKED.match(name)
        module = experts.get(stacked.group(1)) if stacked else None
        if module is None:
            out[global_name(name, ep_rank, local_experts)] = param
        elif stacked.group(2) == "w13":  # all of this module's experts, w1 / w3 / w2 each (w2 is skipped below)
            for e in range(module.num_local_experts):
                for proj, view in module.expert(e).items():
                    out[f"{stacked.group(1)}deepspeed_experts.{ep_rank * local_experts + e}.{proj}.weight"] = view
    return out


def all_ranks_names(model: nn.Module, ep_size: int, local_experts: int) -> list[str]:
    """Every name a pattern may use for the whole model: the parameters' own names (dense, and the
    3-D `...experts.w13` / `.w2`), and each expert-parallel rank's per-expert names (global ids)."""
    names: dict[str, None] = dict.fromkeys(global_names(model, 0, local_experts))
    for rank in range(ep_size):
        names.update(dict.fromkeys(named_tensors(model, rank, local_experts)))
    return list(names)


def _held_by(universe: list[str]) -> dict[str, list[str]]:
    """{3-D parameter name: the per-expert names of `universe` it holds (every rank's experts)}."""
    held: dict[str, list[str]] = {}
    for name in universe:
        m = PER_EXPERT.match(name)
        if m:
            held.setdefault(m.group(1) + HELD_IN[m.group(3)], []).append(name)
    return held


def _container(name: str) -> str | None:
    """The 3-D parameter a per-expert name lives in (None for any other name)."""
    m = PER_EXPERT.match(name)
    return m.group(1) + HELD_IN[m.group(3)] if m else None


def _matches(name: str, pattern: str, held: dict[str, list[str]], field_name: str) -> bool:
    """Whether `pattern` selects `name`. A per-expert name is also selected through its 3-D parameter's
    name; a 3-D parameter by its own name or when the pattern covers every per-expert weight it holds.
    Raises ConfigError when the pattern covers some of them but not all."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    container = _container(name)
    if container is not None:
        return fnmatch.fnmatchcase(container, pattern)
    covered = held.get(name, [])
    hits = [n for n in covered if fnmatch.fnmatchcase(n, pattern)]
    if hits and len(hits) < len(covered):
        prefix = _STACKED.match(name).group(1)
        layer = prefix[:-len("experts.")]
        shown = ", ".join(repr(n) for n in hits[:3]) + (", ..." if len(hits) > 3 else "")
        raise ConfigError(
            f"{field_name}: pattern {pattern!r} covers part of the experts of {layer.rstrip('.')}: {len(hits)} of the "
            f"{len(covered)} per-expert weights held in {name} ({shown}). A layer's experts are stored together "
            f"(w13 = every expert's w1 and w3, w2 = every expert's w2) and {field_name} acts on whole tensors "
            f"(requires_grad and optimizer groups are per tensor): match every expert of that layer, e.g. "
            f"'{prefix}*', or none of them.")
    return bool(hits)


def match(names, patterns: list[str], field_name: str, all_names=None) -> list[str]:
    """The names matching any pattern, in order.

    `names` may hold per-expert names (`named_tensors`: each selected on its own, also through a
    pattern naming its 3-D parameter) or parameter names (`global_names`: a 3-D expert parameter is
    selected when a pattern names it or covers every per-expert weight of `all_names` it holds).
    Raises ConfigError for a pattern that matches none of `all_names` (default `names`): the whole
    model's names (`all_ranks_names`), so that a pattern naming another rank's expert is not an error
    here; and for a pattern covering part of a 3-D parameter in `names` (see `_matches`)."""
    names = list(names)
    universe = names if all_names is None else list(all_names)
    held = _held_by(universe)
    known = list(dict.fromkeys([*universe, *held]))
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in known):
            example = next((n for n in known if ".deepspeed_moe." in n), known[0] if known else "")
            raise ConfigError(f"{field_name}: pattern {pattern!r} matches no parameter; patterns are fnmatch globs "
                              f"over full names such as {example!r} (routers: '*.deepspeed_moe.gate.*').")
    return [n for n in names if any(_matches(n, p, held, field_name) for p in patterns)]


def validate_patterns(model: nn.Module, freeze_patterns: list[str], reinit: list[str]) -> None:
    """train.freeze / train.reinit against a model of the run's shape (e.g. built on the meta device,
    any expert-parallel layout: global ids are the same). Raises ConfigError for a pattern that
    matches nothing and for a freeze pattern covering part of a layer's experts, as the run would."""
    local_experts = _local_experts(model)
    everything = all_ranks_names(model, 1, local_experts)
    match(global_names(model, 0, local_experts), freeze_patterns, "train.freeze", everything)
    match(named_tensors(model, 0, local_experts), reinit, "train.reinit", everything)


def _local_experts(model: nn.Module) -> int:
    """E_local of the model's expert modules (0 without any)."""
    return next((m.num_local_experts for m in model.modules() if isinstance(m, LocalExperts)), 0)


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
        reinit: fnmatch patterns over global names (per expert; a 3-D parameter's name stands for all
            the per-expert weights it holds).
    Returns:
        the names loaded and re-initialised (per-expert names, as in the folder).
    Raises:
        ConfigError naming the parameters when the folder and the model disagree.
    """
    local_experts = source.num_experts // ep_size
    params = named_tensors(model, ep_rank, local_experts)  # experts: per-expert views into w13 / w2
    buffers = {global_name(n, ep_rank, local_experts): b for n, b in persistent_buffers(model)}
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


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers a state dict holds, without building one (a DeepSpeed layer's
    state dict copies every expert into per-expert tensors)."""
    out = []
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def freeze(model: nn.Module, patterns: list[str], ep_rank: int, ep_size: int, local_experts: int) -> list[str]:
    """Set requires_grad=False on this rank's parameters matching `patterns` (global names; a layer's
    experts are frozen together, see the module docstring). Returns: the parameters' names (a layer's
    experts as `...experts.w13` / `.w2`). Raises ConfigError for a pattern covering part of a layer's
    experts, on every rank alike (the whole model's names decide)."""
    params = global_names(model, ep_rank, local_experts)
    everything = all_ranks_names(model, ep_size, local_experts)
    names = match(params, patterns, "train.freeze", everything) if patterns else []
    for name in names:
        params[name].requires_grad_(False)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: all but the frozen ones (train.freeze, a frozen vision tower)."""
    return [p for p in model.parameters() if p.requires_grad]
