"""The checks `mmoe-ds train` runs before anything is built: the recipe against the DeepSpeed config,
the prepared data, `train.init_from`'s folder and the processor. Each raises `ConfigError` naming the
field and the fix; none imports DeepSpeed or reads weights."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config.launch_env import deepspeed_config_path
from ..config.recipe import Recipe, load_ds_config, validate_launch
from ..data.manifest import has_manifest
from ..errors import ConfigError
from .data_plan import DataCheck, check_data


def load_and_validate(args) -> tuple[Recipe, dict, int, DataCheck]:
    """Recipe, DeepSpeed config, world size and the data check; raises ConfigError naming the fix.
    With `--check`, a `train.init_from` folder that does not exist yet is reported in the summary
    instead (a cluster recipe can be checked before its weights are fetched)."""
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    recipe = Recipe.load(args.recipe)
    ds_path = deepspeed_config_path(args.deepspeed_config)
    ds_config = validate_launch(recipe, load_ds_config(ds_path), ds_path, world_size)
    init_note = check_init_from(recipe, must_exist=not getattr(args, "check", False))
    data_check = check_data(recipe.data, world_size)
    if not data_check.ok:
        raise ConfigError(f"{recipe.path}: " + "; ".join(data_check.problems))
    check_data_fits_model(recipe, must_exist=not getattr(args, "check", False))
    if init_note:
        data_check.summary += f"; {init_note}"
    return recipe, ds_config, world_size, data_check

def init_model_kwargs(recipe: Recipe, source) -> dict:
    """MmoeConfig arguments of a run starting from `source` (an InitSource): its config with the
    recipe's overrides, validated at the run's expert-parallel size. Raises ConfigError."""
    from ..model import MmoeConfig
    from .init_from import model_config_kwargs

    kwargs = model_config_kwargs(source, recipe.model)
    ep = recipe.train.expert_parallel_size
    if source.num_experts % ep:
        raise ConfigError(f"{recipe.path}: train.expert_parallel_size={ep} must divide the {source.num_experts} "
                          f"experts of train.init_from={source.path}; choose a divisor of {source.num_experts}.")
    try:
        MmoeConfig(**kwargs, moe_backend="torch", ep_size=ep)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{recipe.path}: the model of train.init_from={source.path} with the recipe's model "
                          f"overrides is invalid: {e}") from None
    return kwargs

def check_patterns(recipe: Recipe, model_kwargs: dict) -> None:
    """train.freeze / train.reinit patterns against the model's names (per-expert names as on disk, and
    the 3-D `...experts.w13` / `.w2`), on a model built on the meta device (no memory, no weights), as
    the run judges them. Raises ConfigError for a pattern that matches nothing or that would freeze
    part of a layer's experts."""
    from ..model import MmoeConfig, MmoeForCausalLM
    from .init_from import validate_patterns

    t = recipe.train
    if not t.freeze and not t.reinit:
        return
    with torch.device("meta"):
        model = MmoeForCausalLM(MmoeConfig(**model_kwargs, moe_backend="torch"))
    validate_patterns(model, t.freeze, t.reinit)


def check_init_from(recipe: Recipe, must_exist: bool = True) -> str:
    """Check `train.init_from` (its config.json only, no weights) against the recipe.

    Returns: "" without init_from, else a one-line note for `--check`'s summary.
    Raises: ConfigError naming the field and the fix."""
    from .init_from import read_init_source

    path = recipe.train.init_from
    if not path:
        return ""
    if not must_exist and not (Path(path) / "config.json").is_file():
        return (f"init_from: {path} is not there yet (checked without it; fetch the weights and run "
                f"`mmoe-ds upcycle ... --out {path}` before training, see README)")
    source = read_init_source(path, need_weights=must_exist)
    kwargs = init_model_kwargs(recipe, source)
    check_patterns(recipe, kwargs)
    processor = "its processor" if source.has_processor else "the data's processor"
    return (f"init_from: {path} ({kwargs.get('num_local_experts', 4)} experts, hidden {kwargs.get('hidden_size')}, "
            f"{processor})")

def check_data_fits_model(recipe: Recipe, must_exist: bool = True) -> None:
    """The data against the model, by the calls the launch makes (so `--check` cannot pass what the
    launch refuses): the processor loaded with data.max_length (its image tokens must fit), the model
    config built from it (vocabulary, channels, patch size), and an init_from model's fit
    (`check_processor_fits`). Nothing to check while data.dir is still to be built (the embedded
    default, checked again at launch), nor while train.init_from is still to be fetched (`--check` before
    the weights: the model is that folder's). Raises ConfigError naming the field and the fix."""
    from ..model import MmoeConfig
    from .data_plan import load_processor, processor_model_kwargs
    from .init_from import read_init_source

    if not has_manifest(recipe.data.dir):
        return
    t = recipe.train
    there = t.init_from and (must_exist or (Path(t.init_from) / "config.json").is_file())
    if t.init_from and not there:  # the model (and maybe the processor) will come from that folder: checked at launch
        return
    source = read_init_source(t.init_from, need_weights=must_exist) if there else None
    processor = load_processor(recipe.data, source.path if source is not None and source.has_processor else None)
    kwargs = init_model_kwargs(recipe, source) if source is not None else processor_model_kwargs(recipe.model,
                                                                                                  processor)
    try:
        config = MmoeConfig(**kwargs, moe_backend="torch", ep_size=t.expert_parallel_size)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{recipe.path}: the model built from the recipe and the data's processor "
                          f"({recipe.data.dir}/processor) is invalid: {e}") from None
    if source is not None:
        check_processor_fits(processor, config, source)

def check_processor_fits(processor, config, source) -> None:
    """The processor a run encodes with must fit the init_from model: every token id within its
    vocabulary, the same <image> id and (patch models) the same image geometry. Raises ConfigError."""
    where = f"train.init_from={source.path}"
    whose = "its own processor" if source.has_processor else "the data's processor (the folder has none)"
    tok = processor.tokenizer
    problems = []
    if len(tok) > config.vocab_size:
        problems.append(f"{len(tok)} tokens but the model's vocab_size is {config.vocab_size}")
    if processor.image_token_id != config.image_token_id:
        problems.append(f"<image> is token {processor.image_token_id} but the model's image_token_id is "
                        f"{config.image_token_id}")
    if config.vision_encoder == "patch":
        for name in ("image_size", "patch_size", "num_channels"):
            if getattr(processor, name, None) != getattr(config, name):
                problems.append(f"{name}={getattr(processor, name, None)} but the model's is {getattr(config, name)}")
    if problems:
        raise ConfigError(f"{where}: {whose} does not fit the model ({'; '.join(problems)}); save the processor the "
                          f"model was trained with into the folder (mmoe-ds export does) or prepare the data with it.")
