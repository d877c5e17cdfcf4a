"""`mmoe-ds train`: parse the command line, check the recipe, the DeepSpeed config and the data, then
build a `Trainer` from its parts and run it (started by the DeepSpeed launcher, torchrun, `srun` or
`accelerate launch`; `python -m mmoe_ds.train` is the entry module):

    deepspeed --num_gpus N --module mmoe_ds.train --recipe recipes/X.json --deepspeed_config ds_configs/Y.json

(see mmoe_ds/config/launch_env.py and launch/README.md). Everything comes from the two JSON files.
Configuration, and the prepared data against the recipe (every kind of the composition in the train
split, something for evaluation to measure), are checked before DeepSpeed is even imported
(`--check` only checks, and prints the memory plan: mmoe_ds/training/plan.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config.launch_env import deepspeed_config_path, map_slurm_env
from ..errors import ConfigError
from .checks import load_and_validate
from .teardown import exit_process
from .trainer import build_trainer


def parse_args(argv):
    """The command line of `mmoe-ds train` (`python -m mmoe_ds.train`)."""
    parser = argparse.ArgumentParser(prog="mmoe_ds.train", description="Train a multimodal MoE with DeepSpeed.")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed_config", default=None,
                        help="DeepSpeed config JSON (under `accelerate launch`: its --deepspeed_config_file if absent)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--world_size", type=int, default=None, help="with --check: the number of processes")
    parser.add_argument("--gpu-memory", default=None,
                        help="with --check: a GPU's memory (e.g. 80GB); refuse a plan that does not fit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`mmoe-ds train`: check, then build and run the trainer; returns the exit status (2: configuration error)."""
    slurm = map_slurm_env()  # bare `srun` (no torchrun): RANK etc. from SLURM_*, before anything reads them
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if slurm.problem and not args.check:
            raise ConfigError(slurm.problem)
        recipe, ds_config, world_size, data_check = load_and_validate(args)
    except ConfigError as e:
        print(f"mmoe-ds train: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check:
        ds_path = deepspeed_config_path(args.deepspeed_config)
        print(f"configuration OK: {args.recipe} + {ds_path} on {world_size} processes; {data_check.summary}")
        from .plan import print_plan

        return print_plan(recipe, ds_config, world_size, args.gpu_memory, "mmoe-ds train", not_yet_ok=True)
    try:
        trainer = build_trainer(recipe, ds_config, world_size)
    except ConfigError as e:  # the data built by prepare_if_missing does not fit the recipe (every rank alike)
        print(f"mmoe-ds train: configuration error: {e}", file=sys.stderr)
        return 2
    result = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"final_eval": result["eval"], "report": [str(p) for p in result["report"]]}), flush=True)
    trainer.dist.barrier()
    return 0


if __name__ == "__main__":
    # Tear gloo down before the interpreter does (mmoe_ds/training/teardown.py; issue 11 item 8): the
    # engine's process groups outlive main() through hooks held in C++.
    exit_process(main())
